"""Key maps as data: one declarative map per family between its native single-file names (BFL, ComfyUI, the
original repositories) and diffusers' module names.

A map holds module renames (paths may contain `{i}`, a block index; `.weight` and `.bias` follow the module),
parameter renames (e.g. BFL RMSNorm `<m>.scale` <-> diffusers `<m>.weight`), fused Linears (one native Linear =
several diffusers Linears stacked on dim 0) and row transforms (e.g. Flux's final layer emits its halves swapped).
From it come four exact conversions, each refusing keys it does not know with one error naming them:

- `to_diffusers`: native weights -> diffusers (loading single files);
- `to_native`: diffusers weights -> native (full fine-tune export);
- `lora_to_native`: PEFT LoRA under diffusers names -> `diffusion_model.<native module>.lora_A/lora_B.weight`
  (ComfyUI). A fused Linear gets A = the parts' A stacked along the rank axis and B = the block diagonal of their
  B, so B @ A is exactly the parts' deltas stacked; a part without LoRA contributes zero rows;
- `lora_to_diffusers`: the inverse, our own reader: part j gets the rows of B belonging to it and the whole A.

Block indices are read from the keys being converted, so one map serves tiny and real models alike.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .single_file import NATIVE_PREFIX, StateDict, preview

# Each part's row count, from the input width the parts of a fused Linear share.
PartRows = Callable[[int], list[int]]
# A permutation of dim 0 that is its own inverse: it applies to weights, biases and LoRA B alike.
RowTransform = Callable[[torch.Tensor], torch.Tensor]
LINEAR_PARAMS = ("weight", "bias")
BLOCK = "{i}"


def widths(*multiples: int) -> PartRows:
    """Parts whose row counts are these multiples of the input width (Flux: q, k, v = 1 each, MLP = 4)."""
    return lambda width: [multiple * width for multiple in multiples]


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2)
    return torch.cat([second, first])


def within(native_prefix: str, diffusers_prefix: str, renames: Mapping[str, str]) -> dict[str, str]:
    """Renames inside a scope, e.g. a block: `within("double_blocks.{i}.", "transformer_blocks.{i}.", {...})`."""
    return {native_prefix + native: diffusers_prefix + diffusers for native, diffusers in renames.items()}


def rms_scales(norms: Mapping[str, str]) -> dict[str, str]:
    """Parameter renames of BFL RMSNorm gains: native `<m>.scale` <-> diffusers `<m'>.weight`."""
    return {f"{native}.scale": f"{diffusers}.weight" for native, diffusers in norms.items()}


def block_count(keys: Iterable[str], prefix: str) -> int:
    """1 + the largest block index under `prefix` (e.g. "double_blocks."); 0 when there is none."""
    return 1 + max(_block_indices(keys, [prefix + BLOCK])[prefix], default=-1)


def require_consumed(remaining: Collection[str], what: str) -> None:
    """One error naming `what` (a file, a state dict) and every key no rule took."""
    if remaining:
        raise ValueError(f"{what}: keys that no rule maps (unknown, or part of an incomplete fused group): "
                         f"{preview(sorted(remaining))}")


@dataclass(frozen=True)
class Fused:
    parts: tuple[str, ...]  # diffusers modules, in concatenation order
    rows: PartRows


@dataclass(frozen=True)
class _Plan:
    """A map's rules with the block indices of one state dict filled in."""
    modules: list[tuple[str, str, RowTransform | None]]  # native module, diffusers module, transform
    params: list[tuple[str, str, RowTransform | None]]  # native key, diffusers key, transform
    fused: list[tuple[str, tuple[str, ...], PartRows]]  # native module, diffusers modules, rows


