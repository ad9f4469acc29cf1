"""HunyuanImage-2.1 weights in the single-file layouts ComfyUI ships, and its LoRA / full fine-tune formats.

Training runs on diffusers' ``HunyuanImageTransformer2DModel``. The native names are Tencent's original ones, in
which ComfyUI's ``hunyuanimage2.1.safetensors`` comes (bare keys): q/k/v fused into ``img_attn_qkv`` /
``txt_attn_qkv`` / the refiner's ``self_attn_qkv``, q/k/v and the MLP input fused into the single blocks'
``linear1``, ``img_mlp.fc1``, ``img_mod.linear``, ``modulation.linear``, ``byt5_in.fc1``.

- LoRA (ComfyUI format): ComfyUI renames the original names when it loads the checkpoint (``img_attn_qkv`` ->
  ``img_attn.qkv``, ...) and its LoRA keys follow the renamed model: ``diffusion_model.<renamed>.lora_A/B.weight``
  (LORA_RENAMES);
- VAE (``hunyuan_image_2.1_vae_fp16.safetensors``): the original ``encoder.down.N.block.M`` layout, whose stages
  diffusers flattens into one ``down_blocks`` list (vae_keymap);
- ByT5 (``byt5_small_glyphxl_fp16.safetensors``): a T5 state dict; its encoder is what the pipeline runs.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKLHunyuanImage, HunyuanImageTransformer2DModel
from transformers import T5Config, T5EncoderModel

from .keymap import Fused, KeyMap, swap_halves, widths, within
from .single_file import (
    StateDict,
    build_with_weights,
    read_state_dict,
    refuse_fp8_scaled,
    save_native,
    strip_comfy_prefix,
)

DOUBLE, SINGLE = "double_blocks.{i}.", "single_blocks.{i}."
DIFFUSERS_DOUBLE, DIFFUSERS_SINGLE = "transformer_blocks.{i}.", "single_transformer_blocks.{i}."
REFINER, DIFFUSERS_REFINER = "txt_in.individual_token_refiner.blocks.{i}.", "context_embedder.token_refiner.refiner_blocks.{i}."
QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
ADDED_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")


def _fused(native_prefix: str, diffusers_prefix: str, native: str, parts: tuple[str, ...], *rows: int) -> dict:
    return {native_prefix + native: Fused(tuple(diffusers_prefix + part for part in parts), widths(*rows))}


def _mlp_embedder(native: str, diffusers: str, first: str = "mlp.0", second: str = "mlp.2") -> dict[str, str]:
    return {f"{native}.{first}": f"{diffusers}.linear_1", f"{native}.{second}": f"{diffusers}.linear_2"}


TRANSFORMER = KeyMap(
    modules={
        "img_in.proj": "x_embedder.proj",
        "txt_in.input_embedder": "context_embedder.proj_in",
        **_mlp_embedder("txt_in.t_embedder", "context_embedder.time_text_embed.timestep_embedder"),
        **_mlp_embedder("txt_in.c_embedder", "context_embedder.time_text_embed.text_embedder", "linear_1", "linear_2"),
        **within(REFINER, DIFFUSERS_REFINER, {
            "norm1": "norm1", "norm2": "norm2", "self_attn_proj": "attn.to_out.0", "mlp.fc1": "ff.net.0.proj",
            "mlp.fc2": "ff.net.2", "adaLN_modulation.1": "norm_out.linear"}),
        **_mlp_embedder("time_in", "time_guidance_embed.timestep_embedder"),
        **_mlp_embedder("time_r_in", "time_guidance_embed.timestep_embedder_r"),
        **_mlp_embedder("guidance_in", "time_guidance_embed.guidance_embedder"),
        "byt5_in.layernorm": "context_embedder_2.norm",
        **{f"byt5_in.fc{n}": f"context_embedder_2.linear_{n}" for n in (1, 2, 3)},
        **within(DOUBLE, DIFFUSERS_DOUBLE, {
            "img_mod.linear": "norm1.linear", "txt_mod.linear": "norm1_context.linear",
            "img_attn_proj": "attn.to_out.0", "txt_attn_proj": "attn.to_add_out",
            "img_mlp.fc1": "ff.net.0.proj", "img_mlp.fc2": "ff.net.2",
            "txt_mlp.fc1": "ff_context.net.0.proj", "txt_mlp.fc2": "ff_context.net.2"}),
        **within(SINGLE, DIFFUSERS_SINGLE, {"linear2": "proj_out", "modulation.linear": "norm.linear"}),
        "final_layer.linear": "proj_out",
        "final_layer.adaLN_modulation.1": "norm_out.linear",
    },
    params={f"{native}.weight": f"{diffusers}.weight" for native, diffusers in {
        **within(DOUBLE, DIFFUSERS_DOUBLE, {
            "img_attn_q_norm": "attn.norm_q", "img_attn_k_norm": "attn.norm_k",
            "txt_attn_q_norm": "attn.norm_added_q", "txt_attn_k_norm": "attn.norm_added_k"}),
        **within(SINGLE, DIFFUSERS_SINGLE, {"q_norm": "attn.norm_q", "k_norm": "attn.norm_k"}),
    }.items()},
    fused={
        **_fused(REFINER, DIFFUSERS_REFINER, "self_attn_qkv", QKV, 1, 1, 1),
        **_fused(DOUBLE, DIFFUSERS_DOUBLE, "img_attn_qkv", QKV, 1, 1, 1),
        **_fused(DOUBLE, DIFFUSERS_DOUBLE, "txt_attn_qkv", ADDED_QKV, 1, 1, 1),
        # the released model's (and the tiny one's) mlp_ratio of 4
        **_fused(SINGLE, DIFFUSERS_SINGLE, "linear1", (*QKV, "proj_mlp"), 1, 1, 1, 4),
    },
    # diffusers' AdaLayerNormContinuous emits (scale, shift); the original final layer (shift, scale).
    transforms={"final_layer.adaLN_modulation.1": swap_halves},
)
# ComfyUI's names of the original modules (its loader renames the checkpoint's keys so), which LoRA keys use.
LORA_RENAMES = {"_attn_qkv": "_attn.qkv", "_attn_proj": "_attn.proj", "_mlp.fc1": "_mlp.0", "_mlp.fc2": "_mlp.2",
                "_mod.linear": "_mod.lin", "modulation.linear": "modulation.lin"}
T5_DECODER_PREFIXES = ("decoder.", "lm_head.")
T5_TIED_EMBEDDING = "encoder.embed_tokens.weight"  # = shared.weight


def load_transformer(path: str | Path, config: Mapping, dtype: torch.dtype) -> HunyuanImageTransformer2DModel:
    """ComfyUI's transformer file (original names, bare or under `model.diffusion_model.`)."""
    native = strip_comfy_prefix(read_state_dict(path))
    refuse_fp8_scaled(native, path)
    state = TRANSFORMER.to_diffusers(native, str(path))
    return build_with_weights(HunyuanImageTransformer2DModel, config, state, dtype, path,
                              "a HunyuanImage-2.1 transformer")


