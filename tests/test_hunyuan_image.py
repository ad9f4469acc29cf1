"""HunyuanImage-2.1 specifics: ComfyUI's files (with or without a Diffusers folder; configs read off their shapes,
also at the released size), the text conditioning, the 32x buckets and ComfyUI's LoRA names.
LoRA consumer, full fine-tune reload, fp8, resume and previews: tests/test_conformance.py."""
import json
import re

import pytest
import torch
from diffusers import AutoencoderKLHunyuanImage, HunyuanImagePipeline, HunyuanImageTransformer2DModel
from safetensors.torch import load_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, T5Config, T5EncoderModel

from difftrain.config.errors import ConfigError
from difftrain.config.validate import validate
from difftrain.formats import hunyuan_image as formats
from difftrain.formats.qwen_image import text_encoder_to_original
from difftrain.modules.base import skeleton
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
CAPTIONS = ["a red square", 'a door with a sign that says "open", “出口” and ‘EXIT’']
# HunyuanImage-2.1's released transformer (hunyuanvideo-community/HunyuanImage-2.1-Diffusers transformer/config.json:
# diffusers' defaults but the ByT5 width) and VAE (Tencent's vae config.json); ByT5's shapes (byt5_small_glyphxl).
REAL_TRANSFORMER = dict(text_embed_2_dim=1472)
REAL_VAE = dict(in_channels=3, out_channels=3, latent_channels=64, block_out_channels=[128, 256, 512, 512, 1024, 1024],
                layers_per_block=2, spatial_compression_ratio=32, sample_size=384, scaling_factor=0.75289,
                downsample_match_channel=True, upsample_match_channel=True)
# Qwen2.5-VL-7B-Instruct's shapes (its config.json; the rest is formats' constants).
REAL_QWEN_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4)
REAL_QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584)
REAL_BYT5_SHAPES = dict(vocab_size=1510, d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_heads=6,
                        relative_attention_num_buckets=32)


def comfyui_files() -> tuple[str, ...]:
    """The four ComfyUI files alone (no folder), and the tiny tokenizer folder: tests are offline."""
    root = tiny_model("hunyuan_image")
    return ("model=hunyuan_image", "model.dtype=float32", f"model.transformer_path={root / tiny_hunyuan.COMFY_TRANSFORMER}",
            f"model.vae_path={root / tiny_hunyuan.COMFY_VAE}", f"model.text_encoder_path={root / tiny_hunyuan.COMFY_TEXT_ENCODER}",
            f"model.byt5_path={root / tiny_hunyuan.COMFY_BYT5}", f"model.tokenizer_path={root / 'tokenizer'}")


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


@pytest.fixture(scope="module")
def files_alone(tmp_path_factory):
    module = build_module(compose_config(tmp_path_factory.mktemp("alone") / "run", *comfyui_files(), "adapter=none"))
    module.configure_model()
    return module.eval()


@torch.no_grad()
def test_comfyui_files_alone_encode_and_denoise_as_the_folder(module, files_alone):
    """Configs read off the files, ByT5's tokenizer built in code and the Qwen tokenizer from tokenizer_path: the
    same cached embeddings (Qwen and ByT5) and the same prediction as the tiny Diffusers folder."""
    assert files_alone.model_dir is None
    pipes = [m.load_cache_encoders().pipe for m in (module, files_alone)]
    assert pipes[1].tokenizer_2(CAPTIONS).input_ids == pipes[0].tokenizer_2(CAPTIONS).input_ids
    expected, actual = (m.load_cache_encoders().encode_captions(CAPTIONS) for m in (module, files_alone))
    for theirs, ours in zip(expected, actual):
        for key in ("prompt_embeds", "prompt_embeds_2"):
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)
    text = module.collate_text(expected)
    latents = torch.randn(2, tiny_hunyuan.LATENT_CHANNELS, 2, 3, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8])
    torch.testing.assert_close(files_alone.predict(latents, t, text), module.predict(latents, t, text),
                               rtol=0, atol=1e-6)


def test_lora_trains_from_the_comfyui_files_alone(make_config):
    result = run(make_config(*comfyui_files(), "dataset.resolutions=[64]", "adapter.rank=4", "trainer.max_steps=2",
                             "checkpoint_every_n_steps=null"))
    assert result.trainer.global_step == 2
    assert torch.isfinite(result.trainer.callback_metrics["train/loss"])


def test_without_folder_or_all_four_files_the_error_names_the_missing_files(tmp_path):
    with pytest.raises(ConfigError, match=r"diffusers_path is not set, nor model.text_encoder_path and "
                                          r"model.byt5_path"):
        build_module(compose_config(tmp_path / "run", *comfyui_files()[:4]))


def test_the_qwen_tokenizer_defaults_to_its_repo_id_which_offline_asks_for_a_folder(tmp_path):
    """Validation accepts the repo id (downloaded when online); offline, loading it is a one-line error."""
    config = compose_config(tmp_path / "run", *comfyui_files()[:-1])
    validate(config)
    module = build_module(config)
    with pytest.raises(ConfigError, match=r"^model.tokenizer_path=Qwen/Qwen2.5-VL-7B-Instruct: .*set "
                                          r"model.tokenizer_path to a folder[^\n]*$"):
        module.load_tokenizers()


def public(config) -> dict:
    """A config's init values, tuples as lists."""
    return json.loads(json.dumps({key: value for key, value in dict(config).items() if not key.startswith("_")}))


def test_configs_read_off_the_released_shapes():
    """At the real size, on meta tensors: the configs read off the original keys and shapes are the released
    transformer's (diffusers' HunyuanImageTransformer2DModel), VAE's, Qwen2.5-VL-7B's and ByT5's."""
    transformer = skeleton(HunyuanImageTransformer2DModel, REAL_TRANSFORMER)
    native = formats.TRANSFORMER.to_native(transformer.state_dict(), "the released transformer")
    assert public(formats.transformer_config(native)) == public(transformer.config)
    vae = skeleton(AutoencoderKLHunyuanImage, REAL_VAE)
    assert public(formats.vae_config(formats.vae_to_original(vae))) == public(vae.config)
    with torch.device("meta"):
        byt5 = T5EncoderModel(T5Config(**REAL_BYT5_SHAPES, **formats.BYT5_CONSTANTS))
        qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config={**REAL_QWEN_TEXT, **formats.QWEN_TEXT_CONSTANTS},
            vision_config={**REAL_QWEN_VISION, **formats.QWEN_VISION_CONSTANTS}, **formats.QWEN_TOKEN_IDS))
    read = formats.byt5_config(byt5.state_dict())
    assert {key: getattr(read, key) for key in REAL_BYT5_SHAPES} == REAL_BYT5_SHAPES
    read = formats.qwen_config(text_encoder_to_original(qwen.state_dict()))
    assert read.text_config.to_dict() == qwen.config.text_config.to_dict()
    assert read.vision_config.to_dict() == qwen.config.vision_config.to_dict()
