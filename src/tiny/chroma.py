"""Tiny random-weight Chroma transformer, written as a native (ComfyUI-layout) single file. The Chroma family takes
its VAE and T5 from the tiny Flux folder; Chroma has no CLIP."""
from pathlib import Path

import torch
from diffusers import ChromaTransformer2DModel

from difftrain.tiny import flux

TRANSFORMER_FILE = "chroma-tiny.safetensors"
SEED = 0

# The tiny Flux's widths (joint_attention_dim = its T5 width); approximator_num_channels is 4 embeddings of
# approximator_num_channels / 4 (timestep, guidance, and the 2x-wide modulation index).
TRANSFORMER_CONFIG = dict(
    {key: flux.TRANSFORMER_CONFIG[key] for key in ("patch_size", "in_channels", "num_layers", "num_single_layers",
                                                   "attention_head_dim", "num_attention_heads",
                                                   "joint_attention_dim", "axes_dims_rope")},
    approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1)


def transformer() -> ChromaTransformer2DModel:
    torch.manual_seed(SEED)
    return ChromaTransformer2DModel(**TRANSFORMER_CONFIG).eval()


def build(out_dir: Path) -> None:
    from difftrain.formats.chroma import save_chroma_transformer

    save_chroma_transformer(transformer().state_dict(), Path(out_dir) / TRANSFORMER_FILE)


TINY_MODELS = {"chroma": build}
