"""Wan 2.1 / 2.2 weights in their native layouts, read into (and written from) diffusers classes.

Training runs on diffusers' `WanTransformer3DModel`, `AutoencoderKLWan` and transformers' `UMT5EncoderModel`.
People download the original Wan-AI folders and ComfyUI single files, so this module maps:

- the transformer: native (= ComfyUI = original Wan) names `blocks.N.self_attn.q`, `cross_attn.k_img`, `ffn.0`,
  `head.head`, ... <-> diffusers names; the config is derived from tensor shapes (any size, tiny included);
- the VAE: the original `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth` layouts <-> diffusers (2.1 and the residual 2.2 VAE);
- UMT5: the original Wan encoder (`models_t5_umt5-xxl-enc-bf16.pth`, Kijai's wrapper file: `token_embedding`,
  `blocks.N.attn.q`, `ffn.gate.0`, ...) or a transformers-named file (ComfyUI's `umt5_xxl_*.safetensors`);
- LoRAs: PEFT weights under diffusers names -> ComfyUI `diffusion_model.<native name>.lora_A/lora_B`.

The transformer's map is data (keymap.py): both directions come from it, and unknown or missing keys are one error
naming the file.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from .keymap import KeyMap, block_count, within
from .single_file import StateDict, build_with_weights, preview, read_state_dict, refuse_fp8_scaled, strip_comfy_prefix

# ---------------------------------------------------------------- transformer

# Native (= ComfyUI = original Wan) module -> diffusers module. The modulation tables are parameters of their own.
WAN = KeyMap(
    modules={
        "patch_embedding": "patch_embedding",
        "text_embedding.0": "condition_embedder.text_embedder.linear_1",
        "text_embedding.2": "condition_embedder.text_embedder.linear_2",
        "time_embedding.0": "condition_embedder.time_embedder.linear_1",
        "time_embedding.2": "condition_embedder.time_embedder.linear_2",
        "time_projection.1": "condition_embedder.time_proj",
        "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
        "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
        "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
        "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
        "head.head": "proj_out",
        **within("blocks.{i}.", "blocks.{i}.", {
            "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
            "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
            "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
            "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
            "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
            "cross_attn.norm_k_img": "attn2.norm_added_k",
            "norm3": "norm2",  # the cross-attention norm: Wan counts norms in creation order, diffusers in call order
            "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
        }),
    },
    params={"head.modulation": "scale_shift_table", "blocks.{i}.modulation": "blocks.{i}.scale_shift_table"},
)
# Every released Wan uses 128-wide attention heads; the head count is read from config.json when there is one.
DEFAULT_HEAD_DIM = 128


def transformer_to_native(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    return WAN.to_native(state_dict, "the diffusers Wan transformer")


def transformer_config(native: Mapping[str, torch.Tensor], num_heads: Optional[int] = None) -> dict:
    """The diffusers WanTransformer3DModel config of a native state dict, from its tensor shapes."""
    patch = native["patch_embedding.weight"]
    dim, in_channels, patch_size = patch.shape[0], patch.shape[1], list(patch.shape[2:])
    if not num_heads and dim % DEFAULT_HEAD_DIM:
        raise ValueError(f"cannot tell the attention head count of a {dim}-wide Wan transformer: released models "
                         f"use {DEFAULT_HEAD_DIM}-wide heads; put its original config.json (num_heads) beside it")
    heads = num_heads or dim // DEFAULT_HEAD_DIM
    config = dict(
        patch_size=patch_size, num_attention_heads=heads, attention_head_dim=dim // heads, in_channels=in_channels,
        out_channels=native["head.head.weight"].shape[0] // math.prod(patch_size),
        text_dim=native["text_embedding.0.weight"].shape[1], freq_dim=native["time_embedding.0.weight"].shape[1],
        ffn_dim=native["blocks.0.ffn.0.weight"].shape[0],
        num_layers=block_count(native, "blocks."),
        cross_attn_norm="blocks.0.norm3.weight" in native,
        qk_norm="rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in native else None, eps=1e-6)
    if "img_emb.proj.1.weight" in native:
        config["image_dim"] = native["img_emb.proj.1.weight"].shape[1]
    if "blocks.0.cross_attn.k_img.weight" in native:
        config["added_kv_proj_dim"] = native["blocks.0.cross_attn.k_img.weight"].shape[1]
    return config


def read_native_transformer(path: str | Path) -> StateDict:
    """A ComfyUI single file (any prefix) or an original folder of `diffusion_pytorch_model*.safetensors` shards."""
    state = strip_comfy_prefix(read_state_dict(path, "diffusion_pytorch_model*"))
    refuse_fp8_scaled(state, path)
    return state


def load_transformer(path: str | Path, dtype: torch.dtype, num_heads: Optional[int] = None) -> WanTransformer3DModel:
    """From a single file or an original folder; `num_heads` defaults to the folder's config.json."""
    native = read_native_transformer(path)
    config = transformer_config(native, num_heads or original_num_heads(Path(path) if Path(path).is_dir() else None))
    state = WAN.to_diffusers(native, str(path))
    return build_with_weights(WanTransformer3DModel, config, state, dtype, path, "a Wan transformer")


