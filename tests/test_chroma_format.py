"""Chroma's native (ComfyUI) single-file layout and ComfyUI-format LoRA: checked against diffusers' own single-file
converter at the real sizes, round-trips at tiny size, and the fused LoRA rule (fused qkv / linear1) both ways, with
diffusers' `load_lora_adapter` as the consumer of what our reader gives back."""
import copy
import re

import pytest
import torch
from diffusers import ChromaTransformer2DModel
from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from difftrain.formats.chroma import (
    CHROMA,
    load_chroma_transformer,
    lora_from_comfyui,
    lora_to_comfyui,
    save_chroma_transformer,
    transformer_config,
)
from difftrain.tiny import chroma as tiny_chroma

# The released Chroma's widths (diffusers' converter hard-codes them), one block of each kind.
REAL_CONFIG = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=1, num_single_layers=1,
                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                   axes_dims_rope=[16, 56, 56], approximator_num_channels=64, approximator_hidden_dim=5120,
                   approximator_layers=1)
TINY_AXES = tiny_chroma.TRANSFORMER_CONFIG["axes_dims_rope"]
# ComfyUI's native names of Chroma's block Linears (lora-formats.md, Layer 2; Chroma has no `_mod` / `modulation`).
COMFY_BLOCK_LINEAR = re.compile(r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])|single_blocks\.\d+\."
                                r"linear[12])$")


@pytest.fixture
def model():
    model = tiny_chroma.transformer()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random values everywhere, so that norm gains (ones by default) would show
        for parameter in model.parameters():
            parameter.normal_(generator=g)
    return model


def assert_same_tensors(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].shape == tensor.shape and torch.equal(actual[key], tensor), key


@torch.no_grad()
def forward(model):
    g = torch.Generator().manual_seed(1)
    return model(hidden_states=torch.randn(1, 6, 64, generator=g), encoder_hidden_states=torch.randn(1, 4, 32, generator=g),
                 timestep=torch.tensor([0.5]), img_ids=torch.randn(6, 3, generator=g), txt_ids=torch.zeros(4, 3)).sample


def test_map_matches_diffusers_converter_at_real_size():
    with torch.device("meta"):
        shapes = ChromaTransformer2DModel(**REAL_CONFIG).state_dict()
    # Real shapes at little memory: each row holds one random int8, broadcast along the row, so values check the
    # row order of every concat and split.
    g = torch.Generator().manual_seed(0)
    state_dict = {key: torch.randint(-128, 128, (meta.shape[0],) + (1,) * (meta.dim() - 1), dtype=torch.int8,
                                     generator=g).expand(meta.shape) for key, meta in shapes.items()}
    native = CHROMA.to_native(state_dict, "test")
    assert transformer_config(native) == REAL_CONFIG

    checkpoint = {"model.diffusion_model." + key: tensor for key, tensor in native.items()}
    converted = convert_chroma_transformer_checkpoint_to_diffusers(checkpoint)
    assert checkpoint == {}  # diffusers' converter consumed every native key
    assert_same_tensors(converted, state_dict)
    assert_same_tensors(CHROMA.to_diffusers(native, "test"), state_dict)


def test_native_round_trip_is_exact_and_the_file_loads_the_same_model(model, tmp_path):
    state_dict = model.state_dict()
    native = CHROMA.to_native(state_dict, "test")
    assert_same_tensors(CHROMA.to_native(CHROMA.to_diffusers(native, "test"), "test"), native)

    path = tmp_path / "chroma.safetensors"
    save_chroma_transformer(state_dict, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # atomic: no temp file left
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in load_file(path).items()},
              tmp_path / "comfy.safetensors")
    for file in (path, tmp_path / "comfy.safetensors"):
        loaded = load_chroma_transformer(file, torch.float32, TINY_AXES)
        assert loaded.config.approximator_layers == 1 and loaded.config.num_single_layers == 2
        assert_same_tensors(loaded.state_dict(), state_dict)
        assert torch.equal(forward(loaded), forward(model))


def test_refused_files_are_named(model, tmp_path):
    native = CHROMA.to_native(model.state_dict(), "test")
    scaled = tmp_path / "chroma_fp8_scaled.safetensors"
    save_file({**native, "single_blocks.0.linear1.scale_weight": torch.ones(())}, scaled)
    with pytest.raises(ValueError, match=rf"{re.escape(str(scaled))}.*fp8-scaled.*linear1\.scale_weight"):
        load_chroma_transformer(scaled, torch.float32, TINY_AXES)

    extra = tmp_path / "extra.safetensors"
    save_file({**native, "double_blocks.0.img_mod.lin.weight": torch.ones(1)}, extra)
    with pytest.raises(ValueError, match=rf"{re.escape(str(extra))}.*double_blocks\.0\.img_mod\.lin\.weight"):
        load_chroma_transformer(extra, torch.float32, TINY_AXES)
    with pytest.raises(ValueError, match=r"do not sum to .* head width 16"):
        load_chroma_transformer(extra, torch.float32)  # the released Chroma's rotary axes


