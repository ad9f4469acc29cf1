"""Tiny random-weight Cosmos 1.0 text2world files in ComfyUI's layouts: the transformer as an original `model.pt`
(`net.` keys, learnable position embeddings), the CV8x8x8-style video tokenizer shrunk to 4x spatial and temporal
compression with its latent statistics, and the old T5 v1.0 (shared with Cosmos-Predict2's tiny files)."""
from pathlib import Path

import torch
from diffusers import AutoencoderKLCosmos

from difftrain.formats.single_file import save_native
from difftrain.tiny.cosmos_predict2 import SEED, transformer, write_text_encoder

LATENT_CHANNELS = 4
FILES = {"transformer_path": "cosmos-1.0-diffusion-tiny-text2world.pt", "vae_path": "cosmos_cv4x4x4_tiny.safetensors",
         "t5": "oldt5_xxl_tiny.safetensors", "tokenizer_path": "t5_tokenizer"}


def vae() -> AutoencoderKLCosmos:
    torch.manual_seed(SEED)
    statistics = torch.rand(2, LATENT_CHANNELS * 16) + 0.5  # 16 latent frames per channel, as the real file
    return AutoencoderKLCosmos(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, encoder_block_out_channels=(8, 8, 8, 8),
        decode_block_out_channels=(8, 8, 8, 8), attention_resolutions=(8,), resolution=64, num_layers=2, patch_size=4,
        patch_type="haar", scaling_factor=1.0, spatial_compression_ratio=4, temporal_compression_ratio=4,
        latents_mean=(statistics[0] - 1).tolist(), latents_std=statistics[1].tolist())


def build(out_dir: Path) -> None:
    from difftrain.formats.cosmos import COSMOS1, vae_to_native
    from difftrain.formats.cosmos_common import ORIGINAL_PREFIX

    # max_size (latent frames, height, width in patches) covers the tiny model's allowed set (modules/cosmos.py
    # TINY_FRAMES, TINY_SIZES): 33 frames are 9 latent frames
    model = transformer(LATENT_CHANNELS, max_size=(9, 32, 32), rope_scale=(2.0, 1.0, 1.0),
                        extra_pos_embed_type="learnable")
    native = COSMOS1.to_native(model.state_dict(), "the tiny Cosmos 1.0")
    torch.save({ORIGINAL_PREFIX + key: tensor for key, tensor in native.items()}, out_dir / FILES["transformer_path"])
    save_native(vae_to_native(vae()), out_dir / FILES["vae_path"])
    write_text_encoder(out_dir, FILES)


TINY_MODELS = {"cosmos": build}
