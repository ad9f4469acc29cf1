"""Flux transformer weights in the Black Forest Labs (BFL) single-file layout.

Training runs on diffusers' ``FluxTransformer2DModel``; full fine-tunes are exchanged as
BFL single files, the layout ComfyUI and the reference ``flux`` repo read. diffusers' own
``from_single_file`` hard-codes the 12B sizes, so this map derives every split from tensor
shapes and works for any hidden size and block count. Both directions are exact and refuse
keys they do not know.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file

from src.utils.atomic import save_safetensors

from .single_file import build_with_weights, preview

StateDict = dict[str, torch.Tensor]
# Given the fused weight's shape, the row count of each part, in concatenation order.
Splitter = Callable[[torch.Size], list[int]]


def _equal_thirds(shape: torch.Size) -> list[int]:
    return [shape[0] // 3] * 3


def _qkv_then_mlp(shape: torch.Size) -> list[int]:
    hidden = shape[1]
    return [hidden] * 3 + [shape[0] - 3 * hidden]


@dataclass(frozen=True)
class _Layout:
    """BFL -> diffusers names within one scope: the top level, a double block or a single block."""

    linears: Mapping[str, str]  # module renames; `.weight` and `.bias` keep their names
    norms: Mapping[str, str]  # RMSNorm gains: BFL `<name>.scale` <-> diffusers `<name>.weight`
    fused: Mapping[str, tuple[tuple[str, ...], Splitter]]  # one BFL Linear = diffusers Linears stacked on dim 0


_TOP = _Layout(
    linears={
        "img_in": "x_embedder",
        "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer.linear": "proj_out",
        "final_layer.adaLN_modulation.1": "norm_out.linear",
    },
    norms={},
    fused={},
)

_DOUBLE = _Layout(
    linears={
        "img_mod.lin": "norm1.linear",
        "txt_mod.lin": "norm1_context.linear",
        "img_attn.proj": "attn.to_out.0",
        "txt_attn.proj": "attn.to_add_out",
        "img_mlp.0": "ff.net.0.proj",
        "img_mlp.2": "ff.net.2",
        "txt_mlp.0": "ff_context.net.0.proj",
        "txt_mlp.2": "ff_context.net.2",
    },
    norms={
        "img_attn.norm.query_norm": "attn.norm_q",
        "img_attn.norm.key_norm": "attn.norm_k",
        "txt_attn.norm.query_norm": "attn.norm_added_q",
        "txt_attn.norm.key_norm": "attn.norm_added_k",
    },
    fused={
        "img_attn.qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), _equal_thirds),
        "txt_attn.qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), _equal_thirds),
    },
)

_SINGLE = _Layout(
    linears={"linear2": "proj_out", "modulation.lin": "norm.linear"},
    norms={"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"},
    fused={"linear1": (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), _qkv_then_mlp)},
)

# diffusers' AdaLayerNormContinuous emits (scale, shift); BFL's final layer emits (shift, scale).
_SWAPPED_HALVES = {"final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}

_LINEAR_PARAMS = ("weight", "bias")
_BFL_PREFIX = re.compile(r"^(model\.)?diffusion_model\.")
_FP8_SCALE_SUFFIXES = ("scale_weight", ".scale_input")


@dataclass(frozen=True)
class _FusedGroup:
    bfl: str  # BFL module
    parts: tuple[str, ...]  # diffusers modules, in concatenation order
    split: Splitter


def _plan(double_ids: Iterable[int], single_ids: Iterable[int]) -> tuple[dict[str, str], list[_FusedGroup]]:
    """Full-key renames (BFL -> diffusers) and fused groups for a model with these blocks."""
    scopes = [("", "", _TOP)]
    scopes += [(f"double_blocks.{i}.", f"transformer_blocks.{i}.", _DOUBLE) for i in double_ids]
    scopes += [(f"single_blocks.{i}.", f"single_transformer_blocks.{i}.", _SINGLE) for i in single_ids]
    renames: dict[str, str] = {}
    fused: list[_FusedGroup] = []
    for bfl_prefix, diffusers_prefix, layout in scopes:
        for bfl, diffusers in layout.linears.items():
            for param in _LINEAR_PARAMS:
                renames[f"{bfl_prefix}{bfl}.{param}"] = f"{diffusers_prefix}{diffusers}.{param}"
        for bfl, diffusers in layout.norms.items():
            renames[f"{bfl_prefix}{bfl}.scale"] = f"{diffusers_prefix}{diffusers}.weight"
        for bfl, (parts, split) in layout.fused.items():
            fused.append(_FusedGroup(bfl_prefix + bfl, tuple(diffusers_prefix + part for part in parts), split))
    return renames, fused


def _block_ids(state_dict: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(match.group(1)) for key in state_dict if (match := pattern.match(key))})


def _orient(bfl_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Swap the halves where the layouts disagree; the swap is its own inverse."""
    if bfl_key not in _SWAPPED_HALVES:
        return tensor
    first, second = tensor.chunk(2)
    return torch.cat([second, first])


