"""keymap.py's rules on a small synthetic map: renames with block indices, parameter renames, fused Linears, row
transforms, the unknown-key error, and the fused LoRA rule (exact both ways)."""
import re

import pytest
import torch

from difftrain.formats.keymap import Fused, KeyMap, block_count, rms_scales, swap_halves, widths, within

WIDTH = 4
BLOCK, LAYER = "blocks.{i}.", "layers.{i}."
MAP = KeyMap(
    modules={"embed": "embedder", "head": "norm_out.linear", **within(BLOCK, LAYER, {"out": "attn.to_out.0"})},
    params={**rms_scales(within(BLOCK, LAYER, {"norm": "attn.norm_q"})), BLOCK + "table": LAYER + "scale_shift_table"},
    fused={BLOCK + "qkv_mlp": Fused(tuple(LAYER + p for p in ("to_q", "to_k", "to_v", "mlp")), widths(1, 1, 1, 2))},
    transforms={"head": swap_halves},
)
PARTS = ("to_q", "to_k", "to_v", "mlp")
ROWS = dict(to_q=WIDTH, to_k=WIDTH, to_v=WIDTH, mlp=2 * WIDTH)


def diffusers_state_dict(blocks=(0, 1, 2)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"embedder.weight": (WIDTH, 3), "embedder.bias": (WIDTH,), "norm_out.linear.weight": (2 * WIDTH, WIDTH),
              "norm_out.linear.bias": (2 * WIDTH,)}
    for i in blocks:
        shapes |= {f"layers.{i}.attn.to_out.0.weight": (WIDTH, WIDTH), f"layers.{i}.attn.to_out.0.bias": (WIDTH,),
                   f"layers.{i}.attn.norm_q.weight": (WIDTH,),
                   f"layers.{i}.scale_shift_table": (1, 6, WIDTH)}
        shapes |= {f"layers.{i}.{p}.{param}": (ROWS[p], WIDTH)[:dims] for p in PARTS
                   for param, dims in (("weight", 2), ("bias", 1))}
    return {key: torch.randn(shape, generator=g) for key, shape in shapes.items()}


