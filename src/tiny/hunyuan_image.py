"""Tiny random-weight HunyuanImage-2.1 in every layout the family reads:

    <root>/                                              a HunyuanImage-2.1 Diffusers folder (transformer, vae,
                                                         text_encoder, text_encoder_2, tokenizers, scheduler, guiders)
    <root>/comfyui/hunyuanimage2.1.safetensors           the transformer in the original (ComfyUI file) names
    <root>/comfyui/hunyuan_image_2.1_vae_fp16.safetensors  the VAE in the original layout, 32x spatial
    <root>/comfyui/qwen_2.5_vl_7b.safetensors            Qwen2.5-VL in its original checkpoint names
    <root>/comfyui/byt5_small_glyphxl_fp16.safetensors   the glyph ByT5 (T5) encoder

The ComfyUI files are written from the folder's models through our key maps. Sizes follow diffusers' HunyuanImage
pipeline test (1 refiner, 1 dual and 1 single block, patch 1); the tokenizer is the tiny Qwen-Image one, ByT5's
needs no files. What the files' shapes cannot tell (head widths, VAE scale, ...) is the released models' values
(formats.hunyuan_image's constants), so the files alone load as the folder."""
from pathlib import Path

import torch
from diffusers import (
    AdaptiveProjectedMixGuidance,
    AutoencoderKLHunyuanImage,
    FlowMatchEulerDiscreteScheduler,
    HunyuanImagePipeline,
    HunyuanImageTransformer2DModel,
)
from transformers import ByT5Tokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, T5Config, T5EncoderModel

from difftrain.formats import hunyuan_image as formats
from difftrain.tiny import qwen_image

COMFY_TRANSFORMER = "comfyui/hunyuanimage2.1.safetensors"
COMFY_VAE = "comfyui/hunyuan_image_2.1_vae_fp16.safetensors"
COMFY_TEXT_ENCODER = "comfyui/qwen_2.5_vl_7b.safetensors"
COMFY_BYT5 = "comfyui/byt5_small_glyphxl_fp16.safetensors"
SEED = 0
LATENT_CHANNELS = 4
BYT5_WIDTH = 32
TEXT_WIDTH = formats.QWEN_HEAD_DIM  # one head of the released width
VISION_WIDTH = formats.QWEN_VISION_HEAD_DIM


def transformer() -> HunyuanImageTransformer2DModel:
    torch.manual_seed(SEED)
    return HunyuanImageTransformer2DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=4, attention_head_dim=8,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1), guidance_embeds=False,
        text_embed_dim=TEXT_WIDTH, text_embed_2_dim=BYT5_WIDTH, rope_axes_dim=(4, 4))


def vae() -> AutoencoderKLHunyuanImage:
    """32x spatial compression, as the released VAE (five 2x stages); GroupNorm needs 32 channels."""
    torch.manual_seed(SEED)
    return AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                                     block_out_channels=(32,) * 6, layers_per_block=1,
                                     spatial_compression_ratio=32, **formats.VAE_CONSTANTS)


def text_encoder(tok) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(SEED)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(hidden_size=TEXT_WIDTH, intermediate_size=16, num_hidden_layers=2, num_attention_heads=1,
                         num_key_value_heads=1, vocab_size=len(tok), **formats.QWEN_TEXT_CONSTANTS),
        vision_config=dict(depth=2, hidden_size=VISION_WIDTH, intermediate_size=16, num_heads=1,
                           out_hidden_size=TEXT_WIDTH, **formats.QWEN_VISION_CONSTANTS),
        hidden_size=TEXT_WIDTH, vocab_size=len(tok), **formats.QWEN_TOKEN_IDS)).eval()


def byt5(tokenizer: ByT5Tokenizer) -> T5EncoderModel:
    torch.manual_seed(SEED)
    return T5EncoderModel(T5Config(d_model=BYT5_WIDTH, d_kv=4, d_ff=16, num_layers=2, num_heads=2,
                                   relative_attention_num_buckets=8, vocab_size=len(tokenizer),
                                   **formats.BYT5_CONSTANTS)).eval()


def build(out_dir: Path) -> None:
    from difftrain.formats.qwen_image import text_encoder_to_original
    from difftrain.formats.single_file import save_native

    out_dir = Path(out_dir)
    tok, byt5_tok = qwen_image.tokenizer(), ByT5Tokenizer()
    pipe = HunyuanImagePipeline(
        transformer=transformer(), vae=vae(), text_encoder=text_encoder(tok), tokenizer=tok,
        text_encoder_2=byt5(byt5_tok), tokenizer_2=byt5_tok, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        guider=AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=2),
        ocr_guider=AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=3))
    pipe.save_pretrained(out_dir)
    formats.save_transformer(pipe.transformer.state_dict(), out_dir / COMFY_TRANSFORMER)
    save_native(formats.vae_to_original(pipe.vae), out_dir / COMFY_VAE)
    save_native(text_encoder_to_original(pipe.text_encoder.state_dict()), out_dir / COMFY_TEXT_ENCODER)
    byt5_state = pipe.text_encoder_2.state_dict()
    del byt5_state[formats.T5_TIED_EMBEDDING]
    save_native(byt5_state, out_dir / COMFY_BYT5)


TINY_MODELS = {"hunyuan_image": build}
