"""HunyuanImage-2.1 specifics: ComfyUI's files, the text conditioning, the 32x buckets and ComfyUI's LoRA names.
LoRA consumer, full fine-tune reload, fp8, resume and previews: tests/test_conformance.py."""
import re

import pytest
import torch
from diffusers import HunyuanImagePipeline
from safetensors.torch import load_file

from difftrain.tiny import hunyuan_image as tiny_hunyuan
from difftrain.tiny import tiny_model
from difftrain.training import build_module, run
from tests.conftest import compose_config

TINY = ("model=hunyuan_image", "model.tiny=true", "model.dtype=float32")
# ComfyUI renames the original names of the checkpoint when it loads it (supported_models, HunyuanVideo's
# process_unet_state_dict); its LoRA keys name the renamed weights. Re-implemented here as the spec.
COMFY_LOAD_RENAMES = (
    ("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."), ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
    ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."),
    ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
    ("_mod.linear.", "_mod.lin."), ("_attn_qkv.", "_attn.qkv."), ("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.2."),
    ("_attn_q_norm.weight", "_attn.norm.query_norm.scale"), ("_attn_k_norm.weight", "_attn.norm.key_norm.scale"),
    (".q_norm.weight", ".norm.query_norm.scale"), (".k_norm.weight", ".norm.key_norm.scale"),
    ("_attn_proj.", "_attn.proj."), (".modulation.linear.", ".modulation.lin."),
    ("_in.mlp.2.", "_in.out_layer."), ("_in.mlp.0.", "_in.in_layer."))
# Every block Linear of ComfyUI's HunyuanImage21 model (docs: lora-formats, layer 2).
COMFY_BLOCK_LINEAR = re.compile(r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02]|mod\.lin)|"
                                r"single_blocks\.\d+\.(linear[12]|modulation\.lin))$")
GLYPH_CAPTION = "dataset.caption_prefix=\"a sign that says 'hi', \""


def comfy_loaded(path) -> dict[str, torch.Tensor]:
    """The file's weights under the names ComfyUI's model gives them."""
    renamed = {}
    for key, tensor in load_file(path).items():
        for old, new in COMFY_LOAD_RENAMES:
            key = key.replace(old, new)
        renamed[key] = tensor
    return renamed


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A short LoRA run at a side (80) no multiple of 32, with aspect-ratio buckets."""
    return run(compose_config(tmp_path_factory.mktemp("hunyuan") / "run", *TINY, "dataset.resolutions=[80]",
                              GLYPH_CAPTION, "adapter.rank=4", "trainer.max_steps=1", "checkpoint_every_n_steps=null"))


@pytest.fixture
def module(tmp_path):
    module = build_module(compose_config(tmp_path / "run", *TINY, "adapter=none"))
    module.configure_model()
    return module.eval()


def test_comfyui_files_hold_the_diffusers_folders_weights(module):
    """The four ComfyUI files a tiny run reads (original layouts) load as the Diffusers folder's models."""
    folder = HunyuanImagePipeline.from_pretrained(tiny_model("hunyuan_image"), local_files_only=True)
    ours = module.pipeline(module.denoiser)
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        expected, loaded = getattr(folder, part).state_dict(), getattr(ours, part).state_dict()
        assert loaded.keys() == expected.keys(), part
        assert all(torch.equal(loaded[k], v) for k, v in expected.items()), f"{part} differs from the folder's"


def test_vae_file_is_in_the_original_stage_layout(module):
    """Original names: per stage `down.S.block.N` (+ `downsample`), `up.S.block.N` (+ `upsample`), not diffusers'
    flat lists; five resamplers on each side for the 32x VAE."""
    keys = load_file(tiny_model("hunyuan_image") / tiny_hunyuan.COMFY_VAE).keys()
    stages = {re.sub(r"\.(norm\d|conv\d?)\.(weight|bias)$", "", k) for k in keys if re.match(r"^\w+\.(down|up)\.", k)}
    expected = {f"encoder.down.{s}.block.0" for s in range(6)} | {f"encoder.down.{s}.downsample" for s in range(5)}
    expected |= {f"decoder.up.{s}.block.{n}" for s in range(6) for n in range(2)}
    expected |= {f"decoder.up.{s}.upsample" for s in range(5)}
    assert stages == expected
    assert module.pipeline(None).vae.config.spatial_compression_ratio == 32


