"""SDXL in the layouts its users exchange: the original single-file checkpoint (Stability's SGM/LDM names) and
kohya's LoRA format.

Training runs on diffusers' UNet2DConditionModel and transformers' CLIP text encoders. This module maps
their names to the original ones:

- UNet: `down_blocks / mid_block / up_blocks` <-> `input_blocks / middle_block / output_blocks`, derived from
  the UNet config (any block count and `layers_per_block`), so the tiny test model and SDXL base share one map;
- text encoder 1 (CLIP ViT-L): HF CLIP names under `conditioner.embedders.0.transformer.text_model.`;
- text encoder 2 (OpenCLIP ViT-bigG): OpenCLIP names with q/k/v fused into `in_proj_weight`;
- VAE: LDM names under `first_stage_model.`.

Reading the original file back is diffusers' job (`StableDiffusionXLPipeline.from_single_file`), which makes
diffusers' converter the independent check of every map here.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from difftrain.utils.atomic import save_safetensors

from .keymap import require_consumed
from .single_file import NATIVE_PREFIX

StateDict = dict[str, torch.Tensor]

UNET_PREFIX = "model." + NATIVE_PREFIX
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."
# Keys real SDXL files carry beside the weights we train: kept when a fine-tune is re-exported.
PASSTHROUGH_KEYS = (TE1_PREFIX + "text_model.embeddings.position_ids", TE2_PREFIX + "logit_scale")

# Bundled diffusers configs of SDXL base 1.0 (no weights), the `config=` of from_single_file for real files.
SDXL_BASE_CONFIG_DIR = Path(__file__).with_name("sdxl_configs") / "sdxl_base"

# --------------------------------------------------------------------------------------------- UNet
_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                 "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_block_map(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers module prefix -> SGM module prefix for a UNet2DConditionModel config (lora-formats.md §1.4)."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"layers_per_block={layers!r}: only one value for every block is supported (as in SDXL)")
    blocks = dict(_UNET_TOP)
    blocks.update(_down_blocks(len(config["down_block_types"]), layers))
    blocks.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                   "mid_block.resnets.1": "middle_block.2"})
    blocks.update(_up_blocks(config["up_block_types"], layers))
    return blocks


def _down_blocks(count: int, layers: int) -> dict[str, str]:
    blocks = {}
    for i in range(count):
        for j in range(layers):
            n = 1 + i * (layers + 1) + j
            blocks[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{n}.0"
            blocks[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
        if i < count - 1:
            blocks[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (layers + 1)}.0.op"
    return blocks


def _up_blocks(block_types: list[str], layers: int) -> dict[str, str]:
    blocks = {}
    for i, block_type in enumerate(block_types):
        for j in range(layers + 1):
            n = i * (layers + 1) + j
            blocks[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{n}.0"
            blocks[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
        if i < len(block_types) - 1:  # the upsampler follows the attention, if the block has one
            slot = 2 if "CrossAttn" in block_type else 1
            blocks[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (layers + 1) + layers}.{slot}.conv"
    return blocks


def unet_module_to_sgm(name: str, block_map: Mapping[str, str]) -> str:
    """A diffusers UNet module path -> its SGM path (transformer internals keep their names)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in block_map:
            rest = parts[cut:]
            if ".resnets." in prefix and rest:
                rest = [_RESNET_PARTS[rest[0]], *rest[1:]]
            return ".".join([block_map[prefix], *rest])
    raise KeyError(f"UNet module {name!r} has no SGM name (not an SDXL-style UNet2DConditionModel?)")


def unet_to_sgm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    block_map = unet_block_map(config)
    out = {}
    for key, tensor in state_dict.items():
        module, param = key.rsplit(".", 1)
        out[f"{UNET_PREFIX}{unet_module_to_sgm(module, block_map)}.{param}"] = tensor
    return out


# ------------------------------------------------------------------------------------- text encoders
def te1_module_name(name: str) -> str:
    """HF CLIPTextModel names with the `text_model.` level that real files (and kohya names) have; transformers
    >= 5.6 flattened it away."""
    return name if name.startswith(("text_model.", "text_projection")) else f"text_model.{name}"