def original_num_heads(folder: Optional[Path]) -> Optional[int]:
    """`num_heads` of an original Wan config.json in `folder` (or its A14B expert subfolders), if there is one."""
    if folder is None:
        return None
    for config in (folder / "config.json", folder / "low_noise_model" / "config.json"):
        if config.is_file():
            return json.loads(config.read_text()).get("num_heads")
    return None


def original_transformer_config(config: Mapping) -> dict:
    """The original Wan config.json that describes a diffusers WanTransformer3DModel config."""
    model_type = "i2v" if config.get("image_dim") or config["in_channels"] == 36 else "t2v"
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    return {"_class_name": "WanModel", "model_type": model_type, "patch_size": list(config["patch_size"]),
            "dim": dim, "ffn_dim": config["ffn_dim"], "freq_dim": config["freq_dim"],
            "in_dim": config["in_channels"], "out_dim": config["out_channels"], "text_dim": config["text_dim"],
            "num_heads": config["num_attention_heads"], "num_layers": config["num_layers"], "eps": config["eps"]}


# ---------------------------------------------------------------- LoRA

def lora_to_comfyui(lora_state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """PEFT LoRA weights (`<diffusers module>.lora_A.weight`) -> `diffusion_model.<native module>.lora_A.weight`."""
    return WAN.lora_to_native(lora_state_dict, "the Wan LoRA")


# ---------------------------------------------------------------- VAE

_VAE_TOP = {"encoder.conv_in": "encoder.conv1", "decoder.conv_in": "decoder.conv1", "quant_conv": "conv1",
            "post_quant_conv": "conv2", "encoder.norm_out": "encoder.head.0", "encoder.conv_out": "encoder.head.2",
            "decoder.norm_out": "decoder.head.0", "decoder.conv_out": "decoder.head.2"}
_VAE_RESNET = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
               "conv_shortcut": "shortcut"}
# Both released VAEs share this structure; only widths, channels and the residual 2.2 blocks differ.
VAE_STRUCTURE = dict(dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
WAN22_LATENTS_MEAN = [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
                      0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
                      -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
                      -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
                      0.3573, -0.0548, -0.1681, -0.0667]
WAN22_LATENTS_STD = [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
                     0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                     0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                     0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]


def vae_native_key(key: str, config: Mapping) -> str:
    """diffusers AutoencoderKLWan parameter -> original Wan VAE parameter (2.1 flat or 2.2 residual layout)."""
    module, param = key.rsplit(".", 1)
    if module in _VAE_TOP:
        return f"{_VAE_TOP[module]}.{param}"
    res, residual = config["num_res_blocks"], config["is_residual"]
    rules = [
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)$",
         lambda m: f"{m[1]}.middle.{2 * int(m[2])}.{_VAE_RESNET[m[3]]}"),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$", lambda m: f"{m[1]}.middle.1.{m[2]}"),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$",  # 2.2
         lambda m: f"encoder.downsamples.{m[1]}.downsamples.{m[2]}.{_VAE_RESNET[m[3]]}"),
        (r"^encoder\.down_blocks\.(\d+)\.downsampler\.(.+)$",  # 2.2
         lambda m: f"encoder.downsamples.{m[1]}.downsamples.{res}.{m[2]}"),
        (r"^encoder\.down_blocks\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)$",  # 2.1: one flat list
         lambda m: f"encoder.downsamples.{m[1]}.{_VAE_RESNET[m[2]]}"),
        (r"^encoder\.down_blocks\.(\d+)\.((resample|time_conv).*)$", lambda m: f"encoder.downsamples.{m[1]}.{m[2]}"),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$",
         lambda m: (f"decoder.upsamples.{m[1]}.upsamples.{m[2]}" if residual
                    else f"decoder.upsamples.{int(m[1]) * (res + 2) + int(m[2])}") + f".{_VAE_RESNET[m[3]]}"),
        (r"^decoder\.up_blocks\.(\d+)\.(upsampler|upsamplers\.0)\.(.+)$",
         lambda m: (f"decoder.upsamples.{m[1]}.upsamples.{res + 1}" if residual
                    else f"decoder.upsamples.{int(m[1]) * (res + 2) + res + 1}") + f".{m[3]}"),
    ]
    for pattern, rename in rules:
        match = re.match(pattern, module)
        if match:
            return f"{rename(match)}.{param}"
    raise KeyError(key)


