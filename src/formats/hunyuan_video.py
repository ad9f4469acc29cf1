"""HunyuanVideo weights in the layouts people download: Tencent's official inference folder (the transformer as
`mp_rank_00_model_states.pt`, a DeepSpeed `module` dict) and ComfyUI single files, both in the original (Tencent)
names. Training runs on diffusers' HunyuanVideoTransformer3DModel.

diffusers' own single-file and LoRA converters hard-code the 13B sizes (the single blocks' fused linear1 is split
at 3072 rows); this key map derives every split from tensor shapes, so one map serves tiny and real models. The
VAE's original names are diffusers' names (its converter renames nothing). LoRAs export as diffusion-pipe does:
`transformer.<original module>.lora_A/lora_B.weight`, the format ComfyUI and diffusers' HunyuanVideo loader read.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel

from .keymap import Fused, KeyMap, block_count, swap_halves, widths, within
from .single_file import StateDict, build_with_weights, read_shapes, read_state_dict, strip_comfy_prefix

DOUBLE, SINGLE = "double_blocks.{i}.", "single_blocks.{i}."
DIFFUSERS_DOUBLE, DIFFUSERS_SINGLE = "transformer_blocks.{i}.", "single_transformer_blocks.{i}."
REFINER, DIFFUSERS_REFINER = "txt_in.individual_token_refiner.blocks.{i}.", "context_embedder.token_refiner.refiner_blocks.{i}."
# The official inference folder (`ckpt_path`), as Tencent's download instructions lay it out.
OFFICIAL_DIR = "hunyuan-video-t2v-720p"
TRANSFORMER_FILE = f"{OFFICIAL_DIR}/transformers/mp_rank_00_model_states.pt"
VAE_FILE = f"{OFFICIAL_DIR}/vae/pytorch_model.pt"
LLM_DIR, CLIP_DIR = "text_encoder", "text_encoder_2"  # llava-llama-3-8b's Llama, clip-vit-large-patch14
LORA_PREFIX = "transformer."  # diffusion-pipe's HunyuanVideo LoRA: transformer.<original names>
# The released models' rotary axes (128-wide heads); no weight shape shows them.
ROPE_AXES_DIM = (16, 56, 56)


def _qkv(prefix: str, names: Sequence[str]) -> Fused:
    return Fused(tuple(prefix + name for name in names), widths(*[1] * len(names)))


HUNYUAN_VIDEO = KeyMap(
    modules={
        "img_in.proj": "x_embedder.proj",
        "time_in.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "time_in.mlp.2": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.mlp.0": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.mlp.2": "time_text_embed.guidance_embedder.linear_2",
        "txt_in.input_embedder": "context_embedder.proj_in",
        "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
        "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
        "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
        "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
        "final_layer.linear": "proj_out",
        "final_layer.adaLN_modulation.1": "norm_out.linear",
        **within(REFINER, DIFFUSERS_REFINER, {
            "norm1": "norm1", "norm2": "norm2", "self_attn_proj": "attn.to_out.0", "mlp.fc1": "ff.net.0.proj",
            "mlp.fc2": "ff.net.2", "adaLN_modulation.1": "norm_out.linear",
        }),
        **within(DOUBLE, DIFFUSERS_DOUBLE, {
            "img_mod.linear": "norm1.linear", "txt_mod.linear": "norm1_context.linear",
            "img_attn_q_norm": "attn.norm_q", "img_attn_k_norm": "attn.norm_k", "img_attn_proj": "attn.to_out.0",
            "txt_attn_q_norm": "attn.norm_added_q", "txt_attn_k_norm": "attn.norm_added_k",
            "txt_attn_proj": "attn.to_add_out",
            "img_mlp.fc1": "ff.net.0.proj", "img_mlp.fc2": "ff.net.2",
            "txt_mlp.fc1": "ff_context.net.0.proj", "txt_mlp.fc2": "ff_context.net.2",
        }),
        **within(SINGLE, DIFFUSERS_SINGLE, {
            "linear2": "proj_out", "q_norm": "attn.norm_q", "k_norm": "attn.norm_k", "modulation.linear": "norm.linear",
        }),
    },
    fused={
        REFINER + "self_attn_qkv": _qkv(DIFFUSERS_REFINER, ("attn.to_q", "attn.to_k", "attn.to_v")),
        DOUBLE + "img_attn_qkv": _qkv(DIFFUSERS_DOUBLE, ("attn.to_q", "attn.to_k", "attn.to_v")),
        DOUBLE + "txt_attn_qkv": _qkv(DIFFUSERS_DOUBLE, ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
        SINGLE + "linear1": Fused(
            tuple(DIFFUSERS_SINGLE + p for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")), widths(1, 1, 1, 4)),
    },
    # diffusers' AdaLayerNormContinuous emits (scale, shift); the original final layer emits (shift, scale).
    transforms={"final_layer.adaLN_modulation.1": swap_halves},
)


# ---------------------------------------------------------------- transformer

def read_native_transformer(path: str | Path) -> StateDict:
    """Original names from the official `.pt` (its DeepSpeed `module` dict, read with weights_only=True) or a
    ComfyUI single file (bare or under `model.diffusion_model.`; fp8 files as stored)."""
    state = read_state_dict(path)
    return strip_comfy_prefix(state.get("module", state))


def read_native_shapes(path: str | Path) -> StateDict:
    """Meta tensors shaped as the checkpoint's: a safetensors header, or the memory-mapped `.pt` (nothing read)."""
    if Path(path).suffix == ".safetensors":
        return strip_comfy_prefix(read_shapes(path))
    return {key: torch.empty(tensor.shape, device="meta") for key, tensor in read_native_transformer(path).items()}


