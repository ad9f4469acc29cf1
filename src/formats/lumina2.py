"""Lumina Image 2.0 weights in the single-file layouts ComfyUI ships, and its LoRA / full fine-tune formats.

Training runs on diffusers' ``Lumina2Transformer2DModel``. The native names are those of the original
Lumina-Image-2.0 ``NextDiT`` (ComfyUI's ``lumina_2_model_bf16.safetensors``, bare or under
``model.diffusion_model.``): q/k/v fused into ``attention.qkv`` (grouped-query: k and v are narrower than q),
``feed_forward.w1/w2/w3``, ``adaLN_modulation.1``. diffusers' own converter hard-codes the 2.6B split
(2304, 768, 768); here the split comes from the head counts, so one map serves tiny and real models.

- text encoder (``gemma_2_2b_fp16.safetensors``): Gemma 2 under ``model.``, plus ComfyUI's ``spiece_model`` (the
  SentencePiece tokenizer model's bytes as a uint8 tensor);
- VAE (``flux_vae.safetensors``): the Flux VAE in the original LDM names;
- LoRA (ComfyUI format, what the reference writes): ``diffusion_model.<native module>.lora_A/B.weight``.

Without a Diffusers folder, each part's config is read off its file's tensor shapes (any size), completed by the
published constants that shapes cannot tell (below).
"""
from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL, Lumina2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors import safe_open
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

from difftrain.config.errors import ConfigError

from .keymap import Fused, KeyMap, require_consumed, within
from .sdxl import VAE_PREFIX, vae_to_ldm
from .single_file import (
    NATIVE_PREFIX,
    StateDict,
    build_with_weights,
    count_blocks,
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

# Published values that tensor shapes cannot tell:
# - Lumina-Image-2.0 (Alpha-VLLM/Lumina-Image-2.0 transformer/config.json): 2x2 patches, RoPE over the head's thirds;
PATCH_SIZE = 2
# - Gemma 2 (google/gemma-2-2b config.json; its rope_theta is Gemma2Config's default): no q/k norms, so the head
#   width is not in the weights;
GEMMA2_CONSTANTS = dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                        max_position_embeddings=8192, pad_token_id=0, eos_token_id=1, bos_token_id=2)
# - the Flux VAE (black-forest-labs/FLUX.1-dev vae/config.json): group norms and the latents' scale and shift.
FLUX_VAE_CONSTANTS = dict(norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159)


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


