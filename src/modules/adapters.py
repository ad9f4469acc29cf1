"""Adapters through PEFT for every family: LoRA (optionally DoRA), LoKr and LoHa; their export in the family's
LoRA file format with the suffixes ComfyUI reads; our own reader of such files; `adapter.init_path`.

A family converts only plain LoRA weights (its `export_lora`). Everything else reuses that conversion through a
probe: a rank-1 LoRA whose values name their module (A of the k-th module holds k + 1, B holds 1 + its row
index), exported by the family into a temporary folder. The probe file tells, for each key stem the family
writes, which module rows land on which of its rows (a fused Linear holds several modules), plus the file name and
metadata. From it:

- LoKr / LoHa weights are written as `<stem>.lokr_w1`, ... / `<stem>.hada_w1_a`, ... (PEFT's names are ComfyUI's).
  A stem fused from several modules cannot hold one Kronecker / Hadamard product per module: such a family is
  refused (ConfigError) before training;
- DoRA's magnitude is written as `<stem>.dora_scale` of shape [rows, 1] beside the family's lora weights: ComfyUI's
  output-axis decomposition, W' = dora_scale * (W + dW) / ||W + dW|| per output row, which is PEFT's;
- `read_adapter_file` inverts both, for any family.

Scale: LoRA weights follow the family's convention (alpha / rank folded into lora_B, or kohya's `.alpha`). LoKr and
LoHa files carry PEFT's alpha / rank folded into their first factor (`lokr_w1` or `lokr_w1_a`, `hada_w1_a`) and no
alpha tensor: ComfyUI applies a LoKr / LoHa without alpha at scale 1.0.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING, Optional

import torch
from omegaconf import DictConfig
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from difftrain.callbacks.export import lora_file
from difftrain.config.errors import ConfigError
from difftrain.utils.atomic import save_safetensors

if TYPE_CHECKING:
    from .base import DiffusionModule

ADAPTER = "default"  # PEFT's adapter name
DOWN, UP = ("lora_A.weight", "lora_down.weight"), ("lora_B.weight", "lora_up.weight")
PEFT_LORA = ("lora_A.weight", "lora_B.weight")
MAGNITUDE, DORA_SCALE, ALPHA = "lora_magnitude_vector", "dora_scale", "alpha"
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
SCALED_FACTORS = ("lokr_w1", "lokr_w1_a", "hada_w1_a")  # where a LoKr / LoHa file carries alpha / rank
FILE_SUFFIXES = (*DOWN, *UP, ALPHA, DORA_SCALE, *LOKR, *LOHA)


def peft_config(cfg: DictConfig, alpha: float, target_modules: list[str]) -> PeftConfig:
    """The PEFT config of `adapter=lora|lokr|loha` (conf/adapter/*.yaml)."""
    if cfg.type == "lora":
        return LoraConfig(r=cfg.rank, lora_alpha=alpha, lora_dropout=cfg.dropout, use_dora=cfg.get("use_dora", False),
                          target_modules=target_modules, init_lora_weights=True)
    lycoris = dict(r=cfg.rank, alpha=alpha, rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout,
                   target_modules=target_modules, init_weights=True)
    if cfg.type == "lokr":
        return LoKrConfig(decompose_factor=cfg.decompose_factor, decompose_both=cfg.decompose_both, **lycoris)
    return LoHaConfig(**lycoris)


def is_adapter_weight(name: str) -> bool:
    return any(kind in name for kind in ("lora_", "lokr_", "hada_"))


def is_plain_lora(cfg: DictConfig) -> bool:
    return cfg.type == "lora" and not cfg.get("use_dora", False)


@dataclass(frozen=True)
class Part:
    """One module's share of a stem: its rows `module_rows` are the stem's rows `stem_rows`."""
    module: str  # as lora_state_dict names it
    stem_rows: torch.Tensor
    module_rows: torch.Tensor


@dataclass(frozen=True)
class FileLayout:
    """What the family's LoRA export makes of the adapter's modules."""
    file_name: str
    metadata: dict[str, str]
    stems: dict[str, list[Part]]  # in the order of the stem's rank rows (the family's lora_A)
    rows: dict[str, int]


def adapter_layers(module: DiffusionModule) -> dict[str, BaseTunerLayer]:
    """Every layer holding an adapter, under the name `lora_state_dict` gives its weights."""
    return {part_prefix(part_name) + name: layer for part_name, part in module.model_parts().items()
            for name, layer in part.named_modules() if isinstance(layer, BaseTunerLayer)}


def file_layout(module: DiffusionModule) -> FileLayout:
    """Exports the self-describing probe LoRA through the family and reads back where each module went."""
    names = list(adapter_layers(module).items())
    probe = {}
    for k, (name, layer) in enumerate(names):
        base = layer.get_base_layer()
        probe[f"{name}.lora_A.weight"] = torch.full((1, base.in_features), k + 1.0, dtype=torch.float64)
        probe[f"{name}.lora_B.weight"] = torch.arange(1.0, base.out_features + 1, dtype=torch.float64)[:, None]
    with TemporaryDirectory() as tmp:
        module.export_lora(probe, Path(tmp))
        path = lora_file(Path(tmp))
        tensors = load_file(path)
        with safe_open(path, "pt") as file:
            metadata = file.metadata() or {}
    stems, rows = {}, {}
    for stem, own in _by_stem(tensors, str(path)).items():
        down, up = _lora_pair(own)
        stems[stem] = [_part(names[int(down[c, 0]) - 1][0], up[:, c]) for c in range(down.shape[0])]
        rows[stem] = up.shape[0]
    return FileLayout(path.name, metadata, stems, rows)


def _part(module: str, column: torch.Tensor) -> Part:
    stem_rows = column.nonzero().squeeze(1)
    return Part(module, stem_rows, column[stem_rows].long() - 1)


def check_layout(cfg: DictConfig, layout: FileLayout, family: str) -> None:
    """Refuses what the family's format cannot hold: a LoKr / LoHa on a fused stem, DoRA on a partly adapted one."""
    for stem, parts in layout.stems.items():
        whole = len(parts) == 1 and torch.equal(parts[0].stem_rows, parts[0].module_rows)
        covered = sum(len(part.stem_rows) for part in parts) == layout.rows[stem]
        if not (whole if cfg.type != "lora" else covered):
            raise ConfigError(f"adapter={cfg.type}{' adapter.use_dora=true' if cfg.type == 'lora' else ''}: {family} "
                              f"exports {stem} as one Linear fused from {', '.join(p.module for p in parts)}, which "
                              f"its file cannot hold for this adapter. Use adapter=lora for this model.")


def write_adapter(module: DiffusionModule, weights: dict[str, torch.Tensor], out_dir: Path) -> None:
    """The adapter's weights (as `lora_state_dict` gives them) in the family's LoRA file."""
    if is_plain_lora(module.adapter_cfg):
        module.export_lora(weights, out_dir)
        return
    layout = file_layout(module)
    lora = {key: tensor for key, tensor in weights.items() if key.endswith(PEFT_LORA)}
    tensors = {}
    if lora:
        module.export_lora(lora, out_dir)
        tensors = load_file(out_dir / layout.file_name)
    by_module = _by_module({key: tensor for key, tensor in weights.items() if key not in lora})
    tensors.update(_to_file(layout, by_module, adapter_layers(module)))
    save_safetensors(tensors, out_dir / layout.file_name, {**layout.metadata, "difftrain.adapter": describe(module)})


def describe(module: DiffusionModule) -> str:
    cfg = module.adapter_cfg
    return "dora" if cfg.type == "lora" and cfg.get("use_dora", False) else cfg.type


def _to_file(layout: FileLayout, by_module: dict[str, dict[str, torch.Tensor]],
             layers: dict[str, BaseTunerLayer]) -> dict[str, torch.Tensor]:
    out = {}
    for stem, parts in layout.stems.items():
        if parts[0].module not in by_module:
            continue
        if MAGNITUDE in by_module[parts[0].module]:
            magnitude = by_module[parts[0].module][MAGNITUDE]
            scale = magnitude.new_empty(layout.rows[stem])
            for part in parts:
                scale[part.stem_rows] = by_module[part.module][MAGNITUDE][part.module_rows]
            out[f"{stem}.{DORA_SCALE}"] = scale[:, None]
            continue
        (part,) = parts  # check_layout refused fused stems
        scaling = layers[part.module].scaling[ADAPTER]
        for suffix, tensor in by_module[part.module].items():
            out[f"{stem}.{suffix}"] = tensor * scaling if suffix in SCALED_FACTORS else tensor
    return out


def read_adapter_file(module: DiffusionModule, path: Path, layout: Optional[FileLayout] = None
                      ) -> dict[str, torch.Tensor]:
    """A LoRA / DoRA / LoKr / LoHa file in the family's format -> PEFT weights as `lora_state_dict` names them,
    unscaled (as the module's layers hold them)."""
    layout = layout or file_layout(module)
    layers = adapter_layers(module)
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as error:
        raise ConfigError(f"{path}: cannot read it as a safetensors file ({error}).") from None
    by_stem = _by_stem(tensors, str(path))
    unknown = sorted(set(by_stem) - set(layout.stems))
    missing = sorted(set(layout.stems) - set(by_stem))
    if unknown or missing:
        raise ConfigError(f"{path} does not match this model's adapter layers (written for another model or "
                          f"adapter?): {len(unknown)} unknown stems {unknown[:3]}, {len(missing)} missing {missing[:3]}.")
    out = {}
    for stem, own in by_stem.items():
        out.update(_from_file(own, layout.stems[stem], layers))
    return out


def _from_file(own: dict[str, torch.Tensor], parts: list[Part],
               layers: dict[str, BaseTunerLayer]) -> dict[str, torch.Tensor]:
    """One stem's tensors -> each of its modules' PEFT weights."""
    out = {}
    if any(suffix in own for suffix in DOWN):
        down, up = _lora_pair(own)
        rank = down.shape[0] // len(parts)
        file_scale = float(own[ALPHA]) / rank if ALPHA in own else 1.0
        for k, part in enumerate(parts):
            layer, ranks = layers[part.module], slice(k * rank, (k + 1) * rank)
            module_up = up.new_zeros(layer.get_base_layer().out_features, rank)
            module_up[part.module_rows] = up[part.stem_rows, ranks]
            out[f"{part.module}.lora_A.weight"] = down[ranks]
            out[f"{part.module}.lora_B.weight"] = module_up * (file_scale / layer.scaling[ADAPTER])
    if DORA_SCALE in own:
        for part in parts:
            magnitude = own[DORA_SCALE].new_zeros(layers[part.module].get_base_layer().out_features)
            magnitude[part.module_rows] = own[DORA_SCALE][part.stem_rows, 0]
            out[f"{part.module}.{MAGNITUDE}"] = magnitude
    for suffix in set(own) & {*LOKR, *LOHA}:
        (part,) = parts
        scaling = layers[part.module].scaling[ADAPTER]
        out[f"{part.module}.{suffix}"] = own[suffix] / scaling if suffix in SCALED_FACTORS else own[suffix]
    return out


def load_adapter_file(module: DiffusionModule, path: Path, layout: Optional[FileLayout] = None) -> None:
    """Sets the module's adapter weights to those of `path` (exactly: the file's output is the module's)."""
    weights = read_adapter_file(module, path, layout)
    parts = {part_prefix(name): part for name, part in module.model_parts().items()
             if any(isinstance(layer, BaseTunerLayer) for layer in part.modules())}  # not the frozen ones
    expected = {prefix: list(get_peft_model_state_dict(part, adapter_name=ADAPTER)) for prefix, part in parts.items()}
    expected_keys = {prefix + key for prefix, keys in expected.items() for key in keys}
    if expected_keys != set(weights):
        raise ConfigError(f"{path} holds another kind of adapter than adapter={describe(module)} (it differs in "
                          f"{sorted(expected_keys ^ set(weights))[0]}): set the adapter it was trained with.")
    for prefix, part in parts.items():
        try:
            set_peft_model_state_dict(part, {key: weights[prefix + key] for key in expected[prefix]},
                                      adapter_name=ADAPTER)
        except RuntimeError as error:
            raise ConfigError(f"{path} does not fit adapter.rank={module.adapter_cfg.rank} / the adapter's "
                              f"settings: {str(error).splitlines()[-1].strip()}") from None


def prepare_adapter(module: DiffusionModule) -> None:
    """After the adapter is added: refuse a format that cannot hold it, start from `adapter.init_path`."""
    cfg = module.adapter_cfg
    init_path = cfg.get("init_path")
    if is_plain_lora(cfg) and not init_path:
        return
    layout = file_layout(module)
    if not is_plain_lora(cfg):
        check_layout(cfg, layout, type(module).__name__)
    if init_path:
        load_adapter_file(module, Path(init_path), layout)


def _by_stem(tensors: dict[str, torch.Tensor], what: str) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        suffix = next((s for s in FILE_SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            raise ConfigError(f"{what}: {key} is no LoRA, DoRA, LoKr or LoHa weight.")
        grouped[key[:-len(suffix) - 1]][suffix] = tensor
    return dict(grouped)


def _by_module(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in weights.items():
        module, _, suffix = key.rpartition(".")
        grouped[module][suffix] = tensor
    return dict(grouped)


def _lora_pair(own: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return next(own[s] for s in DOWN if s in own), next(own[s] for s in UP if s in own)


def part_prefix(name: str) -> str:
    """Where a model part's weights sit in exported state dicts: the denoiser's bare, others under '<name>.'."""
    return "" if name == "denoiser" else f"{name}."