def _split(key: str, tensor: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    if min(sizes) <= 0 or sum(sizes) != tensor.shape[0]:
        raise ValueError(f"cannot split {key} of shape {tuple(tensor.shape)} into parts of {sizes} rows")
    return tensor.split(sizes)


def _require_consumed(remaining: Mapping[str, torch.Tensor], layout: str) -> None:
    if remaining:
        raise ValueError(
            f"unmapped {layout} Flux transformer keys (unknown, or part of an incomplete fused group): "
            f"{preview(sorted(remaining))}"
        )


def diffusers_to_bfl(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """diffusers ``FluxTransformer2DModel`` state dict -> BFL keys (bare, without a prefix)."""
    remaining = dict(state_dict)
    renames, fused = _plan(
        _block_ids(remaining, "transformer_blocks"), _block_ids(remaining, "single_transformer_blocks")
    )
    converted: StateDict = {}
    for bfl_key, diffusers_key in renames.items():
        if diffusers_key in remaining:
            converted[bfl_key] = _orient(bfl_key, remaining.pop(diffusers_key))
    for group in fused:
        for param in _LINEAR_PARAMS:
            part_keys = [f"{part}.{param}" for part in group.parts]
            if all(key in remaining for key in part_keys):
                converted[f"{group.bfl}.{param}"] = torch.cat([remaining.pop(key) for key in part_keys])
    _require_consumed(remaining, "diffusers")
    return converted


def bfl_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """BFL state dict (bare, or under ``model.diffusion_model.`` / ``diffusion_model.``) -> diffusers keys.

    Tensors split out of a fused BFL weight are views of it.
    """
    remaining = {_BFL_PREFIX.sub("", key): tensor for key, tensor in state_dict.items()}
    scaled = sorted(key for key in remaining if key.endswith(_FP8_SCALE_SUFFIXES))
    if scaled:
        raise ValueError(
            f"fp8-scaled Flux checkpoints are not supported (found {preview(scaled, limit=3)}); "
            "use a bf16/fp16/fp32 BFL file"
        )
    renames, fused = _plan(_block_ids(remaining, "double_blocks"), _block_ids(remaining, "single_blocks"))
    converted: StateDict = {}
    for bfl_key, diffusers_key in renames.items():
        if bfl_key in remaining:
            converted[diffusers_key] = _orient(bfl_key, remaining.pop(bfl_key))
    for group in fused:
        weight = remaining.get(f"{group.bfl}.weight")
        if weight is None:
            continue
        sizes = group.split(weight.shape)  # the bias splits like the weight's rows
        for param in _LINEAR_PARAMS:
            fused_key = f"{group.bfl}.{param}"
            if fused_key in remaining:
                chunks = _split(fused_key, remaining.pop(fused_key), sizes)
                converted.update((f"{part}.{param}", chunk) for part, chunk in zip(group.parts, chunks))
    _require_consumed(remaining, "BFL")
    return converted


def _transformer_config(config_source: Mapping | str | os.PathLike) -> tuple[dict, str]:
    """The transformer config and how to name it in errors."""
    if isinstance(config_source, Mapping):
        return dict(config_source), "the given config"
    folder = os.fspath(config_source)
    return FluxTransformer2DModel.load_config(folder, subfolder="transformer"), folder


def load_bfl_transformer(
    path: str, config_source: Mapping | str | os.PathLike, torch_dtype: torch.dtype
) -> FluxTransformer2DModel:
    """Build a diffusers Flux transformer from ``config_source`` (a config dict, or a diffusers
    folder with ``transformer/config.json``) holding the weights of the BFL single file ``path``."""
    config, config_name = _transformer_config(config_source)
    try:
        state_dict = bfl_to_diffusers(load_file(path))
    except (OSError, SafetensorError, ValueError) as error:
        raise ValueError(f"cannot load the BFL Flux transformer {path}: {error}") from error
    # Nothing is initialised and no second copy of the weights is made (see build_with_weights).
    return build_with_weights(FluxTransformer2DModel, config, state_dict, torch_dtype, f"transformer_path {path}",
                              f"the transformer config of {config_name}")


def save_bfl_transformer(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor], path: str) -> None:
    """Write a diffusers Flux transformer (or its state dict) as a BFL single file, atomically."""
    state_dict = (
        model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module) else model_or_state_dict
    )
    save_safetensors(diffusers_to_bfl(state_dict), path)
