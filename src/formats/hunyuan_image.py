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
- ByT5 (``byt5_small_glyphxl_fp16.safetensors``): a T5 state dict; its encoder is what the pipeline runs;
- Qwen2.5-VL (``qwen_2.5_vl_7b.safetensors``): the original checkpoint names (formats.qwen_image).

Without a Diffusers folder, each part's config is read off its file's tensor shapes (any size), completed by the
published constants that shapes cannot tell (below).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKLHunyuanImage, HunyuanImageTransformer2DModel
from transformers import Qwen2_5_VLConfig, T5Config, T5EncoderModel

from .keymap import Fused, KeyMap, swap_halves, widths, within
from .single_file import (
    StateDict,
    build_with_weights,
    count_blocks,
    read_state_dict,
    refuse_fp8_scaled,
    save_native,
    strip_comfy_prefix,
)

# Published values that tensor shapes cannot tell:
# - the transformer (hunyuanvideo-community/HunyuanImage-2.1-Diffusers transformer/config.json): RoPE over height
#   and width, each half of the head;
TRANSFORMER_CONSTANTS = dict(qk_norm="rms_norm", rope_theta=256.0)
ROPE_AXES = 2
# - the VAE (Tencent's HunyuanImage-2.1 vae config.json);
VAE_CONSTANTS = dict(sample_size=384, scaling_factor=0.75289, downsample_match_channel=True,
                     upsample_match_channel=True)
# - Qwen2.5-VL-7B-Instruct (config.json): no q/k norms, so the head widths are not in the weights;
QWEN_HEAD_DIM, QWEN_VISION_HEAD_DIM = 128, 80
QWEN_TEXT_CONSTANTS = dict(rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=128000,
                           rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
                           bos_token_id=151643, eos_token_id=151645)
QWEN_VISION_CONSTANTS = dict(fullatt_block_indexes=[7, 15, 23, 31], window_size=112, tokens_per_second=2)
QWEN_TOKEN_IDS = dict(vision_start_token_id=151652, vision_end_token_id=151653, vision_token_id=151654,
                      image_token_id=151655, video_token_id=151656)
# - the glyph ByT5 (google/byt5-small config.json; T5's default relative_attention_max_distance).
BYT5_CONSTANTS = dict(feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, relative_attention_max_distance=128,
                      is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)

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


def load_vae(path: str | Path, config: Mapping, dtype: torch.dtype) -> AutoencoderKLHunyuanImage:
    """ComfyUI's VAE file (the original layout); the map comes from the VAE of `config` on the meta device."""
    with torch.device("meta"):
        skeleton = AutoencoderKLHunyuanImage.from_config(dict(config))
    state = vae_keymap(skeleton).to_diffusers(read_state_dict(path), str(path))
    return build_with_weights(AutoencoderKLHunyuanImage, config, state, dtype, path, "the HunyuanImage-2.1 VAE")


def vae_to_original(vae: AutoencoderKLHunyuanImage) -> StateDict:
    return vae_keymap(vae).to_native(vae.state_dict(), "the diffusers HunyuanImage-2.1 VAE")


def load_byt5(path: str | Path, config: T5Config, dtype: torch.dtype) -> T5EncoderModel:
    """The glyph ByT5 encoder from a T5 state dict (a whole encoder-decoder's decoder is left out)."""
    state = {key: tensor for key, tensor in read_state_dict(path).items() if not key.startswith(T5_DECODER_PREFIXES)}
    return build_with_weights(T5EncoderModel, config, state, dtype, path, "the glyph ByT5 encoder",
                              may_lack=(T5_TIED_EMBEDDING,))



