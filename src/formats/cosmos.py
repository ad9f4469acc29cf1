"""Cosmos 1.0 (text2world) files as ComfyUI ships them: the transformer in NVIDIA's original layout
(`cosmos-1.0-diffusion-7b-text2world.pt`, read by cosmos_common.py through the map below) and the CV8x8x8 video
tokenizer (`cosmos_cv8x8x8_1.0.safetensors`, original names plus its latent statistics) as diffusers'
AutoencoderKLCosmos, whose config comes from tensor shapes (diffusers has no single-file loader for it)."""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKLCosmos

from .keymap import KeyMap, block_count, within
from .single_file import StateDict, build_with_weights, preview, read_state_dict

# ---------------------------------------------------------------- transformer

ATTENTION = {"to_q.0": "to_q", "to_q.1": "norm_q", "to_k.0": "to_k", "to_k.1": "norm_k", "to_v.0": "to_v",
             "to_out.0": "to_out.0"}
COSMOS1 = KeyMap(
    modules={
        "x_embedder.proj.1": "patch_embed.proj",
        "t_embedder.1.linear_1": "time_embed.t_embedder.linear_1",
        "t_embedder.1.linear_2": "time_embed.t_embedder.linear_2",
        "affline_norm": "time_embed.norm",
        "final_layer.linear": "proj_out",
        "final_layer.adaLN_modulation.1": "norm_out.linear_1",
        "final_layer.adaLN_modulation.2": "norm_out.linear_2",
        **within("blocks.block{i}.blocks.", "transformer_blocks.{i}.", {
            **within("0.block.attn.", "attn1.", ATTENTION),
            **within("1.block.attn.", "attn2.", ATTENTION),
            "2.block.layer1": "ff.net.0.proj", "2.block.layer2": "ff.net.2",
            **{f"{n - 1}.adaLN_modulation.{j}": f"norm{n}.linear_{j}" for n in (1, 2, 3) for j in (1, 2)},
        }),
    },
    params={f"extra_pos_embedder.pos_emb_{axis}": f"learnable_pos_embed.pos_emb_{axis}" for axis in "thw"},
)


def rope_scale(inner_dim: int) -> tuple[float, float, float]:
    """Rotary scales of the released models (7B: 4096 wide, 14B: 5120), which no weight shape shows."""
    return (2.0, 2.0, 2.0) if inner_dim == 5120 else (2.0, 1.0, 1.0)


# ---------------------------------------------------------------- VAE (CV8x8x8 video tokenizer)

VAE_BUFFERS = re.compile(r"(wavelets|_arange|patch_size_buffer)$")  # Haar tables the model builds itself
LATENT_STATS = ("latent_mean", "latent_std")
# diffusers name -> original name, applied in order (after the up-block index is reversed)
_VAE_RULES = [
    (r"mid_block\.resnets\.0\.", "mid.block_1."), (r"mid_block\.resnets\.1\.", "mid.block_2."),
    (r"mid_block\.attentions\.0\.", "mid.attn_1.0."), (r"mid_block\.temp_attentions\.0\.", "mid.attn_1.1."),
    (r"down_blocks\.", "down."), (r"\.attentions\.(\d+)\.", r".attn.\1.0."), (r"\.temp_attentions\.(\d+)\.", r".attn.\1.1."),
    (r"\.resnets\.", ".block."), (r"\.downsamplers\.0\.", ".downsample."), (r"\.upsamplers\.0\.", ".upsample."),
    (r"\.to_(q|k|v)\.", r".\1.conv3d."), (r"\.to_out\.0\.", ".proj_out.conv3d."),
    (r"\.conv_s\.", ".0.conv3d."), (r"\.conv_t\.", ".1.conv3d."), (r"\.(conv[123])\.(weight|bias)$", r".\1.conv3d.\2"),
    (r"\.conv_shortcut\.", ".nin_shortcut.conv3d."), (r"^(post_quant_conv|quant_conv)\.", r"\1.conv3d."),
]