def test_text_conditioning_gives_the_pipelines_prediction(module):
    """Captions cached as the family caches them (cut at the masks, padded per batch) condition the transformer as
    HunyuanImagePipeline.encode_prompt's padded embeddings do; only quoted text reaches ByT5."""
    encoders = module.load_cache_encoders()
    captions = ["a red square", 'a door with a sign that says "open"']
    ours = module.collate_text(encoders.encode_captions(captions))
    assert ours["prompt_embeds_2_mask"].any(1).tolist() == [False, True]
    embeds, mask, glyph_embeds, glyph_mask = encoders.pipe.encode_prompt(captions, device="cpu", batch_size=2)
    assert ours["prompt_embeds"].shape[1] < embeds.shape[1]
    latents = torch.randn(2, tiny_hunyuan.LATENT_CHANNELS, 2, 3, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        theirs = module.denoiser(hidden_states=latents, timestep=sigmas * encoders.pipe.scheduler.config.num_train_timesteps,
                                 encoder_hidden_states=embeds, encoder_attention_mask=mask,
                                 encoder_hidden_states_2=glyph_embeds, encoder_attention_mask_2=glyph_mask,
                                 return_dict=False)[0]
        torch.testing.assert_close(module.predict(latents, sigmas, ours), theirs, rtol=1e-5, atol=1e-5)


def test_buckets_fit_the_32x_vae(lora_run):
    sizes = [tuple(map(int, size.split("x"))) for size in lora_run.datamodule.trained_sizes()]
    assert len(sizes) > 1 and all(w % 32 == 0 and h % 32 == 0 for w, h in sizes), sizes
    batch = next(iter(lora_run.datamodule.train_dataloader()))
    assert batch["latents"].shape[-1] * 32 in {w for w, _ in sizes}


def test_every_lora_key_resolves_to_a_weight_of_the_comfyui_file(lora_run):
    lora = load_file(lora_run.final_export / "adapter_model.safetensors")
    weights = comfy_loaded(tiny_model("hunyuan_image") / tiny_hunyuan.COMFY_TRANSFORMER)
    bases = {key.rsplit(".lora_", 1)[0] for key in lora}
    assert {f"{base}.lora_{ab}.weight" for base in bases for ab in "AB"} == lora.keys()
    for base in bases:
        name = base.removeprefix("diffusion_model.")
        assert base.startswith("diffusion_model.") and f"{name}.weight" in weights, base
        down, up = lora[f"{base}.lora_A.weight"], lora[f"{base}.lora_B.weight"]
        assert down.shape[0] == up.shape[1] and (up.shape[0], down.shape[1]) == weights[f"{name}.weight"].shape, base
    block_linears = {k.removesuffix(".weight") for k in weights if COMFY_BLOCK_LINEAR.match(k.removesuffix(".weight"))}
    assert {base.removeprefix("diffusion_model.") for base in bases} == block_linears


def test_preview_guidance_sets_the_guiders_scale(module):
    """The sample/preview `guidance` (the pipeline's guidance_scale elsewhere) drives HunyuanImage's guiders."""
    pipeline = module.inference_pipeline()
    renders = [module.render("a red square", 64, 64, steps=3, seed=0, guidance=g, pipeline=pipeline) for g in (1.5, 6.0)]
    assert pipeline.guider.guidance_scale == pipeline.ocr_guider.guidance_scale == 6.0
    assert not torch.allclose(torch.from_numpy(renders[0]), torch.from_numpy(renders[1]))