def transformer_config(shapes: Mapping[str, torch.Tensor]) -> dict:
    """The Lumina2Transformer2DModel config of a native transformer state dict (shapes suffice: meta tensors)."""
    shapes = strip_comfy_prefix(shapes)
    hidden_size, patch_features = shapes["x_embedder.weight"].shape
    head_dim = shapes["layers.0.attention.q_norm.weight"].shape[0]
    kv_width = (shapes["layers.0.attention.qkv.weight"].shape[0] - hidden_size) // 2
    return dict(patch_size=PATCH_SIZE, in_channels=patch_features // PATCH_SIZE ** 2, hidden_size=hidden_size,
                num_layers=count_blocks(shapes, "layers"), num_refiner_layers=count_blocks(shapes, "noise_refiner"),
                num_attention_heads=hidden_size // head_dim, num_kv_heads=kv_width // head_dim,
                axes_dim_rope=[head_dim // 3] * 3, cap_feat_dim=shapes["cap_embedder.0.weight"].shape[0],
                **feed_forward_config(hidden_size, shapes["layers.0.feed_forward.w1.weight"].shape[0]))


def feed_forward_config(hidden_size: int, inner_dim: int) -> dict:
    """multiple_of / ffn_dim_multiplier giving this feed-forward width (diffusers rounds 4 x hidden_size, scaled by
    the multiplier, up to a multiple of multiple_of; the released model: 256 and none)."""
    multiplier = None if inner_dim == 4 * hidden_size else inner_dim / (4 * hidden_size)
    return dict(multiple_of=math.gcd(inner_dim, 256), ffn_dim_multiplier=multiplier)


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


def gemma_to_comfyui(state_dict: Mapping[str, torch.Tensor], spiece: bytes) -> StateDict:
    """Gemma 2 weights and its SentencePiece tokenizer model as ComfyUI's `gemma_2_2b_fp16.safetensors`."""
    return {**{GEMMA_PREFIX + key: tensor for key, tensor in state_dict.items()},
            COMFY_TOKENIZER_KEY: spiece_tensor(spiece)}


def gemma_config(shapes: Mapping[str, torch.Tensor]) -> Gemma2Config:
    """The Gemma 2 config of ComfyUI's single file, from its tensor shapes and GEMMA2_CONSTANTS."""
    vocab_size, hidden_size = shapes[f"{GEMMA_PREFIX}embed_tokens.weight"].shape
    attention, head_dim = f"{GEMMA_PREFIX}layers.0.self_attn.", GEMMA2_CONSTANTS["head_dim"]
    return Gemma2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=count_blocks(shapes, f"{GEMMA_PREFIX}layers"),
        intermediate_size=shapes[f"{GEMMA_PREFIX}layers.0.mlp.gate_proj.weight"].shape[0],
        num_attention_heads=shapes[f"{attention}q_proj.weight"].shape[0] // head_dim,
        num_key_value_heads=shapes[f"{attention}k_proj.weight"].shape[0] // head_dim, **GEMMA2_CONSTANTS)


def load_tokenizer(path: str | Path) -> GemmaTokenizer:
    """The Gemma tokenizer ComfyUI's file carries (`spiece_model`)."""
    with safe_open(str(path), "pt") as f:
        if COMFY_TOKENIZER_KEY not in f.keys():
            raise ConfigError(f"model.llm_path={path} holds no tokenizer ({COMFY_TOKENIZER_KEY}, as ComfyUI's "
                              f"gemma_2_2b_fp16.safetensors does): use ComfyUI's file, or set model.diffusers_path to "
                              f"a Lumina-Image-2.0 Diffusers folder for the tokenizer.")
        return spiece_tokenizer(f.get_tensor(COMFY_TOKENIZER_KEY).numpy().tobytes())


def spiece_tokenizer(spiece: bytes) -> GemmaTokenizer:
    """The Gemma tokenizer of a serialised SentencePiece model (BOS first, as Gemma's and ComfyUI's)."""
    with tempfile.TemporaryDirectory() as folder:  # transformers converts SentencePiece models from files only
        model_file = Path(folder) / "tokenizer.model"
        model_file.write_bytes(spiece)
        return GemmaTokenizer(**GemmaTokenizer.convert_to_native_format(vocab_file=str(model_file)),
                              add_bos_token=True)


def spiece_tensor(spiece: bytes) -> torch.Tensor:
    """A SentencePiece model as ComfyUI stores it beside Gemma's weights."""
    return torch.frombuffer(bytearray(spiece), dtype=torch.uint8)


def load_text_encoder(path: str | Path, config: Gemma2Config, dtype: torch.dtype) -> Gemma2Model:
    """Gemma 2 from ComfyUI's single file (`model.<name>`)."""
    state = read_state_dict(path)
    state.pop(COMFY_TOKENIZER_KEY, None)
    require_consumed([key for key in state if not key.startswith(GEMMA_PREFIX)], f"{path} (keys without {GEMMA_PREFIX})")
    state = {key.removeprefix(GEMMA_PREFIX): tensor for key, tensor in state.items()}
    return build_with_weights(Gemma2Model, config, state, dtype, path, "a Gemma 2 text encoder")


def vae_to_comfyui(vae: AutoencoderKL) -> StateDict:
    """The diffusers Flux VAE in the original LDM names, bare (as ComfyUI's `flux_vae.safetensors`)."""
    return {key.removeprefix(VAE_PREFIX): tensor for key, tensor in vae_to_ldm(vae.state_dict(), vae.config).items()}


def vae_config(shapes: Mapping[str, torch.Tensor]) -> dict:
    """The AutoencoderKL config of a single-file Flux VAE (LDM names), from its tensor shapes and FLUX_VAE_CONSTANTS."""
    levels = count_blocks(shapes, "encoder.down")
    return dict(in_channels=shapes["encoder.conv_in.weight"].shape[1],
                out_channels=shapes["decoder.conv_out.weight"].shape[0],
                latent_channels=shapes["decoder.conv_in.weight"].shape[1],
                block_out_channels=[shapes[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)],
                layers_per_block=count_blocks(shapes, "encoder.down.0.block"),
                down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                use_quant_conv="quant_conv.weight" in shapes, use_post_quant_conv="post_quant_conv.weight" in shapes,
                **FLUX_VAE_CONSTANTS)


def load_vae(path: str | Path, config: Mapping, dtype: torch.dtype) -> AutoencoderKL:
    """A single-file Flux VAE (LDM names, as ComfyUI's `flux_vae.safetensors`)."""
    state = convert_ldm_vae_checkpoint(read_state_dict(path), dict(config))
    return build_with_weights(AutoencoderKL, config, state, dtype, path, "a Flux VAE")
