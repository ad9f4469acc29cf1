"""Lumina Image 2.0 weights in the single-file layouts ComfyUI ships, and its LoRA / full fine-tune formats.

Training runs on diffusers' ``Lumina2Transformer2DModel``. The native names are those of the original
Lumina-Image-2.0 ``NextDiT`` (ComfyUI's ``lumina_2_model_bf16.safetensors``, bare or under
``model.diffusion_model.``): q/k/v fused into ``attention.qkv`` (grouped-query: k and v are narrower than q),
``feed_forward.w1/w2/w3``, ``adaLN_modulation.1``. diffusers' own converter hard-codes the 2.6B split
(2304, 768, 768); here the split comes from the head counts, so one map serves tiny and real models.

- text encoder (``gemma_2_2b_fp16.safetensors``): Gemma 2 under ``model.`` (plus ComfyUI's ``spiece_model``, the
  tokenizer, unused here: the tokenizer comes from the Diffusers folder);
- VAE (``flux_vae.safetensors``): the Flux VAE in the original LDM names, read by diffusers' ``from_single_file``;
- LoRA (ComfyUI format, what the reference writes): ``diffusion_model.<native module>.lora_A/B.weight``.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL, Lumina2Transformer2DModel
from transformers import Gemma2Config, Gemma2Model

from .keymap import Fused, KeyMap, require_consumed, within
from .sdxl import VAE_PREFIX, vae_to_ldm
from .single_file import (
    NATIVE_PREFIX,
    StateDict,
    build_with_weights,
    read_state_dict,
    refuse_fp8_scaled,
    save_native,
    strip_comfy_prefix,
)

# The original model's unused final RMSNorm: dropped on reading, written as its initial value (ones) so the
# original implementation, which declares it, loads our files.
UNUSED_NORM = "norm_final.weight"
GEMMA_PREFIX = "model."
COMFY_TOKENIZER_KEY = "spiece_model"
DIFFUSERS_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v")


def _block_renames(modulated: bool) -> tuple[dict[str, str], dict[str, str]]:
    """(module, parameter) renames inside one block; the context refiner has no timestep modulation."""
    modules = {"attention.out": "attn.to_out.0", "feed_forward.w1": "feed_forward.linear_1",
               "feed_forward.w2": "feed_forward.linear_2", "feed_forward.w3": "feed_forward.linear_3"}
    norms = {"attention.q_norm": "attn.norm_q", "attention.k_norm": "attn.norm_k", "attention_norm2": "norm2",
             "ffn_norm1": "ffn_norm1", "ffn_norm2": "ffn_norm2",
             "attention_norm1": "norm1.norm" if modulated else "norm1"}
    if modulated:
        modules["adaLN_modulation.1"] = "norm1.linear"
    return modules, {f"{native}.weight": f"{diffusers}.weight" for native, diffusers in norms.items()}


def keymap(num_attention_heads: int, num_kv_heads: int) -> KeyMap:
    """The native <-> diffusers map of a Lumina 2 transformer with these head counts (any width and depth)."""
    def qkv_rows(width: int) -> list[int]:
        kv_width = width * num_kv_heads // num_attention_heads
        return [width, kv_width, kv_width]

    modules = {"x_embedder": "x_embedder", "t_embedder.mlp.0": "time_caption_embed.timestep_embedder.linear_1",
               "t_embedder.mlp.2": "time_caption_embed.timestep_embedder.linear_2",
               "cap_embedder.1": "time_caption_embed.caption_embedder.1",
               "final_layer.adaLN_modulation.1": "norm_out.linear_1", "final_layer.linear": "norm_out.linear_2"}
    params = {"cap_embedder.0.weight": "time_caption_embed.caption_embedder.0.weight"}
    fused = {}
    for blocks, modulated in (("layers.{i}.", True), ("noise_refiner.{i}.", True), ("context_refiner.{i}.", False)):
        block_modules, block_params = _block_renames(modulated)
        modules.update(within(blocks, blocks, block_modules))
        params.update(within(blocks, blocks, block_params))
        fused[blocks + "attention.qkv"] = Fused(tuple(blocks + part for part in DIFFUSERS_ATTENTION), qkv_rows)
    return KeyMap(modules=modules, params=params, fused=fused)


def config_keymap(config: Mapping) -> KeyMap:
    return keymap(config["num_attention_heads"], config["num_kv_heads"])


def native_to_diffusers(native: Mapping[str, torch.Tensor], config: Mapping, what: str) -> StateDict:
    bare = strip_comfy_prefix(native)
    refuse_fp8_scaled(bare, what)
    bare.pop(UNUSED_NORM, None)
    return config_keymap(config).to_diffusers(bare, what)


def diffusers_to_native(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> StateDict:
    native = config_keymap(config).to_native(state_dict, "the diffusers Lumina 2 transformer")
    width = state_dict["x_embedder.weight"].shape[0]
    return {**native, UNUSED_NORM: state_dict["x_embedder.weight"].new_ones(width)}


def load_transformer(path: str | Path, config: Mapping, dtype: torch.dtype) -> Lumina2Transformer2DModel:
    """ComfyUI's / the original single-file transformer; `config` from the Diffusers folder."""
    state = native_to_diffusers(read_state_dict(path), config, str(path))
    return build_with_weights(Lumina2Transformer2DModel, config, state, dtype, path, "a Lumina 2 transformer")


