"""Tiny random-weight FLUX.1-dev: a diffusers FluxPipeline folder plus a BFL-layout single-file transformer."""
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from difftrain.tiny.tokenizers import clip_tokenizer, t5_tokenizer

BFL_TRANSFORMER_FILE = "flux1-tiny-bfl.safetensors"
SEED = 0


# in_channels 64 = 16 latent channels x 2x2 packing; axes_dims_rope sums to attention_head_dim.
TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 4, 8])


def transformer() -> FluxTransformer2DModel:
    torch.manual_seed(SEED)
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG)


def vae() -> AutoencoderKL:
    # Four blocks give the real spatial factor of 8; latent scaling/shift are those of the real Flux VAE.
    torch.manual_seed(SEED)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=8, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611)


def clip_text_encoder() -> CLIPTextModel:
    # The CLIPTextConfig of diffusers' pipeline tests; hidden/projection 32 = pooled_projection_dim.
    torch.manual_seed(SEED)
    config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000, hidden_act="gelu",
        projection_dim=32)
    return CLIPTextModel(config).eval()


def t5_text_encoder(vocab_size: int) -> T5EncoderModel:
    # d_model 32 = joint_attention_dim. dropout 0: T5 dropout would make outputs non-deterministic.
    torch.manual_seed(SEED)
    config = T5Config(
        d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=5, num_decoder_layers=5,
        relative_attention_num_buckets=8, vocab_size=vocab_size, feed_forward_proj="relu", dropout_rate=0.0,
        layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler config of the real FLUX.1-dev (resolution-dependent shift)."""
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)


def pipeline() -> FluxPipeline:
    tokenizer_2 = t5_tokenizer()
    return FluxPipeline(
        transformer=transformer(), vae=vae(), text_encoder=clip_text_encoder(), tokenizer=clip_tokenizer(),
        text_encoder_2=t5_text_encoder(len(tokenizer_2)), tokenizer_2=tokenizer_2, scheduler=scheduler())


def build(out_dir: Path) -> None:
    """Write the diffusers folder to out_dir and the BFL single-file transformer beside its subfolders."""
    from difftrain.formats.flux import save_bfl_transformer

    pipe = pipeline()
    pipe.save_pretrained(out_dir)
    save_bfl_transformer(pipe.transformer, Path(out_dir) / BFL_TRANSFORMER_FILE)


TINY_MODELS = {"flux": build}
