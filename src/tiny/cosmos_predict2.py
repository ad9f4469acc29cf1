"""Tiny random-weight Cosmos-Predict2 files in the layouts the real loader reads: the transformer as an original
`model.pt` (`net.` keys), ComfyUI's Wan 2.1 VAE and old T5 v1.0 single files, and a T5 tokenizer folder. Sizes
follow diffusers' Cosmos tests (2 heads x 16, 2 blocks, text width 32)."""
from pathlib import Path

import torch
from diffusers import CosmosTransformer3DModel
from transformers import T5Config, T5EncoderModel

from difftrain.formats.old_t5 import TIED_KEYS
from difftrain.formats.single_file import save_native
from difftrain.tiny import wan
from difftrain.tiny.tokenizers import t5_tokenizer

SEED = 0
TEXT_DIM = 32
FILES = {"transformer_path": "model.pt", "vae_path": "wan_2.1_vae.safetensors", "t5": "oldt5_xxl_tiny.safetensors",
         "tokenizer_path": "t5_tokenizer"}


def transformer(channels: int, **kwargs) -> CosmosTransformer3DModel:
    torch.manual_seed(SEED)
    return CosmosTransformer3DModel(in_channels=channels, out_channels=channels, num_attention_heads=2,
                                    attention_head_dim=16, num_layers=2, mlp_ratio=2, text_embed_dim=TEXT_DIM,
                                    adaln_lora_dim=4, patch_size=(1, 2, 2), concat_padding_mask=True, **kwargs).eval()


def write_text_encoder(out_dir: Path, files: dict[str, str]) -> None:
    """The old T5 v1.0 (ReLU feed-forward) in transformers names, as ComfyUI's file, and its tokenizer."""
    tokenizer = t5_tokenizer()
    tokenizer.save_pretrained(out_dir / files["tokenizer_path"])
    torch.manual_seed(SEED)
    config = T5Config(d_model=TEXT_DIM, d_ff=37, d_kv=8, num_heads=4, num_layers=2, relative_attention_num_buckets=8,
                      vocab_size=len(tokenizer), feed_forward_proj="relu", dropout_rate=0.0)
    state = T5EncoderModel(config).state_dict()
    save_native({key: tensor for key, tensor in state.items() if key not in TIED_KEYS}, out_dir / files["t5"])


def build(out_dir: Path) -> None:
    from difftrain.formats.cosmos_common import ORIGINAL_PREFIX
    from difftrain.formats.cosmos_predict2 import PREDICT2, rope_scale
    from difftrain.formats.wan import vae_to_native

    native = PREDICT2.to_native(transformer(16, rope_scale=rope_scale(0), extra_pos_embed_type=None).state_dict(), "the tiny Cosmos-Predict2")
    torch.save({ORIGINAL_PREFIX + key: tensor for key, tensor in native.items()}, out_dir / FILES["transformer_path"])
    vae = wan.vae21()
    save_native(vae_to_native(vae.state_dict(), vae.config), out_dir / FILES["vae_path"])
    write_text_encoder(out_dir, FILES)


TINY_MODELS = {"cosmos_predict2": build}