def vae_to_native(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> StateDict:
    return {vae_native_key(key, config): tensor for key, tensor in state_dict.items()}


def vae_config(native: Mapping[str, torch.Tensor]) -> dict:
    """AutoencoderKLWan config of an original Wan VAE state dict: widths from shapes, 2.2 if its blocks are
    residual (48 latent channels, 2x2 patches), else 2.1."""
    conv_in = native["encoder.conv1.weight"]
    config = dict(VAE_STRUCTURE, base_dim=conv_in.shape[0], in_channels=conv_in.shape[1],
                  out_channels=native["decoder.head.2.weight"].shape[0], z_dim=native["conv2.weight"].shape[0],
                  is_residual=any(k.startswith("encoder.downsamples.0.downsamples.") for k in native))
    decoder_base_dim = native["decoder.head.2.weight"].shape[1]
    if decoder_base_dim != config["base_dim"]:
        config["decoder_base_dim"] = decoder_base_dim
    if config["is_residual"]:
        config.update(patch_size=2, scale_factor_spatial=16, latents_mean=WAN22_LATENTS_MEAN,
                      latents_std=WAN22_LATENTS_STD)
    return config


def load_vae(path: str | Path, dtype: torch.dtype) -> AutoencoderKLWan:
    native = read_state_dict(path)
    config = vae_config(native)
    with torch.device("meta"):
        keys = list(AutoencoderKLWan.from_config(config).state_dict())
    to_diffusers = {vae_native_key(key, config): key for key in keys}
    unknown = sorted(native.keys() - to_diffusers.keys())
    if unknown:
        raise ValueError(f"{path}: keys that are not part of a Wan VAE: {preview(unknown)}")
    state = {to_diffusers[key]: tensor for key, tensor in native.items()}
    return build_with_weights(AutoencoderKLWan, config, state, dtype, path, "a Wan VAE")


# ---------------------------------------------------------------- UMT5 text encoder

_T5_BLOCK = {"norm1": "layer.0.layer_norm", "attn.q": "layer.0.SelfAttention.q", "attn.k": "layer.0.SelfAttention.k",
             "attn.v": "layer.0.SelfAttention.v", "attn.o": "layer.0.SelfAttention.o",
             "pos_embedding.embedding": "layer.0.SelfAttention.relative_attention_bias",
             "norm2": "layer.1.layer_norm", "ffn.gate.0": "layer.1.DenseReluDense.wi_0",
             "ffn.fc1": "layer.1.DenseReluDense.wi_1", "ffn.fc2": "layer.1.DenseReluDense.wo"}
_T5_TOP = {"token_embedding": "shared", "norm": "encoder.final_layer_norm"}
_T5_BLOCK_ORIGINAL = {hf: original for original, hf in _T5_BLOCK.items()}
_T5_TOP_ORIGINAL = {hf: original for original, hf in _T5_TOP.items()}
TIED_T5_KEYS = ("encoder.embed_tokens.weight",)


def umt5_original_key(hf_key: str) -> str:
    """transformers UMT5EncoderModel parameter -> original Wan T5 encoder parameter."""
    module = hf_key.removesuffix(".weight")
    block = re.match(r"^encoder\.block\.(\d+)\.(.+)$", module)
    if block:
        return f"blocks.{block[1]}.{_T5_BLOCK_ORIGINAL[block[2]]}.weight"
    return f"{_T5_TOP_ORIGINAL[module]}.weight"


def umt5_to_original(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    return {umt5_original_key(k): v for k, v in state_dict.items() if k not in TIED_T5_KEYS}


def umt5_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Original Wan names (the .pth in the checkpoint folder, Kijai's wrapper file) -> transformers names;
    a file already in transformers names (ComfyUI's umt5_xxl) passes through."""
    if "token_embedding.weight" not in state_dict:
        return {k: v for k, v in state_dict.items() if k.startswith(("shared.", "encoder."))}
    hf_names = {umt5_original_key(k): k for k in _umt5_keys(state_dict)}
    return {hf_names.get(k, k): v for k, v in state_dict.items()}


def _umt5_keys(original: Mapping[str, torch.Tensor]) -> list[str]:
    layers = {int(m[1]) for k in original if (m := re.match(r"^blocks\.(\d+)\.", k))}
    block_keys = [f"encoder.block.{i}.{hf}.weight" for i in sorted(layers) for hf in _T5_BLOCK.values()]
    return ["shared.weight", "encoder.final_layer_norm.weight", *block_keys]


def umt5_config(hf_state: Mapping[str, torch.Tensor]) -> dict:
    vocab_size, d_model = hf_state["shared.weight"].shape
    buckets, heads = hf_state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    return dict(vocab_size=vocab_size, d_model=d_model, num_heads=heads, relative_attention_num_buckets=buckets,
                d_kv=hf_state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
                d_ff=hf_state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
                num_layers=1 + max(int(m[1]) for k in hf_state if (m := re.match(r"^encoder\.block\.(\d+)\.", k))),
                feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)


def load_umt5(path: str | Path, dtype: torch.dtype):
    from transformers import UMT5Config, UMT5EncoderModel

    state = umt5_to_transformers(read_state_dict(path))
    config = UMT5Config(**umt5_config(state))
    return build_with_weights(UMT5EncoderModel, config, state, dtype, path, "a UMT5 text encoder",
                              may_lack=TIED_T5_KEYS)