def transformer_config(shapes: Mapping[str, torch.Tensor]) -> dict:
    """The HunyuanImageTransformer2DModel config of ComfyUI's transformer file (shapes suffice: meta tensors)."""
    shapes = strip_comfy_prefix(shapes)
    hidden_size, in_channels, patch, _ = shapes["img_in.proj.weight"].shape
    head_dim = shapes["double_blocks.0.img_attn_q_norm.weight"].shape[0]
    return dict(in_channels=in_channels, out_channels=shapes["final_layer.linear.weight"].shape[0] // patch ** 2,
                num_attention_heads=hidden_size // head_dim, attention_head_dim=head_dim,
                num_layers=count_blocks(shapes, "double_blocks"), num_single_layers=count_blocks(shapes, "single_blocks"),
                num_refiner_layers=count_blocks(shapes, "txt_in.individual_token_refiner.blocks"),
                mlp_ratio=shapes["double_blocks.0.img_mlp.fc1.weight"].shape[0] / hidden_size, patch_size=(patch, patch),
                guidance_embeds="guidance_in.mlp.0.weight" in shapes,
                text_embed_dim=shapes["txt_in.input_embedder.weight"].shape[1],
                text_embed_2_dim=shapes["byt5_in.fc1.weight"].shape[1] if "byt5_in.fc1.weight" in shapes else None,
                rope_axes_dim=(head_dim // ROPE_AXES,) * ROPE_AXES, use_meanflow="time_r_in.mlp.0.weight" in shapes,
                **TRANSFORMER_CONSTANTS)


def vae_config(shapes: Mapping[str, torch.Tensor]) -> dict:
    """The AutoencoderKLHunyuanImage config of ComfyUI's VAE file (original layout): each 2x resampler halves the
    side, so the compression is 2 ** their count."""
    stages = count_blocks(shapes, "encoder.down")
    resamplers = sum(any(key.startswith(f"encoder.down.{i}.downsample.") for key in shapes) for i in range(stages))
    return dict(in_channels=shapes["encoder.conv_in.weight"].shape[1],
                out_channels=shapes["decoder.conv_out.weight"].shape[0],
                latent_channels=shapes["decoder.conv_in.weight"].shape[1],
                block_out_channels=[shapes[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(stages)],
                layers_per_block=count_blocks(shapes, "encoder.down.0.block"),
                spatial_compression_ratio=2 ** resamplers, **VAE_CONSTANTS)


def qwen_config(shapes: Mapping[str, torch.Tensor]) -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL config of ComfyUI's file (original names: `model.` text, `visual.` vision tower)."""
    vocab_size, hidden_size = shapes["model.embed_tokens.weight"].shape
    vision_width, _, temporal_patch, patch, _ = shapes["visual.patch_embed.proj.weight"].shape
    merged_width = shapes["visual.merger.mlp.0.weight"].shape[1]
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=count_blocks(shapes, "model.layers"),
                intermediate_size=shapes["model.layers.0.mlp.gate_proj.weight"].shape[0],
                num_attention_heads=hidden_size // QWEN_HEAD_DIM,
                num_key_value_heads=shapes["model.layers.0.self_attn.k_proj.weight"].shape[0] // QWEN_HEAD_DIM,
                **QWEN_TEXT_CONSTANTS)
    vision = dict(depth=count_blocks(shapes, "visual.blocks"), hidden_size=vision_width,
                  intermediate_size=shapes["visual.blocks.0.mlp.gate_proj.weight"].shape[0],
                  num_heads=vision_width // QWEN_VISION_HEAD_DIM, out_hidden_size=hidden_size, patch_size=patch,
                  temporal_patch_size=temporal_patch, spatial_merge_size=int((merged_width // vision_width) ** 0.5),
                  **QWEN_VISION_CONSTANTS)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, hidden_size=hidden_size, vocab_size=vocab_size,
                            **QWEN_TOKEN_IDS)


def byt5_config(shapes: Mapping[str, torch.Tensor]) -> T5Config:
    """The glyph ByT5's T5 config, from its file's shapes (the relative attention table has a column per head)."""
    vocab_size, d_model = shapes["shared.weight"].shape
    attention = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = shapes[f"{attention}relative_attention_bias.weight"].shape
    return T5Config(vocab_size=vocab_size, d_model=d_model, num_heads=heads,
                    d_kv=shapes[f"{attention}q.weight"].shape[0] // heads, num_layers=count_blocks(shapes, "encoder.block"),
                    d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
                    relative_attention_num_buckets=buckets, **BYT5_CONSTANTS)
