"""Wan 2.1 / 2.2 through the real trainer, with real consumers: every variant's ComfyUI LoRA is loaded by diffusers'
WanPipeline / WanImageToVideoPipeline (A14B: into its own expert) and reproduces our trained transformer; a full
fine-tune round-trips through diffusers' single-file loader; the key maps agree with diffusers' own converters; fp8
storage; ComfyUI single files as inputs; the tiny A14B checkpoints (T2V, I2V) rebuild byte-identical."""
import json
import re

import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file

from difftrain.config.family import choices, model_keys
from difftrain.formats import wan as formats
from difftrain.modules.wan import FULL_FILE, LORA_FILE, VARIANTS
from difftrain.tiny import tiny_model_dir
from difftrain.tiny import wan as tiny_wan
from difftrain.training import run
from tests.conftest import ROOT

FAST = ("dataset=videos", "model.tiny=true", "model.dtype=float32", "model.max_sequence_length=16",
        "trainer.max_steps=2", "checkpoint_every_n_steps=null", "dataset.frame_buckets=[1,17]")
COMFY_WAN_BLOCK_LINEAR = re.compile(r"^blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.([qkvo]|k_img|v_img)|ffn\.[02])$")
# The consumer each variant's LoRA is made for, the pipeline slot holding the trained expert, and the A14B
# pipelines' boundary_ratio (diffusers' transformer = high-noise expert for t >= boundary, transformer_2 = low-noise).
CONSUMERS = {"wan21_t2v": (WanPipeline, "transformer", None),
             "wan21_i2v": (WanImageToVideoPipeline, "transformer", None),
             "wan22_low": (WanPipeline, "transformer_2", 0.875), "wan22_high": (WanPipeline, "transformer", 0.875),
             "wan22_low_i2v": (WanImageToVideoPipeline, "transformer_2", 0.9),
             "wan22_high_i2v": (WanImageToVideoPipeline, "transformer", 0.9),
             "wan22_5b": (WanPipeline, "transformer", None)}
EXPERT_SLOTS = {"high_noise_model": "transformer", "low_noise_model": "transformer_2"}


def train(make_config, variant, *overrides, run_name="run"):
    return run(make_config(f"model={variant}", *FAST, *overrides, run_name=run_name))


def denoiser_inputs(transformer: WanTransformer3DModel, seed: int = 0) -> dict:
    """A fixed input: 2 latent frames of 4x4, 8 text tokens, 5 image tokens for I2V models."""
    g = torch.Generator().manual_seed(seed)
    config = transformer.config
    inputs = dict(hidden_states=torch.randn(1, config.in_channels, 2, 4, 4, generator=g),
                  timestep=torch.tensor([600.0]), encoder_hidden_states=torch.randn(1, 8, config.text_dim, generator=g),
                  return_dict=False)
    if config.image_dim:
        inputs["encoder_hidden_states_image"] = torch.randn(1, 5, config.image_dim, generator=g)
    return inputs


@torch.no_grad()
def output(transformer: WanTransformer3DModel) -> torch.Tensor:
    return transformer.eval()(**denoiser_inputs(transformer))[0]


def fresh_from_diffusers(native_file, config, tmp_path) -> WanTransformer3DModel:
    """The base transformer read by diffusers' own single-file loader (its converter, not our key map)."""
    WanTransformer3DModel.from_config(config).save_config(tmp_path / "diffusers_config" / "transformer")
    return WanTransformer3DModel.from_single_file(str(native_file), config=str(tmp_path / "diffusers_config"),
                                                  subfolder="transformer", local_files_only=True,
                                                  torch_dtype=torch.float32)


def tiny_dir(name: str):
    return tiny_model_dir(name, tiny_wan.TINY_MODELS[name])


def expert_file(variant: str, expert: str) -> str:
    """The tiny A14B checkpoint's ComfyUI single file of one expert, named like Comfy-Org's repackaged files."""
    task = "i2v" if VARIANTS[variant].i2v else "t2v"
    return f"comfyui/wan2.2_{task}_{expert.removesuffix('_model')}_tiny.safetensors"


def base_native_files(variant: str) -> dict[str, object]:
    """Pipeline slot -> the tiny checkpoint's transformer file for that slot."""
    root = tiny_dir(VARIANTS[variant].tiny)
    if VARIANTS[variant].expert:
        return {slot: root / expert_file(variant, expert) for expert, slot in EXPERT_SLOTS.items()}
    return {"transformer": root / "diffusion_pytorch_model.safetensors"}