def lora_of(state_dict, modules, rank=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module in modules:
        rows, cols = state_dict[f"{module}.weight"].shape
        out[f"{module}.lora_A.weight"] = torch.randn(rank, cols, generator=g)
        out[f"{module}.lora_B.weight"] = torch.randn(rows, rank, generator=g)
    return out


def delta(lora, module):
    return lora[f"{module}.lora_B.weight"] @ lora[f"{module}.lora_A.weight"]


def test_renames_params_fused_and_transform_in_both_directions():
    diffusers = diffusers_state_dict()
    native = MAP.to_native(diffusers, "test")
    assert sorted(native) == sorted(
        ["embed.weight", "embed.bias", "head.weight", "head.bias"]
        + [f"blocks.{i}.{name}" for i in range(3) for name in ("out.weight", "out.bias", "norm.scale", "table",
                                                              "qkv_mlp.weight", "qkv_mlp.bias")])
    assert torch.equal(native["blocks.1.norm.scale"], diffusers["layers.1.attn.norm_q.weight"])
    assert torch.equal(native["blocks.2.table"], diffusers["layers.2.scale_shift_table"])
    assert torch.equal(native["blocks.0.qkv_mlp.weight"], torch.cat([diffusers[f"layers.0.{p}.weight"] for p in PARTS]))
    assert torch.equal(native["head.bias"], torch.cat([diffusers["norm_out.linear.bias"][WIDTH:],
                                                       diffusers["norm_out.linear.bias"][:WIDTH]]))
    back = MAP.to_diffusers(native, "test")
    assert back.keys() == diffusers.keys() and all(torch.equal(back[k], v) for k, v in diffusers.items())


def test_block_indices_come_from_the_keys():
    diffusers = diffusers_state_dict(blocks=(0, 5))
    native = MAP.to_native(diffusers, "test")
    assert block_count(native, "blocks.") == 6 and block_count(native, "missing.") == 0
    assert {key.split(".")[1] for key in native if key.startswith("blocks.")} == {"0", "5"}
    assert MAP.to_diffusers(native, "test").keys() == diffusers.keys()


def test_unknown_and_unconsumed_keys_are_one_error_naming_them():
    native = MAP.to_native(diffusers_state_dict(), "test")
    with pytest.raises(ValueError, match=r"^my\.safetensors: .*blocks\.0\.extra\.weight, stray$"):
        MAP.to_diffusers({**native, "blocks.0.extra.weight": torch.ones(1), "stray": torch.ones(1)}, "my.safetensors")
    incomplete = diffusers_state_dict()
    del incomplete["layers.1.mlp.bias"]  # the fused bias cannot be built without every part
    with pytest.raises(ValueError, match=re.escape("layers.1.to_k.bias, layers.1.to_q.bias, layers.1.to_v.bias")):
        MAP.to_native(incomplete, "test")
    wrong_rows = {**native, "blocks.0.qkv_mlp.weight": native["blocks.0.qkv_mlp.weight"][1:]}
    with pytest.raises(ValueError, match=r"cannot split blocks\.0\.qkv_mlp\.weight of shape \(19, 4\)"):
        MAP.to_diffusers(wrong_rows, "test")


def test_fused_lora_is_exact_both_ways_with_a_part_missing():
    weights = diffusers_state_dict()
    modules = ["embedder", "norm_out.linear", "layers.0.attn.to_out.0", "layers.0.to_q", "layers.0.to_k",
               "layers.0.to_v", "layers.1.to_v", "layers.1.mlp"]  # layers.0.mlp, layers.1.to_q/k: no LoRA
    lora = {**lora_of(weights, modules[:-1]), **lora_of(weights, modules[-1:], rank=3, seed=2)}  # ranks may differ
    native = MAP.lora_to_native(lora, "test", prefix="net.")
    assert {key.rsplit(".", 2)[0] for key in native} == {"net.embed", "net.head", "net.blocks.0.out",
                                                         "net.blocks.0.qkv_mlp", "net.blocks.1.qkv_mlp"}
    assert native["net.blocks.0.qkv_mlp.lora_A.weight"].shape == (3 * 2, WIDTH)  # parts' A stacked on the rank axis
    assert native["net.blocks.1.qkv_mlp.lora_B.weight"].shape == (5 * WIDTH, 2 + 3)

    # Adding the native LoRA to the native weights is adding each part's delta (zero where it has none).
    updated = {key: tensor.clone() for key, tensor in weights.items()}
    for module in modules:
        updated[f"{module}.weight"] += delta(lora, module)
    native_updated = MAP.to_native(weights, "test")
    for key in [k for k in native if k.endswith(".lora_A.weight")]:
        module = key.removeprefix("net.").removesuffix(".lora_A.weight")
        native_updated[f"{module}.weight"] += delta(native, "net." + module)
    expected = MAP.to_native(updated, "test")
    assert native_updated.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(native_updated[key], tensor, rtol=0, atol=1e-6, msg=key)

    read_back = MAP.lora_to_diffusers(native, "test", prefix="net.")
    for module in modules:
        torch.testing.assert_close(delta(read_back, module), delta(lora, module), rtol=0, atol=1e-6)
    assert not delta(read_back, "layers.0.mlp").any() and not delta(read_back, "layers.1.to_q").any()


def test_lora_keys_outside_the_map_or_prefix_are_refused():
    lora = lora_of(diffusers_state_dict(), ["embedder"])
    with pytest.raises(ValueError, match=r"the LoRA: .*layers\.0\.unknown\.lora_A\.weight"):
        MAP.lora_to_native({**lora, "layers.0.unknown.lora_A.weight": torch.ones(1, 1)}, "the LoRA")
    with pytest.raises(ValueError, match=r"embedder\.lora_B\.weight"):  # A without B
        MAP.lora_to_native({"embedder.lora_B.weight": lora["embedder.lora_B.weight"]}, "the LoRA")
    native = MAP.lora_to_native(lora, "the LoRA")
    assert sorted(native) == ["diffusion_model.embed.lora_A.weight", "diffusion_model.embed.lora_B.weight"]
    with pytest.raises(ValueError, match=r"without diffusion_model\..*embed\.lora_A\.weight"):
        MAP.lora_to_diffusers({k.removeprefix("diffusion_model."): v for k, v in native.items()}, "the LoRA")