def transformer_config(native: Mapping[str, torch.Tensor], rope_axes_dim: Sequence[int] = ROPE_AXES_DIM) -> dict:
    """The diffusers HunyuanVideoTransformer3DModel config of an original state dict, from its tensor shapes."""
    inner_dim, in_channels, patch_t, patch = native["img_in.proj.weight"].shape[:4]
    head_dim = native[DOUBLE.format(i=0) + "img_attn_q_norm.weight"].shape[0]
    if sum(rope_axes_dim) != head_dim:
        raise ValueError(f"the rotary axes {list(rope_axes_dim)} do not sum to this transformer's head width {head_dim}")
    return dict(
        in_channels=in_channels, out_channels=native["final_layer.linear.weight"].shape[0] // (patch_t * patch * patch),
        num_attention_heads=inner_dim // head_dim, attention_head_dim=head_dim,
        num_layers=block_count(native, "double_blocks."), num_single_layers=block_count(native, "single_blocks."),
        num_refiner_layers=block_count(native, "txt_in.individual_token_refiner.blocks."),
        mlp_ratio=native[DOUBLE.format(i=0) + "img_mlp.fc1.weight"].shape[0] / inner_dim,
        patch_size=patch, patch_size_t=patch_t, guidance_embeds="guidance_in.mlp.0.weight" in native,
        text_embed_dim=native["txt_in.input_embedder.weight"].shape[1],
        pooled_projection_dim=native["vector_in.in_layer.weight"].shape[1], rope_axes_dim=tuple(rope_axes_dim))


def load_transformer(path: str | Path, dtype: torch.dtype, rope_axes_dim: Sequence[int] = ROPE_AXES_DIM
                     ) -> HunyuanVideoTransformer3DModel:
    native = read_native_transformer(path)
    try:
        config = transformer_config(native, rope_axes_dim)
    except KeyError as missing:
        raise ValueError(f"{path} is not a HunyuanVideo transformer: it has no {missing}") from None
    state = HUNYUAN_VIDEO.to_diffusers(native, str(path))
    return build_with_weights(HunyuanVideoTransformer3DModel, config, state, dtype, path,
                              "a HunyuanVideo transformer")


def transformer_to_native(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    return HUNYUAN_VIDEO.to_native(state_dict, "the diffusers HunyuanVideo transformer")


# ---------------------------------------------------------------- VAE

def vae_config(state: Mapping[str, torch.Tensor]) -> dict:
    """AutoencoderKLHunyuanVideo config of a VAE state dict: widths and depths from shapes, the rest (group norms,
    compression, scaling factor) as every released HunyuanVideo VAE has them (diffusers' defaults)."""
    blocks = block_count(state, "encoder.down_blocks.")
    return dict(
        in_channels=state["encoder.conv_in.conv.weight"].shape[1],
        out_channels=state["decoder.conv_out.conv.weight"].shape[0],
        latent_channels=state["decoder.conv_in.conv.weight"].shape[1],
        block_out_channels=[state[f"encoder.down_blocks.{i}.resnets.0.conv2.conv.weight"].shape[0]
                            for i in range(blocks)],
        layers_per_block=block_count(state, "encoder.down_blocks.0.resnets."),
        mid_block_add_attention=any(key.startswith("encoder.mid_block.attentions.") for key in state))


def load_vae(path: str | Path, dtype: torch.dtype) -> AutoencoderKLHunyuanVideo:
    """The official `vae/pytorch_model.pt` (keys optionally under `vae.`) or ComfyUI's VAE file."""
    state = {key.removeprefix("vae."): tensor for key, tensor in read_state_dict(path).items()}
    try:
        config = vae_config(state)
    except KeyError as missing:
        raise ValueError(f"{path} is not a HunyuanVideo VAE: it has no {missing}") from None
    return build_with_weights(AutoencoderKLHunyuanVideo, config, state, dtype, path, "a HunyuanVideo VAE")


# ---------------------------------------------------------------- LoRA

def lora_to_original(lora_state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """PEFT LoRA weights (`<diffusers module>.lora_A.weight`) -> `transformer.<original module>.lora_A.weight`."""
    return HUNYUAN_VIDEO.lora_to_native(lora_state_dict, "the HunyuanVideo LoRA", prefix=LORA_PREFIX)


def lora_from_original(lora_state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The inverse: our reader, for the single blocks' linear1 that diffusers' converter splits at 3072 rows."""
    return HUNYUAN_VIDEO.lora_to_diffusers(lora_state_dict, "the HunyuanVideo LoRA", prefix=LORA_PREFIX)