def te1_to_original(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    return {TE1_PREFIX + te1_module_name(k): v for k, v in state_dict.items()}


_OPENCLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                 "text_model.embeddings.position_embedding.weight": "positional_embedding",
                 "text_model.final_layer_norm.weight": "ln_final.weight",
                 "text_model.final_layer_norm.bias": "ln_final.bias"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_TE2_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def te2_to_openclip(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """CLIPTextModelWithProjection -> OpenCLIP ViT-bigG text tower names (q/k/v fused, projection transposed)."""
    remaining = dict(state_dict)
    out = {TE2_PREFIX + "text_projection": remaining.pop("text_projection.weight").T.contiguous()}
    for key, name in _OPENCLIP_TOP.items():
        out[TE2_PREFIX + name] = remaining.pop(key)
    for layer in sorted({int(m.group(1)) for k in remaining if (m := _TE2_LAYER.match(k))}):
        src, dst = f"text_model.encoder.layers.{layer}.", f"{TE2_PREFIX}transformer.resblocks.{layer}."
        for param in ("weight", "bias"):
            qkv = [remaining.pop(f"{src}self_attn.{p}_proj.{param}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{param}"] = torch.cat(qkv)
            for hf, openclip in _OPENCLIP_LAYER.items():
                out[f"{dst}{openclip}.{param}"] = remaining.pop(f"{src}{hf}.{param}")
    require_consumed(remaining, "text encoder 2")
    return out


# ---------------------------------------------------------------------------------------------- VAE
_VAE_RULES = [  # applied in order to each diffusers key; {up} is the reversed decoder block index
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.up.{up}.block.\2."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.up.{up}.upsample."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.attn_1\.group_norm\.", ".attn_1.norm."),
    (r"\.attn_1\.to_([qkv])\.", r".attn_1.\1."),
    (r"\.attn_1\.to_out\.0\.", ".attn_1.proj_out."),
]


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """AutoencoderKL -> LDM names; the mid-block attention's Linear weights become LDM's 1x1 convs."""
    up_blocks = len(config["up_block_types"])
    out = {}
    for key, tensor in state_dict.items():
        name = key
        for pattern, replacement in _VAE_RULES:
            match = re.search(pattern, name)
            if match and "{up}" in replacement:
                replacement = replacement.replace("{up}", str(up_blocks - 1 - int(match.group(1))))
            name = re.sub(pattern, replacement, name)
        if ".attn_1." in name and name.endswith(".weight") and ".norm." not in name:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[VAE_PREFIX + name] = tensor
    return out


# ---------------------------------------------------------------------------------------- checkpoint
def original_checkpoint(unet: Mapping, unet_config: Mapping, te1: Mapping, te2: Mapping,
                        originals: Mapping[str, torch.Tensor]) -> StateDict:
    """The original single-file layout from diffusers/transformers state dicts, plus `originals`: tensors already
    under their original names (the VAE, the keys in PASSTHROUGH_KEYS)."""
    return {**unet_to_sgm(unet, unet_config), **te1_to_original(te1), **te2_to_openclip(te2), **originals}


def untrained_tensors(path: str | Path) -> StateDict:
    """What a fine-tune leaves as it was in the original file `path`: the VAE and the non-weight keys."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(VAE_PREFIX) or k in PASSTHROUGH_KEYS}


def checkpoint_metadata(title: str, v_pred: bool, resolution: str) -> dict[str, str]:
    """ModelSpec 1.0.1 keys of a full SDXL checkpoint, as kohya's sai_model_spec writes them."""
    return _modelspec("stable-diffusion-xl-v1-base", title, v_pred, resolution)


def save_original_checkpoint(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_safetensors({k: v.contiguous() for k, v in tensors.items()}, path, metadata)


# ------------------------------------------------------------------------------------------ kohya LoRA
TEXT_ENCODER_PARTS = ("text_encoder_1", "text_encoder_2")
KOHYA_PREFIXES = {"denoiser": "lora_unet_", "text_encoder_1": "lora_te1_", "text_encoder_2": "lora_te2_"}


def split_parts(state_dict: Mapping[str, torch.Tensor]) -> dict[str, StateDict]:
    """Keys as the trainer exports them (UNet bare, text encoders under `text_encoder_1.` / `text_encoder_2.`)
    -> {part: state dict}."""
    parts: dict[str, StateDict] = {"denoiser": {}, **{part: {} for part in TEXT_ENCODER_PARTS}}
    for key, tensor in state_dict.items():
        part, rest = key.split(".", 1)
        if part in TEXT_ENCODER_PARTS:
            parts[part][rest] = tensor
        else:
            parts["denoiser"][key] = tensor
    return parts


def kohya_module_name(part: str, module: str, block_map: Mapping[str, str]) -> str:
    if part == "denoiser":
        module = unet_module_to_sgm(module, block_map)
    elif part == "text_encoder_1":
        module = te1_module_name(module)
    return KOHYA_PREFIXES[part] + module.replace(".", "_")


def kohya_lora(lora: Mapping[str, torch.Tensor], alpha: float, unet_config: Mapping[str, Any]) -> StateDict:
    """Unscaled PEFT LoRA weights (`<module>.lora_A.weight`, keyed as `split_parts` reads them) -> kohya keys:
    `lora_down` = A, `lora_up` = B and `.alpha` = the trained lora_alpha, so every consumer applies alpha / rank
    exactly as training did."""
    block_map = unet_block_map(unet_config)
    out = {}
    for part, weights in split_parts(lora).items():
        for key, tensor in weights.items():
            module, kind = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key).groups()
            name = kohya_module_name(part, module, block_map)
            out[f"{name}.{'lora_down' if kind == 'A' else 'lora_up'}.weight"] = tensor
            if kind == "A":
                out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=tensor.dtype)
    return out


def kohya_metadata(facts: Mapping[str, Any], resolution: str) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` metadata of a kohya SDXL LoRA (lora-formats.md §1.3). `facts` holds the
    run's values under the ss_ names without the prefix (network_dim, network_alpha, learning_rate, ...);
    `resolution` ('WxH') is the size the run trained at."""
    fixed = {"network_module": "networks.lora", "base_model_version": "sdxl_base_v1-0", "v2": False,
             "cache_latents": True, "network_args": json.dumps({})}
    metadata = {f"ss_{k}": _metadata_value(v) for k, v in {**fixed, **facts}.items()}
    metadata.update(_modelspec("stable-diffusion-xl-v1-base/lora", facts.get("output_name", "LoRA"),
                               bool(facts.get("v_parameterization")), resolution))
    return metadata


def _modelspec(architecture: str, title: str, v_pred: bool, resolution: str) -> dict[str, str]:
    return {"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": architecture,
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": title, "modelspec.resolution": resolution,
            "modelspec.prediction_type": "v" if v_pred else "epsilon",
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _metadata_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)
