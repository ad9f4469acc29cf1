"""Tiny random-weight SDXL: a diffusers StableDiffusionXLPipeline folder (the configs and tokenizers that
`from_single_file(config=...)` reads) plus the same weights as an original single-file checkpoint.

Shaped like SDXL base, only smaller: three UNet blocks (no attention in the first, deeper transformers in the
last), a mid block with attention, CLIP text encoders of *different* widths (diffusers tells the two apart
in a single file by width, as with ViT-L 768 / bigG 1280), an 8x VAE with quant convs."""
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from difftrain.formats.sdxl import TE1_PREFIX, TE2_PREFIX, original_checkpoint, save_original_checkpoint, vae_to_ldm
from difftrain.tiny.tokenizers import clip_tokenizer

CHECKPOINT_FILE = "sd_xl_tiny.safetensors"
SEED = 0
TE1_WIDTH, TE2_WIDTH, TIME_EMBED_DIM = 32, 40, 8


def unet() -> UNet2DConditionModel:
    torch.manual_seed(SEED)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 1, 2), norm_num_groups=4,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        cross_attention_dim=TE1_WIDTH + TE2_WIDTH,  # the two encoders' hidden states, concatenated
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TE2_WIDTH)  # 6 time ids + pooled TE2


def vae() -> AutoencoderKL:
    torch.manual_seed(SEED)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=64, scaling_factor=0.13025, force_upcast=True)


def _clip_config(width: int, act: str) -> CLIPTextConfig:
    return CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=width, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=3, vocab_size=1000, hidden_act=act,
                          projection_dim=width, layer_norm_eps=1e-5)


def text_encoders() -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    torch.manual_seed(SEED)
    te1 = CLIPTextModel(_clip_config(TE1_WIDTH, "quick_gelu")).eval()  # ViT-L uses quick_gelu, bigG gelu
    te2 = CLIPTextModelWithProjection(_clip_config(TE2_WIDTH, "gelu")).eval()
    return te1, te2


def scheduler() -> EulerDiscreteScheduler:
    """SDXL base's inference scheduler config."""
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  steps_offset=1, timestep_spacing="leading", num_train_timesteps=1000)


def pipeline() -> StableDiffusionXLPipeline:
    te1, te2 = text_encoders()
    return StableDiffusionXLPipeline(vae=vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=clip_tokenizer(),
                                     tokenizer_2=clip_tokenizer(), unet=unet(), scheduler=scheduler(),
                                     add_watermarker=False)


def original_state_dict(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    """The pipeline's weights in the original single-file layout, with the extra keys real files carry."""
    tensors = original_checkpoint(pipe.unet.state_dict(), pipe.unet.config, pipe.text_encoder.state_dict(),
                                  pipe.text_encoder_2.state_dict(), vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    positions = pipe.text_encoder.config.max_position_embeddings
    tensors[TE1_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    tensors[TE2_PREFIX + "logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return tensors


def build(out_dir: Path) -> None:
    pipe = pipeline()
    pipe.save_pretrained(out_dir)
    # No modelspec metadata: safetensors writes metadata keys in no fixed order, and the build must be
    # byte-identical every time.
    save_original_checkpoint(original_state_dict(pipe), Path(out_dir) / CHECKPOINT_FILE, {})


TINY_MODELS = {"sdxl": build}