def injected_lora_modules(model: torch.nn.Module) -> int:
    return sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_comfyui_lora_loads_in_diffusers_and_reproduces_the_trained_transformer(make_config, tmp_path, variant):
    result = train(make_config, variant, "adapter.rank=4", "adapter.alpha=8", "optimizer.lr=1e-2")
    ours = result.module.denoiser
    assert any(p.abs().sum() > 0 for n, p in ours.named_parameters() if "lora_B" in n), "no LoRA update"

    lora_file = result.final_export / LORA_FILE
    lora = load_file(lora_file)
    modules = {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] for k in lora}
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora)
    assert all(COMFY_WAN_BLOCK_LINEAR.match(m) for m in modules), sorted(modules)
    assert any(".k_img" in m for m in modules) == VARIANTS[variant].clip
    with safe_open(lora_file, "pt") as f:
        assert all(key == "format" or key.startswith("difftrain.") for key in f.metadata())  # no foreign keys

    pipeline_cls, slot, boundary = CONSUMERS[variant]
    if VARIANTS[variant].expert:  # trained on the part of the schedule the pipeline gives this expert
        assert EXPERT_SLOTS[VARIANTS[variant].expert] == slot
        trained_range = (result.module.timesteps.min_t, result.module.timesteps.max_t)
        assert trained_range == ((boundary, 1.0) if slot == "transformer" else (0.0, boundary))
    parts = {s: fresh_from_diffusers(path, ours.config, tmp_path / s) for s, path in base_native_files(variant).items()}
    untouched = {s: output(m) for s, m in parts.items() if s != slot}
    pipe = pipeline_cls(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                        **parts, **({"boundary_ratio": boundary} if boundary else {}))
    assert pipe.config.boundary_ratio == boundary
    base = output(pipe.components[slot])
    pipe.load_lora_weights(str(lora_file), load_into_transformer_2=slot == "transformer_2")

    assert injected_lora_modules(pipe.components[slot]) == len(modules)  # every LoRA module found its target
    theirs = output(pipe.components[slot])
    assert not torch.allclose(theirs, base, atol=1e-4), "the LoRA changed nothing"
    torch.testing.assert_close(theirs, output(ours), rtol=1e-5, atol=1e-5)
    for other, before in untouched.items():  # the other A14B expert is not touched
        torch.testing.assert_close(output(pipe.components[other]), before)


@pytest.mark.parametrize("variant", ["wan21_i2v", "wan22_low_i2v", "wan22_high_i2v", "wan22_5b"])
def test_full_finetune_exports_a_comfyui_file_diffusers_loads_with_identical_weights(make_config, variant):
    result = train(make_config, variant, "adapter=none", "optimizer.lr=1e-3")
    trained = result.module.denoiser.state_dict()
    exported = load_file(result.final_export / FULL_FILE)
    block_linears = {k.rsplit(".", 1)[0] for k in exported if k.startswith("blocks.") and k.endswith(".weight")
                     and exported[k].ndim == 2}
    assert block_linears and all(COMFY_WAN_BLOCK_LINEAR.match(k) for k in block_linears), sorted(block_linears)

    reloaded = WanTransformer3DModel.from_single_file(str(result.final_export / FULL_FILE),
                                                      config=str(result.final_export), subfolder="transformer",
                                                      local_files_only=True, torch_dtype=torch.float32).state_dict()
    original = formats.load_transformer(base_native_files(variant)[CONSUMERS[variant][1]], torch.float32, 2)
    original = original.state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in trained), "full fine-tune changed no weight"
    assert reloaded.keys() == trained.keys()
    for key, tensor in trained.items():
        assert torch.equal(reloaded[key], tensor), key


@pytest.mark.parametrize("tiny,subfolder", [("wan21_t2v", ""), ("wan21_i2v", ""),
                                            ("wan22_a14b_i2v", "low_noise_model")])
def test_transformer_key_map_agrees_with_diffusers_converter(tiny, subfolder):
    model = formats.load_transformer(tiny_dir(tiny) / subfolder, torch.float32, 2)
    native = formats.transformer_to_native(model.state_dict())
    assert native.keys() >= {"blocks.0.self_attn.q.weight", "blocks.0.cross_attn.o.weight", "blocks.0.ffn.0.weight",
                             "blocks.0.norm3.weight", "blocks.0.modulation", "head.head.weight", "text_embedding.0.weight"}
    converted = convert_wan_transformer_to_diffusers(dict(native))
    assert converted.keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():
        assert torch.equal(converted[key], tensor), key