@dataclass(frozen=True)
class KeyMap:
    modules: Mapping[str, str]  # native module -> diffusers module
    params: Mapping[str, str] = field(default_factory=dict)  # native parameter -> diffusers parameter
    fused: Mapping[str, Fused] = field(default_factory=dict)  # native Linear -> diffusers Linears
    transforms: Mapping[str, RowTransform] = field(default_factory=dict)  # native module -> row transform

    def to_diffusers(self, state_dict: Mapping[str, torch.Tensor], what: str) -> StateDict:
        """Native weights (bare keys) -> diffusers; split parts are views of the fused tensor."""
        remaining = dict(state_dict)
        plan = self._plan(remaining, from_native=True)
        out = _rename(plan.params, remaining, from_native=True)
        for native, parts, rows in plan.fused:
            weight = remaining.get(f"{native}.weight")
            if weight is None:
                continue
            sizes = rows(weight.shape[1])  # the bias splits like the weight's rows
            for param in LINEAR_PARAMS:
                if f"{native}.{param}" in remaining:
                    chunks = _split(f"{native}.{param}", remaining.pop(f"{native}.{param}"), sizes)
                    out.update((f"{part}.{param}", chunk) for part, chunk in zip(parts, chunks))
        require_consumed(remaining, what)
        return out

    def to_native(self, state_dict: Mapping[str, torch.Tensor], what: str) -> StateDict:
        """diffusers weights -> native (bare keys)."""
        remaining = dict(state_dict)
        plan = self._plan(remaining, from_native=False)
        out = _rename(plan.params, remaining, from_native=False)
        for native, parts, _ in plan.fused:
            for param in LINEAR_PARAMS:
                keys = [f"{part}.{param}" for part in parts]
                if all(key in remaining for key in keys):
                    out[f"{native}.{param}"] = torch.cat([remaining.pop(key) for key in keys])
        require_consumed(remaining, what)
        return out

    def lora_to_native(self, lora: Mapping[str, torch.Tensor], what: str, prefix: str = NATIVE_PREFIX) -> StateDict:
        """`<diffusers module>.lora_A/lora_B.weight` -> `<prefix><native module>.lora_A/lora_B.weight`."""
        remaining = dict(lora)
        plan = self._plan(remaining, from_native=False)
        out = {}
        for native, diffusers, transform in plan.modules:
            if _has_lora(remaining, diffusers):
                down, up = _pop_lora(remaining, diffusers)
                out.update(_lora_keys(prefix + native, down, _apply(transform, up)))
        for native, parts, rows in plan.fused:
            present = [part for part in parts if _has_lora(remaining, part)]
            if not present:
                continue
            lora_parts = {part: _pop_lora(remaining, part) for part in present}
            sizes = rows(lora_parts[present[0]][0].shape[1])
            for part, size in zip(parts, sizes):
                if part in lora_parts and lora_parts[part][1].shape[0] != size:
                    raise ValueError(f"{what}: {part}.lora_B.weight has {lora_parts[part][1].shape[0]} rows, its "
                                     f"part of {native} has {size}")
            down = torch.cat([down for down, _ in lora_parts.values()])
            # A part without LoRA is a (rows x 0) block: zero rows of B, no rank columns.
            up = torch.block_diag(*(lora_parts[part][1] if part in lora_parts else down.new_zeros(size, 0)
                                    for part, size in zip(parts, sizes)))
            out.update(_lora_keys(prefix + native, down, up))
        require_consumed(remaining, what)
        return out

    def lora_to_diffusers(self, lora: Mapping[str, torch.Tensor], what: str, prefix: str = NATIVE_PREFIX
                          ) -> StateDict:
        """The inverse of `lora_to_native` (exact for any fused LoRA: part j keeps B's rows of j and all of A)."""
        require_consumed([key for key in lora if not key.startswith(prefix)], f"{what} (keys without {prefix})")
        remaining = {key.removeprefix(prefix): tensor for key, tensor in lora.items()}
        plan = self._plan(remaining, from_native=True)
        out = {}
        for native, diffusers, transform in plan.modules:
            if _has_lora(remaining, native):
                down, up = _pop_lora(remaining, native)
                out.update(_lora_keys(diffusers, down, _apply(transform, up)))
        for native, parts, rows in plan.fused:
            if _has_lora(remaining, native):
                down, up = _pop_lora(remaining, native)
                for part, part_up in zip(parts, _split(f"{native}.lora_B.weight", up, rows(down.shape[1]))):
                    out.update(_lora_keys(part, down, part_up))
        require_consumed(remaining, what)
        return out

    def _plan(self, keys: Collection[str], from_native: bool) -> _Plan:
        """Every rule instantiated for the blocks present in `keys` (names on the side they come from)."""
        sources = ([*self.modules, *self.params, *self.fused] if from_native else
                   [*self.modules.values(), *self.params.values(), *(f.parts[0] for f in self.fused.values())])
        indices = _block_indices(keys, sources)

        def blocks(native: str, diffusers: str) -> list[int | None]:
            source = native if from_native else diffusers
            return indices[source.split(BLOCK)[0]] if BLOCK in source else [None]

        modules = [(native.format(i=i), diffusers.format(i=i), self.transforms.get(native))
                   for native, diffusers in self.modules.items() for i in blocks(native, diffusers)]
        params = [(f"{native}.{param}", f"{diffusers}.{param}", transform)
                  for native, diffusers, transform in modules for param in LINEAR_PARAMS]
        params += [(native.format(i=i), diffusers.format(i=i), None)
                   for native, diffusers in self.params.items() for i in blocks(native, diffusers)]
        fused = [(native.format(i=i), tuple(part.format(i=i) for part in rule.parts), rule.rows)
                 for native, rule in self.fused.items() for i in blocks(native, rule.parts[0])]
        return _Plan(modules, params, fused)


def _block_indices(keys: Iterable[str], templates: Iterable[str]) -> dict[str, list[int]]:
    """For each `{i}` template's prefix (the text before `{i}`), the block indices found in `keys`."""
    found: dict[str, set[int]] = {template.split(BLOCK)[0]: set() for template in templates if BLOCK in template}
    for key in keys:
        for prefix, indices in found.items():
            index = key[len(prefix):].split(".", 1)[0] if key.startswith(prefix) else ""
            if index.isdigit():
                indices.add(int(index))
    return {prefix: sorted(indices) for prefix, indices in found.items()}


def _rename(pairs: Iterable[tuple[str, str, RowTransform | None]], remaining: dict[str, torch.Tensor],
            from_native: bool) -> StateDict:
    """Pops the keys of `pairs` found in `remaining` and returns them under their other name."""
    out = {}
    for native, diffusers, transform in pairs:
        source, target = (native, diffusers) if from_native else (diffusers, native)
        if source in remaining:
            out[target] = _apply(transform, remaining.pop(source))
    return out


def _apply(transform: RowTransform | None, tensor: torch.Tensor) -> torch.Tensor:
    return transform(tensor) if transform else tensor


def _split(key: str, tensor: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    if min(sizes) <= 0 or sum(sizes) != tensor.shape[0]:
        raise ValueError(f"cannot split {key} of shape {tuple(tensor.shape)} into parts of {sizes} rows")
    return tensor.split(sizes)


def _has_lora(state_dict: Mapping[str, torch.Tensor], module: str) -> bool:
    return f"{module}.lora_A.weight" in state_dict and f"{module}.lora_B.weight" in state_dict


def _pop_lora(state_dict: dict[str, torch.Tensor], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    return state_dict.pop(f"{module}.lora_A.weight"), state_dict.pop(f"{module}.lora_B.weight")


def _lora_keys(module: str, down: torch.Tensor, up: torch.Tensor) -> StateDict:
    return {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}
