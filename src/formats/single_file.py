"""Reading checkpoints in the layouts people download (one safetensors file, a folder of shards, a torch `.pth`)
and building a diffusers model from a converted state dict without a second copy of the weights.

Family formats (`wan.py`, ...) supply the key maps and configs; this module knows nothing about any family."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import load_file

from difftrain.utils.atomic import save_safetensors

StateDict = dict[str, torch.Tensor]
# ComfyUI's prefix of native transformer keys: LoRA files use it bare, checkpoints often under `model.`.
NATIVE_PREFIX = "diffusion_model."
COMFY_PREFIX = re.compile(rf"^(model\.)?{re.escape(NATIVE_PREFIX)}")
FP8_SCALE_SUFFIXES = ("scale_weight", ".scale_input")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def read_state_dict(path: str | Path, name_filter: str = "*") -> StateDict:
    """All tensors of a checkpoint file, or of every `name_filter` safetensors shard in a folder."""
    path = Path(path)
    if path.is_dir():
        shards = sorted(path.glob(f"{name_filter}.safetensors"))
        if not shards:
            raise FileNotFoundError(f"{path} holds no {name_filter}.safetensors file")
        state: StateDict = {}
        for shard in shards:
            state.update(load_file(shard))
        return state
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix in WEIGHT_SUFFIXES:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return dict(loaded.get("state_dict", loaded)) if isinstance(loaded, Mapping) else loaded
    raise ValueError(f"{path}: not a checkpoint (expected one of {', '.join(WEIGHT_SUFFIXES)} or a folder of shards)")


def read_shapes(path: str | Path, name_filter: str = "*") -> StateDict:
    """Meta tensors shaped as a safetensors checkpoint's (one file, or a folder's `name_filter` shards), read from
    the headers alone: no tensor data is read."""
    path = Path(path)
    files = sorted(path.glob(f"{name_filter}.safetensors")) if path.is_dir() else [path]
    if not files or any(file.suffix != ".safetensors" for file in files):
        raise ValueError(f"{path}: tensor shapes are read from .safetensors files only")
    shapes: StateDict = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            shapes.update({key: torch.empty(f.get_slice(key).get_shape(), device="meta") for key in f.keys()})
    return shapes


def count_blocks(shapes: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many `<prefix>.<N>.` blocks the state dict holds."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return len({match[1] for key in shapes if (match := pattern.match(key))})


def strip_comfy_prefix(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Keys without ComfyUI's `model.diffusion_model.` / `diffusion_model.` prefix."""
    return {COMFY_PREFIX.sub("", key): tensor for key, tensor in state_dict.items()}


def refuse_fp8_scaled(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    scaled = sorted(key for key in state_dict if key.endswith(FP8_SCALE_SUFFIXES))
    if scaled:
        raise ValueError(f"{path} is an fp8-scaled checkpoint ({preview(scaled, 3)}): its weights need their scales "
                         f"to be usable. Use the bf16/fp16/fp32 file; set model.transformer_dtype=float8 for fp8 "
                         f"storage while training.")


def preview(keys: Iterable[str], limit: int = 10) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown}, ... ({len(keys)} in total)"


def check_matches(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], path: str | Path,
                  what: str, may_lack: Iterable[str] = ()) -> None:
    """One error naming the file and every missing, unexpected or wrongly shaped key."""
    missing = sorted(expected.keys() - state_dict.keys() - set(may_lack))
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong_shape = sorted(f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
                         for key in expected.keys() & state_dict.keys()
                         if state_dict[key].shape != expected[key].shape)
    if missing or unexpected or wrong_shape:
        raise ValueError(f"{path} does not match {what}: missing [{preview(missing)}], unexpected "
                         f"[{preview(unexpected)}], wrong shape (file vs model) [{preview(wrong_shape)}]")


def build_with_weights(model_cls, config: Mapping, state_dict: StateDict, dtype: torch.dtype, path: str | Path,
                       what: str, may_lack: Iterable[str] = ()):
    """`model_cls(**config)` holding exactly `state_dict` (cast to `dtype`): parameters are created on the meta
    device (buffers, e.g. rotary tables, are computed as usual), so nothing is initialised twice and no second copy
    of the weights exists. Keys in `may_lack` (tied weights) may be absent."""
    with init_empty_weights():
        model = model_cls.from_config(dict(config)) if hasattr(model_cls, "from_config") else model_cls(config)
    check_matches(model.state_dict(), state_dict, path, what, may_lack)
    casted = {key: tensor.to(dtype) if tensor.is_floating_point() else tensor for key, tensor in state_dict.items()}
    model.load_state_dict(casted, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def save_native(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """A single safetensors file (atomically), tensors made contiguous."""
    save_safetensors({key: tensor.detach().contiguous() for key, tensor in state_dict.items()}, Path(path))
