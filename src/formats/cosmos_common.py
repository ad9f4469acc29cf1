"""What Cosmos 1.0 and Cosmos-Predict2 checkpoints share: NVIDIA's original layout (`net.<native names>`, in a
`model.pt` pickle or a safetensors conversion, ComfyUI's prefixes accepted), read into diffusers'
CosmosTransformer3DModel through a family key map (cosmos.py, cosmos_predict2.py), with the config taken from tensor
shapes (any size: diffusers' single-file loader only knows the released sizes)."""
from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from diffusers import CosmosTransformer3DModel

from .keymap import KeyMap, block_count
from .single_file import StateDict, build_with_weights, read_shapes, read_state_dict, save_native, strip_comfy_prefix

ORIGINAL_PREFIX = "net."
PICKLE_SUFFIXES = (".pt", ".pth")
# Training state and tables the model recomputes (rotary tables, EDM's log-variance head): no diffusers weight.
NOT_WEIGHTS = re.compile(r"^(accum_|logvar\.|pos_embedder\.)|_extra_state$")
# The rotary scales of a released model of this width (no weight shape shows them).
RopeScale = Callable[[int], Sequence[float]]
PATCH_SIZE = (1, 2, 2)  # every released Cosmos; the patch embedding's shape cannot tell t from h and w


def read_original(path: str | Path, shapes_only: bool = False) -> StateDict:
    """Native weights (bare names) of an original `model.pt` (read with torch.load(weights_only=True) only, memory
    mapped) or of a safetensors file (`net.`, ComfyUI or bare names); `shapes_only`: a safetensors file's meta tensors
    from its header."""
    path = Path(path)
    if path.suffix not in (*PICKLE_SUFFIXES, ".safetensors"):
        raise ValueError(f"{path}: expected the original model.pt or a .safetensors conversion of it")
    try:
        state = read_shapes(path) if shapes_only and path.suffix == ".safetensors" else read_state_dict(path)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} holds more than tensors, and pickles are read with torch.load(weights_only=True) "
                         f"only: use the original model.pt or a safetensors conversion") from None
    state = strip_comfy_prefix({key.removeprefix(ORIGINAL_PREFIX): tensor for key, tensor in state.items()})
    return {key: tensor for key, tensor in state.items() if not NOT_WEIGHTS.search(key)}


def transformer_config(state: Mapping[str, torch.Tensor], rope_scale: RopeScale,
                       max_size: Sequence[int] = (128, 240, 240)) -> dict:
    """The CosmosTransformer3DModel config of diffusers-named weights; `max_size` is read from a learnable position
    embedding when there is one (Cosmos 1.0)."""
    inner_dim, patch_inputs = state["patch_embed.proj.weight"].shape
    head_dim = state["transformer_blocks.0.attn1.norm_q.weight"].shape[0]
    patch_volume = PATCH_SIZE[0] * PATCH_SIZE[1] * PATCH_SIZE[2]
    learnable = "learnable_pos_embed.pos_emb_t" in state
    if learnable:
        max_size = [state[f"learnable_pos_embed.pos_emb_{axis}"].shape[0] * patch
                    for axis, patch in zip("thw", PATCH_SIZE)]
    return dict(in_channels=patch_inputs // patch_volume - 1, out_channels=state["proj_out.weight"].shape[0] // patch_volume,
                num_attention_heads=inner_dim // head_dim, attention_head_dim=head_dim,
                num_layers=block_count(state, "transformer_blocks."),
                mlp_ratio=state["transformer_blocks.0.ff.net.0.proj.weight"].shape[0] / inner_dim,
                text_embed_dim=state["transformer_blocks.0.attn2.to_k.weight"].shape[1],
                adaln_lora_dim=state["transformer_blocks.0.norm1.linear_1.weight"].shape[0],
                max_size=tuple(max_size), patch_size=PATCH_SIZE, rope_scale=tuple(rope_scale(inner_dim)),
                concat_padding_mask=True, extra_pos_embed_type="learnable" if learnable else None)


def diffusers_weights(path: str | Path, keymap: KeyMap, rope_scale: RopeScale, what: str,
                      shapes_only: bool = False) -> tuple[StateDict, dict]:
    """A checkpoint's weights under diffusers names, and the CosmosTransformer3DModel config they describe."""
    state = keymap.to_diffusers(read_original(path, shapes_only), str(path))
    try:
        return state, transformer_config(state, rope_scale)
    except KeyError as missing:
        raise ValueError(f"{path} is not {what}: it has no {missing}") from None


def load_transformer(path: str | Path, keymap: KeyMap, dtype: torch.dtype, rope_scale: RopeScale,
                     what: str) -> CosmosTransformer3DModel:
    state, config = diffusers_weights(path, keymap, rope_scale, what)
    return build_with_weights(CosmosTransformer3DModel, config, state, dtype, path, what)


def save_original(state_dict: Mapping[str, torch.Tensor], keymap: KeyMap, path: str | Path) -> None:
    """diffusers weights -> the original layout (`net.<native names>`) as one safetensors file, atomically."""
    native = keymap.to_native(state_dict, "the diffusers Cosmos transformer")
    save_native({ORIGINAL_PREFIX + key: tensor for key, tensor in native.items()}, path)
