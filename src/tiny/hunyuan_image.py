"""Tiny random-weight HunyuanImage-2.1 in every layout the family reads:

    <root>/                                              a HunyuanImage-2.1 Diffusers folder (transformer, vae,
                                                         text_encoder, text_encoder_2, tokenizers, scheduler, guiders)
    <root>/comfyui/hunyuanimage2.1.safetensors           the transformer in the original (ComfyUI file) names
    <root>/comfyui/hunyuan_image_2.1_vae_fp16.safetensors  the VAE in the original layout, 32x spatial
    <root>/comfyui/qwen_2.5_vl_7b.safetensors            Qwen2.5-VL in its original checkpoint names
    <root>/comfyui/byt5_small_glyphxl_fp16.safetensors   the glyph ByT5 (T5) encoder

The ComfyUI files are written from the folder's models through our key maps. Sizes follow diffusers' HunyuanImage
pipeline test (1 refiner, 1 dual and 1 single block, patch 1); the Qwen2.5-VL and its tokenizer are the tiny
Qwen-Image ones, ByT5's tokenizer needs no files."""
from pathlib import Path

import torch
from diffusers import (
    AdaptiveProjectedMixGuidance,
    AutoencoderKLHunyuanImage,
    FlowMatchEulerDiscreteScheduler,
    HunyuanImagePipeline,
    HunyuanImageTransformer2DModel,
)
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from difftrain.tiny import qwen_image

COMFY_TRANSFORMER = "comfyui/hunyuanimage2.1.safetensors"
COMFY_VAE = "comfyui/hunyuan_image_2.1_vae_fp16.safetensors"
COMFY_TEXT_ENCODER = "comfyui/qwen_2.5_vl_7b.safetensors"
COMFY_BYT5 = "comfyui/byt5_small_glyphxl_fp16.safetensors"
SEED = 0
LATENT_CHANNELS = 4
BYT5_WIDTH = 32


def transformer() -> HunyuanImageTransformer2DModel:
    torch.manual_seed(SEED)
    return HunyuanImageTransformer2DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=4, attention_head_dim=8,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1), guidance_embeds=False,
        text_embed_dim=qwen_image.TEXT_WIDTH, text_embed_2_dim=BYT5_WIDTH, rope_axes_dim=(4, 4))


def vae() -> AutoencoderKLHunyuanImage:
    """32x spatial compression, as the released VAE (five 2x stages); GroupNorm needs 32 channels."""
    torch.manual_seed(SEED)
    return AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                                     block_out_channels=(32,) * 6, layers_per_block=1,
                                     scaling_factor=0.476986, spatial_compression_ratio=32, sample_size=128)


def byt5(tokenizer: ByT5Tokenizer) -> T5EncoderModel:
    torch.manual_seed(SEED)
    return T5EncoderModel(T5Config(
        d_model=BYT5_WIDTH, d_kv=4, d_ff=16, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, vocab_size=len(tokenizer), feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new", is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)).eval()


def build(out_dir: Path) -> None:
    from difftrain.formats.hunyuan_image import T5_TIED_EMBEDDING, save_transformer, vae_to_original
    from difftrain.formats.qwen_image import text_encoder_to_original
    from difftrain.formats.single_file import save_native

    out_dir = Path(out_dir)
    tok, byt5_tok = qwen_image.tokenizer(), ByT5Tokenizer()
    pipe = HunyuanImagePipeline(
        transformer=transformer(), vae=vae(), text_encoder=qwen_image.text_encoder(tok), tokenizer=tok,
        text_encoder_2=byt5(byt5_tok), tokenizer_2=byt5_tok, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        guider=AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=2),
        ocr_guider=AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=3))
    pipe.save_pretrained(out_dir)
    save_transformer(pipe.transformer.state_dict(), out_dir / COMFY_TRANSFORMER)
    save_native(vae_to_original(pipe.vae), out_dir / COMFY_VAE)
    save_native(text_encoder_to_original(pipe.text_encoder.state_dict()), out_dir / COMFY_TEXT_ENCODER)
    byt5_state = pipe.text_encoder_2.state_dict()
    del byt5_state[T5_TIED_EMBEDDING]
    save_native(byt5_state, out_dir / COMFY_BYT5)


TINY_MODELS = {"hunyuan_image": build}