def save_transformer(state_dict: Mapping[str, torch.Tensor], config: Mapping, path: str | Path) -> None:
    """diffusers transformer weights as the native single file (bare keys), atomically."""
    save_native(diffusers_to_native(state_dict, config), path)


def lora_to_comfyui(lora_state_dict: Mapping[str, torch.Tensor], config: Mapping) -> StateDict:
    """PEFT LoRA weights under diffusers names -> `diffusion_model.<native module>.lora_A/B.weight`."""
    return config_keymap(config).lora_to_native(lora_state_dict, "the Lumina 2 LoRA")


def lora_from_comfyui(lora_state_dict: Mapping[str, torch.Tensor], config: Mapping, what: str) -> StateDict:
    """A ComfyUI-format Lumina 2 LoRA -> PEFT weights under diffusers names (loadable by `load_lora_adapter`)."""
    return config_keymap(config).lora_to_diffusers(lora_state_dict, what, prefix=NATIVE_PREFIX)


def gemma_to_comfyui(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    return {GEMMA_PREFIX + key: tensor for key, tensor in state_dict.items()}


def load_text_encoder(path: str | Path, config: Gemma2Config, dtype: torch.dtype) -> Gemma2Model:
    """Gemma 2 from ComfyUI's single file (`model.<name>`); `config` from the Diffusers folder's text_encoder/."""
    state = read_state_dict(path)
    state.pop(COMFY_TOKENIZER_KEY, None)
    require_consumed([key for key in state if not key.startswith(GEMMA_PREFIX)], f"{path} (keys without {GEMMA_PREFIX})")
    state = {key.removeprefix(GEMMA_PREFIX): tensor for key, tensor in state.items()}
    return build_with_weights(Gemma2Model, config, state, dtype, path, "a Gemma 2 text encoder")


def vae_to_comfyui(vae: AutoencoderKL) -> StateDict:
    """The diffusers Flux VAE in the original LDM names, bare (as ComfyUI's `flux_vae.safetensors`)."""
    return {key.removeprefix(VAE_PREFIX): tensor for key, tensor in vae_to_ldm(vae.state_dict(), vae.config).items()}


def load_vae(path: str | Path, folder: Path, dtype: torch.dtype) -> AutoencoderKL:
    """A single-file Flux VAE (LDM names, as ComfyUI's `flux_vae.safetensors`) with the folder's vae/ config."""
    return AutoencoderKL.from_single_file(str(path), config=str(folder), subfolder="vae", torch_dtype=dtype,
                                          local_files_only=True)
