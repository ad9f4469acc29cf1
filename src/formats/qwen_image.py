"""Qwen-Image weights in the single-file layouts ComfyUI ships, and its LoRA / full fine-tune formats.

Qwen-Image's native module names are diffusers' own (diffusers' `QwenImageTransformer2DModel` is the reference
implementation, and ComfyUI keeps its names), so the transformer's key map is a prefix alone:

- transformer (`qwen_image_bf16.safetensors`, `qwen_image_edit_bf16.safetensors`): `model.diffusion_model.<diffusers
  name>` (bare and `diffusion_model.` keys are read too);
- LoRA (ComfyUI format, what `QwenImagePipeline.load_lora_weights` converts): `diffusion_model.<name>.lora_A/B.weight`;
- text encoder (`qwen_2.5_vl_7b.safetensors`): Qwen2.5-VL in the original checkpoint names (`model.layers.N...`,
  `visual.blocks.N...`), which transformers 5 nests as `model.language_model.` / `model.visual.` (PREFIXES);
- VAE: the diffusers `AutoencoderKLQwenImage` file only; ComfyUI's VAE (Wan 2.1 VAE names) is refused.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from safetensors.torch import load_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from . import single_file
from .keymap import require_consumed
from .single_file import NATIVE_PREFIX, StateDict, build_with_weights

CHECKPOINT_PREFIX = "model." + NATIVE_PREFIX
# Original Qwen2.5-VL checkpoint names (ComfyUI's file) -> transformers 5 module names.
PREFIXES = {"model.": "model.language_model.", "visual.": "model.visual.", "lm_head.": "lm_head."}
LM_HEAD = "lm_head.weight"
# Keys only ComfyUI's Qwen-Image VAE (the Wan 2.1 VAE layout) has; diffusers' calls these conv_in / down_blocks.
COMFY_VAE_MARKERS = ("encoder.conv1.weight", "encoder.downsamples.0.residual.0.gamma")


def load_transformer(path: str | Path, config: Mapping, dtype: torch.dtype) -> QwenImageTransformer2DModel:
    """A Qwen-Image (Edit) transformer single file: ComfyUI's `model.diffusion_model.` layout or bare keys."""
    state = single_file.strip_comfy_prefix(single_file.read_state_dict(path))
    single_file.refuse_fp8_scaled(state, path)
    return build_with_weights(QwenImageTransformer2DModel, config, state, dtype, path, "a Qwen-Image transformer")


def save_transformer(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """diffusers transformer weights as ComfyUI's single file (`model.diffusion_model.<name>`), atomically."""
    single_file.save_native({CHECKPOINT_PREFIX + key: tensor for key, tensor in state_dict.items()}, path)


def lora_to_comfyui(lora_state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """PEFT LoRA weights under diffusers names -> ComfyUI format (`diffusion_model.<name>.lora_A.weight`)."""
    return {NATIVE_PREFIX + key: tensor for key, tensor in lora_state_dict.items()}


def lora_from_comfyui(lora_state_dict: Mapping[str, torch.Tensor], what: str) -> StateDict:
    require_consumed([key for key in lora_state_dict if not key.startswith(NATIVE_PREFIX)],
                     f"{what} (keys without {NATIVE_PREFIX})")
    return {key.removeprefix(NATIVE_PREFIX): tensor for key, tensor in lora_state_dict.items()}


def text_encoder_to_original(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers 5 Qwen2.5-VL weights -> the original checkpoint names ComfyUI's file uses."""
    return _renamed(state_dict, {new: old for old, new in PREFIXES.items()}, "the Qwen2.5-VL state dict")


def load_text_encoder(path: str | Path, config: Qwen2_5_VLConfig,
                      dtype: torch.dtype) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL from one file in the original names (ComfyUI's `qwen_2.5_vl_7b.safetensors`); `config` from the
    diffusers folder's text_encoder/. A file without the LM head (unused: the encoder gives hidden states) gets
    the token embedding in its place."""
    original = single_file.read_state_dict(path)
    single_file.refuse_fp8_scaled(original, path)
    state = _renamed(original, PREFIXES, str(path))
    state.setdefault(LM_HEAD, state.get("model.language_model.embed_tokens.weight"))
    if state[LM_HEAD] is None:
        raise ValueError(f"{path} is not a Qwen2.5-VL text encoder: it has no model.embed_tokens.weight")
    return build_with_weights(Qwen2_5_VLForConditionalGeneration, config, state, dtype, path,
                              "a Qwen2.5-VL text encoder")


def load_vae(path: str | Path, config: Mapping, dtype: torch.dtype) -> AutoencoderKLQwenImage:
    """The diffusers VAE file (`vae/diffusion_pytorch_model.safetensors`). ComfyUI's VAE file is refused."""
    state = load_file(path)
    if any(marker in state for marker in COMFY_VAE_MARKERS):
        raise ValueError(f"{path} is ComfyUI's Qwen-Image VAE (Wan 2.1 VAE key names), which is not supported: "
                         f"set model.vae_path to the diffusers VAE file (vae/diffusion_pytorch_model.safetensors of "
                         f"a Qwen-Image Diffusers folder), or leave it unset to use the one in model.diffusers_path.")
    return build_with_weights(AutoencoderKLQwenImage, config, state, dtype, path, "the Qwen-Image VAE")


def _renamed(state_dict: Mapping[str, torch.Tensor], prefixes: Mapping[str, str], what: str) -> StateDict:
    out, remaining = {}, dict(state_dict)
    for key in list(remaining):
        old = next((p for p in prefixes if key.startswith(p)), None)
        if old is not None:
            out[prefixes[old] + key.removeprefix(old)] = remaining.pop(key)
    require_consumed(remaining, what)
    return out
