"""Tiny random-weight Wan 2.1 / 2.2 checkpoints in the layouts the real loader reads (no diffusers folders):

    <root>/config.json                              original Wan config (A14B: in each expert folder)
    <root>/diffusion_pytorch_model.safetensors      native transformer keys (A14B: low_noise_model/, high_noise_model/)
    <root>/Wan2.1_VAE.pth | Wan2.2_VAE.pth          original VAE keys
    <root>/models_t5_umt5-xxl-enc-bf16.pth          original Wan T5 keys
    <root>/google/umt5-xxl/                         tokenizer
    <root>/image_encoder/                           Wan2.1 I2V only: a transformers CLIPVisionModel + its processor
                                                    (Wan2.2 A14B I2V has none: its experts take 36 channels)
    <root>/comfyui/<name>.safetensors               ComfyUI single files: the transformer(s) under
                                                    `model.diffusion_model.`, and UMT5 in transformers names

Sizes follow diffusers' Wan tests (2 heads x 12, text_dim 32, 2 blocks); the VAEs keep the real block structure
at 4-8 channels. Builders are deterministic."""
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from difftrain.formats.single_file import NATIVE_PREFIX, save_native
from difftrain.formats.wan import (
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    original_transformer_config,
    transformer_to_native,
    umt5_to_original,
    vae_to_native,
)
from difftrain.tiny.tokenizers import t5_tokenizer

SEED = 0
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
COMFY_T5_FILE = "comfyui/umt5_xxl_tiny.safetensors"
CLIP_DIR = "image_encoder"
TEXT_DIM = 32
CLIP_DIM = 4


def transformer(in_channels: int = 16, out_channels: int = 16, seed: int = SEED, **kwargs) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=in_channels, out_channels=out_channels, text_dim=TEXT_DIM, freq_dim=256,
                                 ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 **kwargs)


def vae21() -> AutoencoderKLWan:
    torch.manual_seed(SEED)
    return AutoencoderKLWan(base_dim=4, z_dim=16)


def vae22() -> AutoencoderKLWan:
    torch.manual_seed(SEED)
    return AutoencoderKLWan(base_dim=4, decoder_base_dim=8, z_dim=48, in_channels=12, out_channels=12,
                            is_residual=True, patch_size=2, scale_factor_spatial=16, latents_mean=WAN22_LATENTS_MEAN,
                            latents_std=WAN22_LATENTS_STD)


def text_encoder(vocab_size: int) -> UMT5EncoderModel:
    torch.manual_seed(SEED)
    config = UMT5Config(d_model=TEXT_DIM, d_ff=37, d_kv=8, num_heads=4, num_layers=2, relative_attention_num_buckets=8,
                        vocab_size=vocab_size, feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0,
                        eos_token_id=1, decoder_start_token_id=0)
    return UMT5EncoderModel(config).eval()


def image_encoder() -> CLIPVisionModel:
    torch.manual_seed(SEED)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=CLIP_DIM, projection_dim=CLIP_DIM, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=32, intermediate_size=16, patch_size=1))


def write_transformer(model: WanTransformer3DModel, folder: Path, comfy_file: Path) -> None:
    """The original folder layout (config.json + native safetensors) and a ComfyUI single file of the same model."""
    folder.mkdir(parents=True, exist_ok=True)
    native = transformer_to_native(model.state_dict())
    (folder / "config.json").write_text(json.dumps(original_transformer_config(model.config), indent=2))
    save_native(native, folder / "diffusion_pytorch_model.safetensors")
    save_native({f"model.{NATIVE_PREFIX}{k}": v for k, v in native.items()}, comfy_file)


def write_shared(out_dir: Path, vae: AutoencoderKLWan, vae_file: str) -> None:
    """VAE, UMT5 (original .pth and ComfyUI file) and tokenizer."""
    torch.save(vae_to_native(vae.state_dict(), vae.config), out_dir / vae_file)
    tokenizer = t5_tokenizer()
    tokenizer.save_pretrained(out_dir / TOKENIZER_DIR)
    encoder = text_encoder(len(tokenizer))
    torch.save(umt5_to_original(encoder.state_dict()), out_dir / T5_FILE)
    state = {k: v for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    save_native(state, out_dir / COMFY_T5_FILE)


def build_wan21_t2v(out_dir: Path) -> None:
    write_transformer(transformer(), out_dir, out_dir / "comfyui/wan2.1_t2v_tiny.safetensors")
    write_shared(out_dir, vae21(), "Wan2.1_VAE.pth")


def build_wan21_i2v(out_dir: Path) -> None:
    # Real Wan2.1 I2V: 36 input channels (noise + 4 mask + 16 first-frame latents), CLIP image features and the
    # k_img / v_img projections (added_kv_proj_dim = inner dim).
    model = transformer(in_channels=36, image_dim=CLIP_DIM, added_kv_proj_dim=24)
    write_transformer(model, out_dir, out_dir / "comfyui/wan2.1_i2v_tiny.safetensors")
    write_shared(out_dir, vae21(), "Wan2.1_VAE.pth")
    image_encoder().save_pretrained(out_dir / CLIP_DIR, safe_serialization=True)
    CLIPImageProcessor(crop_size=32, size=32).save_pretrained(out_dir / CLIP_DIR)


def build_wan22_a14b(out_dir: Path, task: str = "t2v", in_channels: int = 16) -> None:
    # Two independent experts; different seeds so a LoRA loaded into the wrong one cannot pass for the right one.
    for seed, expert in ((SEED, "high_noise_model"), (SEED + 1, "low_noise_model")):
        name = expert.removesuffix("_model")
        write_transformer(transformer(in_channels, seed=seed), out_dir / expert,
                          out_dir / f"comfyui/wan2.2_{task}_{name}_tiny.safetensors")
    write_shared(out_dir, vae21(), "Wan2.1_VAE.pth")


def build_wan22_a14b_i2v(out_dir: Path) -> None:
    # Real Wan2.2 I2V A14B: 36 input channels (noise + 4 mask + 16 first-frame latents) and no CLIP image encoder,
    # so no img_emb / k_img / v_img; otherwise the T2V layout.
    build_wan22_a14b(out_dir, "i2v", in_channels=36)


def build_wan22_5b(out_dir: Path) -> None:
    write_transformer(transformer(48, 48), out_dir, out_dir / "comfyui/wan2.2_ti2v_5B_tiny.safetensors")
    write_shared(out_dir, vae22(), "Wan2.2_VAE.pth")


TINY_MODELS = {"wan21_t2v": build_wan21_t2v, "wan21_i2v": build_wan21_i2v, "wan22_a14b": build_wan22_a14b,
               "wan22_a14b_i2v": build_wan22_a14b_i2v, "wan22_5b": build_wan22_5b}