def test_vae_key_map_agrees_with_diffusers_converter():
    vae = tiny_wan.vae21()
    native = formats.vae_to_native(vae.state_dict(), vae.config)
    converted = convert_wan_vae_to_diffusers(dict(native))
    assert converted.keys() == vae.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in vae.state_dict().items())


@pytest.mark.parametrize("build", [tiny_wan.vae21, tiny_wan.vae22])
def test_original_vae_file_loads_into_the_same_autoencoder(tmp_path, build):
    vae = build()
    torch.save(formats.vae_to_native(vae.state_dict(), vae.config), tmp_path / "vae.pth")
    loaded = formats.load_vae(tmp_path / "vae.pth", torch.float32)
    settings = lambda model: {k: v for k, v in model.config.items() if not k.startswith("_")}  # noqa: E731
    assert isinstance(loaded, AutoencoderKLWan) and settings(loaded) == settings(vae)
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(video).latent_dist.mode(), vae.encode(video).latent_dist.mode())


def test_original_and_comfyui_text_encoder_files_give_the_same_embeddings():
    root = tiny_dir("wan21_t2v")
    original = formats.load_umt5(root / tiny_wan.T5_FILE, torch.float32)
    comfy = formats.load_umt5(root / tiny_wan.COMFY_T5_FILE, torch.float32)
    ids = torch.tensor([[7, 8, 9, 1, 0]])
    mask = (ids > 0).long()
    torch.testing.assert_close(original(ids, mask).last_hidden_state, comfy(ids, mask).last_hidden_state)


@pytest.mark.parametrize("variant", ["wan21_t2v", "wan22_low", "wan22_high", "wan22_low_i2v", "wan22_high_i2v"])
def test_comfyui_single_files_load_the_same_weights_as_the_checkpoint_folder(make_config, variant):
    root = tiny_dir(VARIANTS[variant].tiny)
    expert = VARIANTS[variant].expert
    comfy = root / (expert_file(variant, expert) if expert else "comfyui/wan2.1_t2v_tiny.safetensors")
    folder = train(make_config, variant, "adapter=none", "trainer.max_steps=0", run_name="folder")
    single = train(make_config, variant, "adapter=none", "trainer.max_steps=0", f"model.transformer_path={comfy}",
                   f"model.llm_path={root / tiny_wan.COMFY_T5_FILE}", run_name="single")
    expected = folder.module.denoiser.state_dict()
    assert single.module.denoiser.state_dict().keys() == expected.keys()
    for key, tensor in single.module.denoiser.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    if expert:  # the variant picks its own expert from the A14B folder
        own = formats.load_transformer(root / expert, torch.float32).state_dict()
        assert all(torch.equal(own[k], v) for k, v in expected.items())


@pytest.mark.parametrize("variant,in_dim", [("wan22_low", 16), ("wan22_low_i2v", 36)])
def test_tiny_a14b_checkpoint_is_the_original_layout_and_rebuilds_byte_identical(tmp_path, variant, in_dim):
    tiny = VARIANTS[variant].tiny
    cached = tiny_dir(tiny)
    getattr(tiny_wan, f"build_{tiny}")(tmp_path)
    files = sorted(p.relative_to(cached) for p in cached.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert {str(f) for f in files} >= {"Wan2.1_VAE.pth", tiny_wan.T5_FILE, "low_noise_model/config.json",
                                       "low_noise_model/diffusion_pytorch_model.safetensors",
                                       "high_noise_model/diffusion_pytorch_model.safetensors",
                                       *(expert_file(variant, expert) for expert in EXPERT_SLOTS)}
    assert not any(str(f).startswith(tiny_wan.CLIP_DIR) for f in files)  # Wan2.2 has no image encoder
    for f in files:
        assert (cached / f).read_bytes() == (tmp_path / f).read_bytes(), f
    for expert in EXPERT_SLOTS:
        config = json.loads((cached / expert / "config.json").read_text())
        assert (config["in_dim"], config["model_type"]) == (in_dim, "i2v" if VARIANTS[variant].i2v else "t2v")


def test_every_variant_has_a_config_file_and_is_known_to_the_schema():
    assert set(choices(model_keys("difftrain.modules.wan.WanModule")["variant"].annotation)) == set(VARIANTS)
    assert {p.stem for p in (ROOT / "conf" / "model").glob("wan*.yaml")} == set(VARIANTS)
