"""Tiny random-weight Stable Diffusion 3.5: a diffusers StableDiffusion3Pipeline folder.

Shaped like the real one, only smaller: a transformer with SD3.5's dual attention layer and qk RMSNorm on 2x2
patches of 16-channel latents, the 8x VAE with SD3's latent shift/scale, two CLIP text encoders with projections of
*different* widths (as CLIP-L 768 / CLIP-G 1280) whose concatenation is narrower than T5 (as 2048 < 4096), and T5."""
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from difftrain.tiny import flux
from difftrain.tiny.tokenizers import clip_tokenizer, t5_tokenizer

SEED = 0
CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 8, 16, 32  # T5_WIDTH: the tiny Flux T5's d_model

# SD3 Medium's layout; SD3.5 (Medium and Large) adds qk RMSNorm, Medium also dual attention layers.
SD3_TRANSFORMER_CONFIG = dict(
    sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=T5_WIDTH,
    pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH, pos_embed_max_size=32)
SD35_TRANSFORMER_CONFIG = dict(SD3_TRANSFORMER_CONFIG, dual_attention_layers=(0,), qk_norm="rms_norm")


def transformer(config: dict = SD35_TRANSFORMER_CONFIG) -> SD3Transformer2DModel:
    torch.manual_seed(SEED)
    return SD3Transformer2DModel(**config)


def vae() -> AutoencoderKL:
    """The tiny Flux VAE (16 channels, factor 8, no quant convs, as SD3's) with SD3's latent shift/scale."""
    model = flux.vae()
    model.register_to_config(shift_factor=0.0609, scaling_factor=1.5035)
    return model


def clip_text_encoder(width: int, act: str) -> CLIPTextModelWithProjection:
    torch.manual_seed(SEED)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=width, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=3, vocab_size=1000, hidden_act=act, projection_dim=width)).eval()


def pipeline() -> StableDiffusion3Pipeline:
    tokenizer_3 = t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer(), vae=vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=clip_text_encoder(CLIP_L_WIDTH, "quick_gelu"), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text_encoder(CLIP_G_WIDTH, "gelu"), tokenizer_2=clip_tokenizer(),
        text_encoder_3=flux.t5_text_encoder(len(tokenizer_3)), tokenizer_3=tokenizer_3)


def build(out_dir: Path) -> None:
    pipeline().save_pretrained(out_dir)


TINY_MODELS = {"sd3": build}
