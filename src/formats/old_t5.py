"""The OLD T5 (v1.0) XXL encoder as ComfyUI ships it (`oldt5_xxl_fp16.safetensors`, transformers' T5EncoderModel
names): the text encoder of Cosmos 1.0 and Cosmos-Predict2. T5 v1.0 has one ReLU `wi` projection per
feed-forward; v1.1 (Flux's and SD3's `t5xxl_*`) a gated-GELU pair `wi_0`/`wi_1`, which this reader refuses.
The config comes from tensor shapes, so the tiny test encoder loads through the same code."""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import T5Config, T5EncoderModel

from .single_file import StateDict, build_with_weights, read_state_dict

TIED_KEYS = ("encoder.embed_tokens.weight",)
ATTENTION = "encoder.block.0.layer.0.SelfAttention."
FEED_FORWARD = "encoder.block.0.layer.1.DenseReluDense."


def old_t5_config(state: Mapping[str, torch.Tensor]) -> T5Config:
    vocab_size, d_model = state["shared.weight"].shape
    buckets, heads = state[ATTENTION + "relative_attention_bias.weight"].shape
    layers = 1 + max(int(m[1]) for key in state if (m := re.match(r"^encoder\.block\.(\d+)\.", key)))
    return T5Config(vocab_size=vocab_size, d_model=d_model, num_heads=heads, relative_attention_num_buckets=buckets,
                    d_kv=state[ATTENTION + "q.weight"].shape[0] // heads, d_ff=state[FEED_FORWARD + "wi.weight"].shape[0],
                    num_layers=layers, feed_forward_proj="relu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0)


def encoder_weights(path: str | Path) -> StateDict:
    """The encoder's tensors of a T5 v1.0 file; a v1.1 file is one error saying which file is needed."""
    state = read_state_dict(path)
    if FEED_FORWARD + "wi_0.weight" in state:
        raise ValueError(f"{path} is a T5 v1.1 encoder (gated-GELU wi_0/wi_1): Cosmos needs the OLD T5 v1.0 XXL, "
                         f"ComfyUI's oldt5_xxl_fp16.safetensors")
    if FEED_FORWARD + "wi.weight" not in state:
        raise ValueError(f"{path} is not a T5 v1.0 encoder in transformers names (no {FEED_FORWARD}wi.weight): "
                         f"use ComfyUI's oldt5_xxl_fp16.safetensors")
    if "shared.weight" not in state:
        state["shared.weight"] = state[TIED_KEYS[0]]
    return {key: tensor for key, tensor in state.items() if key.startswith(("shared.", "encoder."))}


def load_old_t5(path: str | Path, dtype: torch.dtype) -> T5EncoderModel:
    state = encoder_weights(path)
    return build_with_weights(T5EncoderModel, old_t5_config(state), state, dtype, path, "a T5 v1.0 encoder",
                              may_lack=TIED_KEYS)
