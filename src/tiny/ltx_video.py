"""Tiny random-weight LTX-Video in the two layouts the real model ships in:

    <root>/                             a diffusers LTXPipeline folder (transformer/, vae/, text_encoder/ T5,
                                        tokenizer/, scheduler/), as Lightricks/LTX-Video's diffusers folders
    <root>/ltx-video-tiny.safetensors   the single file (as ltx-video-2b-v0.9.1.safetensors): the transformer under
                                        `model.diffusion_model.` and the VAE under `vae.`, in the original
                                        LTX-Video names, made from the folder's weights

Sizes follow diffusers' LTX tests (8 latent channels, 4 heads x 8, one block); the VAE compresses 4x in time and
space (the real one 8x / 32x) and carries non-trivial latents_mean / latents_std, so normalisation is visible.
diffusers' single-file converters for LTX are renames, independent of the sizes: diffusers' own
`from_single_file` reads this file (tests/test_ltx_video.py checks it is exactly the folder's weights)."""
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

from difftrain.formats.single_file import NATIVE_PREFIX, save_native
from difftrain.tiny.flux import t5_text_encoder
from difftrain.tiny.tokenizers import t5_tokenizer

SEED = 0
SINGLE_FILE = "ltx-video-tiny.safetensors"
LATENT_CHANNELS = 8
# diffusers name -> original LTX-Video name (the inverse of diffusers' convert_ltx_*_checkpoint_to_diffusers):
# module names, renamed wherever they occur in a key.
TRANSFORMER_TO_ORIGINAL = (("proj_in", "patchify_proj"), ("time_embed", "adaln_single"), ("norm_q", "q_norm"),
                           ("norm_k", "k_norm"))
# The 0.9.0 VAE layout: every up/down sampler and channel change is a block of its own in the original; a
# diffusers block path maps by its first (= longest) matching entry.
VAE_TO_ORIGINAL = (
    ("decoder.mid_block", "decoder.up_blocks.0"), ("decoder.up_blocks.0", "decoder.up_blocks.1"),
    ("decoder.up_blocks.1.upsamplers.0", "decoder.up_blocks.2"), ("decoder.up_blocks.1", "decoder.up_blocks.3"),
    ("decoder.up_blocks.2.conv_in", "decoder.up_blocks.4"), ("decoder.up_blocks.2.upsamplers.0", "decoder.up_blocks.5"),
    ("decoder.up_blocks.2", "decoder.up_blocks.6"), ("decoder.up_blocks.3.conv_in", "decoder.up_blocks.7"),
    ("decoder.up_blocks.3.upsamplers.0", "decoder.up_blocks.8"), ("decoder.up_blocks.3", "decoder.up_blocks.9"),
    ("encoder.down_blocks.0.downsamplers.0", "encoder.down_blocks.1"),
    ("encoder.down_blocks.0.conv_out", "encoder.down_blocks.2"), ("encoder.down_blocks.0", "encoder.down_blocks.0"),
    ("encoder.down_blocks.1.downsamplers.0", "encoder.down_blocks.4"),
    ("encoder.down_blocks.1.conv_out", "encoder.down_blocks.5"), ("encoder.down_blocks.1", "encoder.down_blocks.3"),
    ("encoder.down_blocks.2.downsamplers.0", "encoder.down_blocks.7"), ("encoder.down_blocks.2", "encoder.down_blocks.6"),
    ("encoder.down_blocks.3", "encoder.down_blocks.8"), ("encoder.mid_block", "encoder.down_blocks.9"),
    ("latents_mean", "per_channel_statistics.mean-of-means"), ("latents_std", "per_channel_statistics.std-of-means"),
)
VAE_NAMES_TO_ORIGINAL = (("resnets", "res_blocks"), ("conv_shortcut.conv", "conv_shortcut"), ("norm3", "norm3.norm"))


def transformer() -> LTXVideoTransformer3DModel:
    torch.manual_seed(SEED)
    return LTXVideoTransformer3DModel(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, patch_size=1,
                                      patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
                                      cross_attention_dim=32, num_layers=1, caption_channels=32)


def vae() -> AutoencoderKLLTXVideo:
    torch.manual_seed(SEED)
    model = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False)
    model.latents_mean.copy_(torch.linspace(-0.5, 0.5, LATENT_CHANNELS))
    model.latents_std.copy_(torch.linspace(0.5, 2.0, LATENT_CHANNELS))
    return model


def pipeline() -> LTXPipeline:
    tokenizer = t5_tokenizer()
    return LTXPipeline(transformer=transformer(), vae=vae(), scheduler=FlowMatchEulerDiscreteScheduler(),
                       text_encoder=t5_text_encoder(len(tokenizer)), tokenizer=tokenizer)


def to_original(key: str, blocks: tuple[tuple[str, str], ...], names: tuple[tuple[str, str], ...] = ()) -> str:
    """`key` with its block path renamed by the first matching entry of `blocks` (the longer paths come first),
    then every entry of `names` (module names inside a block) applied."""
    for diffusers_path, original in blocks:
        if key.startswith(diffusers_path + "."):
            key = original + key[len(diffusers_path):]
            break
    for diffusers_name, original in names:
        key = re.sub(rf"(^|\.){re.escape(diffusers_name)}(?=\.|$)", rf"\g<1>{original}", key)
    return key


def single_file(pipe: LTXPipeline) -> dict[str, torch.Tensor]:
    """The pipeline's transformer and VAE as one original-layout LTX-Video checkpoint."""
    weights = {"model." + NATIVE_PREFIX + to_original(k, (), TRANSFORMER_TO_ORIGINAL): v
               for k, v in pipe.transformer.state_dict().items()}
    weights.update({"vae." + to_original(k, VAE_TO_ORIGINAL, VAE_NAMES_TO_ORIGINAL): v for k, v in pipe.vae.state_dict().items()})
    return weights


def build(out_dir: Path) -> None:
    pipe = pipeline()
    pipe.save_pretrained(out_dir)
    save_native(single_file(pipe), out_dir / SINGLE_FILE)


TINY_MODELS = {"ltx_video": build}