def block_lora(model, rank=2, skip=("single_transformer_blocks.0.proj_mlp", "transformer_blocks.1.attn.add_k_proj")):
    """Random LoRA on every block Linear (as the family targets them) except `skip`."""
    g = torch.Generator().manual_seed(2)
    lora = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "transformer_blocks." in name and name not in skip:
            lora[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g)
            lora[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g)
    return lora


def deltas(lora):
    return {key.removesuffix(".lora_A.weight"): lora[key.replace("lora_A", "lora_B")] @ down
            for key, down in lora.items() if key.endswith(".lora_A.weight")}


def test_fused_lora_equals_the_stacked_deltas_and_reads_back_exactly(model):
    lora = block_lora(model)
    native = lora_to_comfyui(lora)
    modules = {key.removeprefix("diffusion_model.").rsplit(".", 2)[0] for key in native}
    assert all(key.startswith("diffusion_model.") and key.endswith((".lora_A.weight", ".lora_B.weight"))
               for key in native)
    assert all(COMFY_BLOCK_LINEAR.match(module) for module in modules), sorted(modules)
    native_weights = CHROMA.to_native(model.state_dict(), "test")
    assert modules == {key.removesuffix(".weight") for key in native_weights
                       if COMFY_BLOCK_LINEAR.match(key.removesuffix(".weight"))}  # every block Linear, once
    assert native["diffusion_model.single_blocks.0.linear1.lora_A.weight"].shape[0] == 3 * 2  # q, k, v: no MLP part

    # Each part's delta (zero for a part without LoRA) in the model's own layout, mapped to native names.
    weights = {f"{name}.weight": module.weight for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and "transformer_blocks." in name}
    part_deltas = {key: torch.zeros_like(weight) for key, weight in weights.items()}
    part_deltas.update({f"{module}.weight": delta for module, delta in deltas(lora).items()})
    expected = CHROMA.to_native(part_deltas, "deltas")
    fused_deltas = deltas({key.removeprefix("diffusion_model."): tensor for key, tensor in native.items()})
    assert fused_deltas.keys() == {key.removesuffix(".weight") for key in expected}
    for module, delta in fused_deltas.items():
        torch.testing.assert_close(delta, expected[f"{module}.weight"], rtol=0, atol=0)

    read_back = deltas(lora_from_comfyui(native))
    for module, delta in deltas(lora).items():
        torch.testing.assert_close(read_back[module], delta, rtol=0, atol=0)
    assert not read_back["single_transformer_blocks.0.proj_mlp"].any()  # the part without LoRA stays untouched


def test_our_reader_gives_a_lora_diffusers_loads_with_the_exported_effect():
    model = tiny_chroma.transformer()  # initialised as for training: activations stay in a sane range
    lora = {key: tensor * 0.1 for key, tensor in block_lora(model, skip=()).items()}
    base = forward(model)
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for module, delta in deltas(lora).items():
            merged.get_submodule(module).weight += delta

    model.load_lora_adapter(lora_from_comfyui(lora_to_comfyui(lora)), prefix=None, adapter_name="exported")
    injected = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and "exported" in m.lora_A)
    assert injected == len(deltas(lora))
    assert not torch.allclose(forward(model), base, atol=1e-3), "the LoRA changed nothing"
    torch.testing.assert_close(forward(model), forward(merged), rtol=1e-5, atol=1e-5)


def test_tiny_chroma_file_is_deterministic_and_loads_as_the_tiny_transformer(tmp_path):
    tiny_chroma.TINY_MODELS["chroma"](tmp_path / "a")
    tiny_chroma.build(tmp_path / "b")
    written = tmp_path / "a" / tiny_chroma.TRANSFORMER_FILE
    assert written.read_bytes() == (tmp_path / "b" / tiny_chroma.TRANSFORMER_FILE).read_bytes()
    loaded = load_chroma_transformer(written, torch.float32, TINY_AXES)
    assert_same_tensors(loaded.state_dict(), tiny_chroma.transformer().state_dict())
    assert {k: v for k, v in loaded.config.items() if k in tiny_chroma.TRANSFORMER_CONFIG} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in tiny_chroma.TRANSFORMER_CONFIG.items()}
