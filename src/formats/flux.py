"""Flux transformer weights in the Black Forest Labs (BFL) single-file layout.

Training runs on diffusers' ``FluxTransformer2DModel``; full fine-tunes are exchanged as
BFL single files, the layout ComfyUI and the reference ``flux`` repo read. diffusers' own
``from_single_file`` hard-codes the 12B sizes; this key map (see keymap.py) derives every split
from tensor shapes and works for any hidden size and block count. Both directions are exact
and refuse keys they do not know.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from diffusers import FluxTransformer2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file

from .keymap import Fused, KeyMap, rms_scales, swap_halves, widths, within
from .single_file import StateDict, build_with_weights, refuse_fp8_scaled, save_native, strip_comfy_prefix

DOUBLE, SINGLE = "double_blocks.{i}.", "single_blocks.{i}."
DIFFUSERS_DOUBLE, DIFFUSERS_SINGLE = "transformer_blocks.{i}.", "single_transformer_blocks.{i}."

# What Chroma (a Flux without per-block modulation) shares: embedders, attention, MLPs, norms, output.
SHARED_MODULES = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "final_layer.linear": "proj_out",
    **within(DOUBLE, DIFFUSERS_DOUBLE, {
        "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
        "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
        "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
    }),
    **within(SINGLE, DIFFUSERS_SINGLE, {"linear2": "proj_out"}),
}
SHARED_NORMS = rms_scales({
    **within(DOUBLE, DIFFUSERS_DOUBLE, {
        "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
        "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
    }),
    **within(SINGLE, DIFFUSERS_SINGLE, {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}),
})
SHARED_FUSED = {
    DOUBLE + "img_attn.qkv": Fused(tuple(DIFFUSERS_DOUBLE + p for p in ("attn.to_q", "attn.to_k", "attn.to_v")),
                                   widths(1, 1, 1)),
    DOUBLE + "txt_attn.qkv": Fused(
        tuple(DIFFUSERS_DOUBLE + p for p in ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
        widths(1, 1, 1)),
    SINGLE + "linear1": Fused(tuple(DIFFUSERS_SINGLE + p for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
                              widths(1, 1, 1, 4)),
}

FLUX = KeyMap(
    modules={
        **SHARED_MODULES,
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer.adaLN_modulation.1": "norm_out.linear",
        **within(DOUBLE, DIFFUSERS_DOUBLE, {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear"}),
        **within(SINGLE, DIFFUSERS_SINGLE, {"modulation.lin": "norm.linear"}),
    },
    params=SHARED_NORMS,
    fused=SHARED_FUSED,
    # diffusers' AdaLayerNormContinuous emits (scale, shift); BFL's final layer emits (shift, scale).
    transforms={"final_layer.adaLN_modulation.1": swap_halves},
)


def diffusers_to_bfl(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """diffusers ``FluxTransformer2DModel`` state dict -> BFL keys (bare, without a prefix)."""
    return FLUX.to_native(state_dict, "the diffusers Flux transformer")


def bfl_to_diffusers(state_dict: Mapping[str, torch.Tensor], what: str = "the BFL Flux transformer") -> StateDict:
    """BFL state dict (bare, or under ``model.diffusion_model.`` / ``diffusion_model.``) -> diffusers keys.

    Tensors split out of a fused BFL weight are views of it.
    """
    bare = strip_comfy_prefix(state_dict)
    refuse_fp8_scaled(bare, what)
    return FLUX.to_diffusers(bare, what)


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
        state_dict = bfl_to_diffusers(load_file(path), str(path))
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
    save_native(diffusers_to_bfl(state_dict), path)
