"""Chroma transformer weights in the original (lodestone ``flow``) / ComfyUI single-file layout.

Training runs on diffusers' ``ChromaTransformer2DModel``. Chroma is a Flux without per-block modulation (a
``distilled_guidance_layer`` computes it), so its key map is Flux's shared part plus the approximator. diffusers'
own single-file converter hard-codes the 8.9B sizes; here the config comes from tensor shapes (any size). LoRAs
are exported in ComfyUI format: ``diffusion_model.<native module>.lora_A/lora_B.weight``, fused qkv / linear1
by keymap.py's fused rule.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import torch
from diffusers import ChromaTransformer2DModel

from .flux import DOUBLE, SHARED_FUSED, SHARED_MODULES, SHARED_NORMS
from .keymap import KeyMap, block_count, rms_scales, within
from .single_file import (
    StateDict,
    build_with_weights,
    read_state_dict,
    refuse_fp8_scaled,
    save_native,
    strip_comfy_prefix,
)

APPROXIMATOR = "distilled_guidance_layer."
CHROMA = KeyMap(
    modules={
        **SHARED_MODULES,
        **within(APPROXIMATOR, APPROXIMATOR, {
            "in_proj": "in_proj", "out_proj": "out_proj",
            "layers.{i}.in_layer": "layers.{i}.linear_1", "layers.{i}.out_layer": "layers.{i}.linear_2",
        }),
    },
    params={**SHARED_NORMS, **rms_scales({APPROXIMATOR + "norms.{i}": APPROXIMATOR + "norms.{i}"})},
    fused=SHARED_FUSED,
)
# Rotary axes of the released Chroma (128-wide heads); not visible in any weight shape.
AXES_DIMS_ROPE = (16, 56, 56)


def transformer_config(native: Mapping[str, torch.Tensor], axes_dims_rope: Sequence[int] = AXES_DIMS_ROPE) -> dict:
    """The ChromaTransformer2DModel config of a native state dict, from its tensor shapes."""
    inner_dim, in_channels = native["img_in.weight"].shape
    head_dim = native[DOUBLE.format(i=0) + "img_attn.norm.query_norm.scale"].shape[0]
    if sum(axes_dims_rope) != head_dim:
        raise ValueError(f"the rotary axes {list(axes_dims_rope)} do not sum to this transformer's head width "
                         f"{head_dim}: pass its axes_dims_rope")
    approximator_hidden, approximator_channels = native[APPROXIMATOR + "in_proj.weight"].shape
    return dict(patch_size=1, in_channels=in_channels, out_channels=native["final_layer.linear.weight"].shape[0],
                num_layers=block_count(native, "double_blocks."), num_single_layers=block_count(native, "single_blocks."),
                attention_head_dim=head_dim, num_attention_heads=inner_dim // head_dim,
                joint_attention_dim=native["txt_in.weight"].shape[1], axes_dims_rope=list(axes_dims_rope),
                approximator_num_channels=approximator_channels, approximator_hidden_dim=approximator_hidden,
                approximator_layers=block_count(native, APPROXIMATOR + "layers."))


def load_chroma_transformer(path: str | Path, dtype: torch.dtype,
                            axes_dims_rope: Optional[Sequence[int]] = None) -> ChromaTransformer2DModel:
    """A Chroma single file (bare keys or under ComfyUI's `model.diffusion_model.` / `diffusion_model.`);
    `axes_dims_rope` defaults to the released Chroma's."""
    native = strip_comfy_prefix(read_state_dict(path))
    refuse_fp8_scaled(native, path)
    try:
        config = transformer_config(native, axes_dims_rope or AXES_DIMS_ROPE)
    except KeyError as missing:
        raise ValueError(f"{path} is not a Chroma transformer: it has no {missing}") from None
    state = CHROMA.to_diffusers(native, str(path))
    return build_with_weights(ChromaTransformer2DModel, config, state, dtype, path, "a Chroma transformer")


def save_chroma_transformer(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """A diffusers ChromaTransformer2DModel state dict as a native single file (bare keys), atomically."""
    save_native(CHROMA.to_native(state_dict, "the diffusers Chroma transformer"), path)


def lora_to_comfyui(lora_state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """PEFT LoRA weights (`<diffusers module>.lora_A.weight`) -> `diffusion_model.<native module>.lora_A.weight`."""
    return CHROMA.lora_to_native(lora_state_dict, "the Chroma LoRA")


def lora_from_comfyui(lora_state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A ComfyUI-format Chroma LoRA -> PEFT weights under diffusers names (loadable by `load_lora_adapter`)."""
    return CHROMA.lora_to_diffusers(lora_state_dict, "the ComfyUI Chroma LoRA")