def vae_native_key(key: str, num_up_blocks: int) -> str:
    """AutoencoderKLCosmos parameter -> the original tokenizer's (whose decoder counts its levels the other way)."""
    key = re.sub(r"up_blocks\.(\d+)\.", lambda m: f"up.{num_up_blocks - 1 - int(m[1])}.", key)
    for pattern, replacement in _VAE_RULES:
        key = re.sub(pattern, replacement, key)
    return key


def vae_config(native: Mapping[str, torch.Tensor]) -> dict:
    """The AutoencoderKLCosmos config of an original tokenizer state dict, from its shapes: widths per level, levels
    with attention, down/upsampling levels (spatial conv1, temporal conv2), Haar patch size from the input width."""
    conv_in = native["encoder.conv_in.0.conv3d.weight"]
    patch_size = round((conv_in.shape[1] / 3) ** (1 / 3))
    levels = block_count(native, "encoder.down.")
    has = lambda level, part: f"encoder.down.{level}.{part}" in native  # noqa: E731
    up_widths = [native[f"decoder.up.{i}.block.0.conv1.0.conv3d.weight"].shape[0]
                 for i in range(block_count(native, "decoder.up."))]
    resolution = 1024  # nominal: attention_resolutions are expressed at it
    return dict(
        in_channels=3, out_channels=3, latent_channels=native["quant_conv.conv3d.weight"].shape[0],
        encoder_block_out_channels=(conv_in.shape[0], *(native[f"encoder.down.{i}.block.0.conv1.0.conv3d.weight"]
                                                        .shape[0] for i in range(levels))),
        decode_block_out_channels=(*up_widths, native["decoder.conv_in.0.conv3d.weight"].shape[0]),
        attention_resolutions=tuple(resolution // patch_size // 2**i for i in range(levels)
                                    if has(i, "attn.0.0.q.conv3d.weight")),
        resolution=resolution, num_layers=block_count(native, "encoder.down.0.block."), patch_size=patch_size,
        patch_type="haar", scaling_factor=1.0,
        spatial_compression_ratio=patch_size * 2 ** sum(has(i, "downsample.conv1.conv3d.weight") for i in range(levels)),
        temporal_compression_ratio=patch_size * 2 ** sum(has(i, "downsample.conv2.conv3d.weight") for i in range(levels)),
        latents_mean=native["latent_mean"].tolist() if "latent_mean" in native else None,
        latents_std=native["latent_std"].tolist() if "latent_std" in native else None)


def vae_to_native(vae: AutoencoderKLCosmos) -> StateDict:
    """A diffusers AutoencoderKLCosmos as the original tokenizer's ComfyUI file (latent statistics included)."""
    num_up = len(vae.decoder.up_blocks)
    native = {vae_native_key(key, num_up): tensor for key, tensor in vae.state_dict().items()}
    for name, values in zip(LATENT_STATS, (vae.config.latents_mean, vae.config.latents_std)):
        native[name] = torch.tensor(values, dtype=torch.float32)
    return native


def load_vae(path: str | Path, dtype: torch.dtype) -> AutoencoderKLCosmos:
    native = {key: tensor for key, tensor in read_state_dict(path).items() if not VAE_BUFFERS.search(key)}
    try:
        config = vae_config(native)
    except KeyError as missing:
        raise ValueError(f"{path} is not a Cosmos CV8x8x8 video tokenizer: it has no {missing}") from None
    with torch.device("meta"):
        model = AutoencoderKLCosmos.from_config(config)
    to_diffusers = {vae_native_key(key, len(model.decoder.up_blocks)): key for key in model.state_dict()}
    unknown = sorted(native.keys() - to_diffusers.keys() - set(LATENT_STATS))
    if unknown:
        raise ValueError(f"{path}: keys that are not part of a Cosmos video tokenizer: {preview(unknown)}")
    state = {to_diffusers[key]: tensor for key, tensor in native.items() if key in to_diffusers}
    return build_with_weights(AutoencoderKLCosmos, config, state, dtype, path, "a Cosmos video tokenizer")