def save_transformer(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """diffusers transformer weights as ComfyUI's single file (original names, bare keys), atomically."""
    save_native(TRANSFORMER.to_native(state_dict, "the diffusers HunyuanImage-2.1 transformer"), path)


def lora_to_comfyui(lora_state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """PEFT LoRA weights under diffusers names -> `diffusion_model.<ComfyUI name>.lora_A/B.weight`."""
    native = TRANSFORMER.lora_to_native(lora_state_dict, "the HunyuanImage-2.1 LoRA")
    return {_renamed(key, LORA_RENAMES): tensor for key, tensor in native.items()}


def lora_from_comfyui(lora_state_dict: Mapping[str, torch.Tensor], what: str) -> StateDict:
    """A ComfyUI-format HunyuanImage-2.1 LoRA -> PEFT weights under diffusers names."""
    original = {comfy: name for name, comfy in LORA_RENAMES.items()}
    return TRANSFORMER.lora_to_diffusers({_renamed(key, original): tensor for key, tensor in lora_state_dict.items()},
                                         what)


def _renamed(key: str, renames: Mapping[str, str]) -> str:
    for old, new in renames.items():
        key = key.replace(old, new)
    return key


def vae_keymap(vae: AutoencoderKLHunyuanImage) -> KeyMap:
    """The original <-> diffusers VAE names of this VAE's architecture (any stage count and depth): diffusers
    lists each stage's resnets and its resampler as consecutive entries of one list."""
    layers = vae.config.layers_per_block
    modules = {"encoder.conv_in": "encoder.conv_in", "encoder.norm_out": "encoder.norm_out",
               "encoder.conv_out": "encoder.conv_out", "decoder.conv_in": "decoder.conv_in",
               "decoder.norm_out": "decoder.norm_out", "decoder.conv_out": "decoder.conv_out"}
    for part, lists, native, resampler, per_stage in (("encoder", "down_blocks", "down", "downsample", layers),
                                                     ("decoder", "up_blocks", "up", "upsample", layers + 1)):
        stages = getattr(vae, part).get_submodule(lists)
        for native_name, index in _stage_entries(stages, native, resampler, per_stage):
            for leaf in _leaves(stages[index]):
                modules[f"{part}.{native_name}.{leaf}"] = f"{part}.{lists}.{index}.{leaf}"
        mid = f"{part}.mid_block"
        modules.update({f"{part}.mid.block_{n + 1}.{leaf}": f"{mid}.resnets.{n}.{leaf}"
                        for n in range(2) for leaf in ("norm1", "conv1", "norm2", "conv2")})
        modules.update({f"{part}.mid.attn_1.{native}": f"{mid}.attentions.0.{name}" for native, name in
                        {"norm": "norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "proj"}.items()})
    return KeyMap(modules=modules)


def _leaves(module: torch.nn.Module) -> list[str]:
    return [name for name, child in module.named_modules() if name and not list(child.children())]


def _stage_entries(stages: torch.nn.ModuleList, native: str, resampler: str, per_stage: int
                   ) -> list[tuple[str, int]]:
    """(original name, index in diffusers' flat list) of each resnet and resampler, stage by stage."""
    entries, stage, resnets = [], 0, 0
    for index, module in enumerate(stages):
        if hasattr(module, "conv1"):  # a resnet
            if resnets == per_stage:  # the previous stage ended without a resampler
                stage, resnets = stage + 1, 0
            entries.append((f"{native}.{stage}.block.{resnets}", index))
            resnets += 1
        else:
            entries.append((f"{native}.{stage}.{resampler}", index))
            stage, resnets = stage + 1, 0
    return entries


def load_vae(path: str | Path, skeleton: AutoencoderKLHunyuanImage, dtype: torch.dtype) -> AutoencoderKLHunyuanImage:
    """ComfyUI's VAE file (the original layout); `skeleton`: the VAE of the Diffusers folder's vae/ config on the
    meta device, which gives the map."""
    state = vae_keymap(skeleton).to_diffusers(read_state_dict(path), str(path))
    return build_with_weights(AutoencoderKLHunyuanImage, skeleton.config, state, dtype, path,
                              "the HunyuanImage-2.1 VAE")


def vae_to_original(vae: AutoencoderKLHunyuanImage) -> StateDict:
    return vae_keymap(vae).to_native(vae.state_dict(), "the diffusers HunyuanImage-2.1 VAE")


def load_byt5(path: str | Path, config: T5Config, dtype: torch.dtype) -> T5EncoderModel:
    """The glyph ByT5 encoder from a T5 state dict (a whole encoder-decoder's decoder is left out)."""
    state = {key: tensor for key, tensor in read_state_dict(path).items() if not key.startswith(T5_DECODER_PREFIXES)}
    return build_with_weights(T5EncoderModel, config, state, dtype, path, "the glyph ByT5 encoder",
                              may_lack=(T5_TIED_EMBEDDING,))

