"""Validate a composed config before anything heavy loads: unknown keys (with a suggestion), wrong types,
impossible combinations and missing paths each become one `ConfigError` naming the key and the fix."""
import difflib
import importlib
import inspect
import re
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from difftrain.datamodules.shards import check_shards

from .errors import ConfigError
from .family import Key, choices, constructor_keys, keys_schema, marker, model_keys
from .keys import Choices, ModelPath
from .samples import sample_requests
from .schema import (
    ADAPTER_DTYPES,
    EXPORT_LAYOUTS,
    GROUPS,
    RANGES,
    TRAINER_SUPPLIED,
    VIDEO_CLIP_MODES,
    AdapterConfig,
    DatasetConfig,
    Range,
    RootConfig,
    WebDatasetConfig,
)
from .strategy import check_strategy

__all__ = ["ConfigError", "unknown_key_error", "validate", "validate_model"]

# Arguments of optimizer / scheduler targets that the trainer passes itself, never the config.
SUPPLIED_BY_TRAINER = {"optimizer": ("params",), "scheduler": ("optimizer", "total_steps")}
# Optimizer keys our module handles itself rather than passing to the optimizer class.
OPTIMIZER_OPTIONS = ("gradient_release",)
# Keys of the DDPM objective (model=sdxl): a flow-matching family's model group has none of them.
DDPM_ONLY_KEYS = ("min_snr_gamma", "debiased_estimation_loss", "v_pred")
# The groups whose keys a schema of schema.py declares ("" for the top level).
SCHEMAS = {"": RootConfig, "dataset": DatasetConfig, "adapter": AdapterConfig}


def validate(cfg: DictConfig) -> None:
    root = {k: v for k, v in cfg.items() if k not in GROUPS and k != "hydra"}
    _check_schema(RootConfig, OmegaConf.create(root), "")
    _check_resolution(cfg.sample_size, "sample_size")
    model = _check_model(cfg.model, cfg.adapter)
    shards = cfg.dataset.get("_target_") == WebDatasetConfig._target_
    _check_schema(WebDatasetConfig if shards else DatasetConfig, cfg.dataset, "dataset")
    if shards:
        check_shards(cfg.dataset, cfg.eval_datasets)
    else:
        _check_dataset_paths(cfg.dataset, "dataset")
        for i, eval_set in enumerate(cfg.eval_datasets):
            _check_path(eval_set.path, f"eval_datasets[{i}].path", "a folder of held-out images with captions",
                        folder=True)
    _check_dataset_entries(cfg)
    adapter = _check_schema(AdapterConfig, cfg.adapter, "adapter")
    _check_choice(adapter.type, ("lora", "lokr", "loha", "none"), "adapter.type",
                  "adapter=lora, lokr, loha or none")
    _check_adapter_options(adapter)
    _check_choice(adapter.dtype, ADAPTER_DTYPES, "adapter.dtype", "the dtype of the LoRA weights")
    _check_choice(cfg.export_layout, EXPORT_LAYOUTS, "export_layout", "where LoRA exports are written")
    for group in ("optimizer", "scheduler"):
        _check_callable_kwargs(cfg[group], group)
    _check_trainer(cfg.trainer)
    if cfg.optimizer.get("gradient_release"):
        _check_gradient_release(cfg.trainer)
    _check_block_swap(model.blocks_to_swap, cfg.adapter, cfg.trainer)
    check_strategy(cfg)
    if cfg.save_every_n_steps is None and cfg.save_every_n_epochs is None:
        raise ConfigError("Nothing would be exported: set save_every_n_steps or save_every_n_epochs.")
    sample_requests(cfg)


def validate_model(model: DictConfig, adapter_type: str = "none") -> None:
    """The model group alone, for commands that compose no dataset or trainer (scripts/sample.py)."""
    _check_model(model, OmegaConf.create({"type": adapter_type}))


def unknown_key_error(node: DictConfig, full_key: str) -> ConfigError:
    """The error for a command-line override of a key that `node` (the group it names) does not have: Hydra refuses
    it before validate() runs, so train.py asks here for the message an unknown key in a config file gets."""
    where, _, key = full_key.rpartition(".")
    known = _known_keys(node, where)
    if key in known:  # declared (e.g. by the family's constructor) but left out of the group's file
        return ConfigError(f"'{full_key}' is a valid key that the selected {where} config leaves unset, so the "
                           f"command line must add it: write '+{full_key}=...'.")
    return ConfigError(_unknown_key_message(key, known, where))


def _known_keys(node: DictConfig, where: str) -> list[str]:
    if where in SCHEMAS:
        return [f.name for f in fields(SCHEMAS[where])]
    if where == "model":
        return list(model_keys(node.get("_target_")))
    if where == "trainer":
        return list(_trainer_keys(node))
    known = _callable_keys(_target_parameters(node, where), where) if where in SUPPLIED_BY_TRAINER else None
    return known if known is not None else list(node.keys())  # other nodes (logger.*, callbacks): the keys they have


def _check_trainer(trainer: DictConfig) -> None:
    """lightning.Trainer's keyword arguments (read from its source, see family.py), their types and ranges."""
    trainer = _check_schema(keys_schema(_trainer_keys(trainer)), trainer, "trainer")
    devices = trainer.devices
    if isinstance(devices, int) and not isinstance(devices, bool) and devices < 1 and devices != -1:
        raise ConfigError(f"trainer.devices={devices} is not valid. Use a number of devices >= 1, -1 (all of them), "
                          f"auto, or a list of device indices ([0, 1]).")


def _trainer_keys(trainer: DictConfig) -> dict[str, Key]:
    return constructor_keys(trainer.get("_target_", "lightning.Trainer"), "trainer._target_", TRAINER_SUPPLIED)


def _check_gradient_release(trainer: DictConfig) -> None:
    if trainer.get("gradient_clip_val"):
        raise ConfigError("optimizer.gradient_release=true steps each weight during backward, before a global "
                          "gradient norm exists, so it cannot clip: set trainer.gradient_clip_val=0.")
    if not _single_process(trainer):
        raise ConfigError("optimizer.gradient_release=true works in a single process (each weight steps before "
                          "gradients are averaged across processes): set trainer.devices=1, or turn it off.")


def _check_adapter_options(adapter: DictConfig) -> None:
    if adapter.use_dora and adapter.type != "lora":
        raise ConfigError(f"adapter.use_dora=true is an option of adapter=lora, not adapter={adapter.type}.")
    if adapter.init_path is not None:
        if adapter.type == "none":
            raise ConfigError("adapter.init_path starts an adapter from a file: a full fine-tune (adapter=none) has "
                              "none. Use adapter=lora (or lokr, loha).")
        _check_path(adapter.init_path, "adapter.init_path", "a LoRA file this trainer exported")


def _check_block_swap(count: int, adapter: DictConfig, trainer: DictConfig) -> None:
    key = f"model.blocks_to_swap={count}"
    if count < 0:
        raise ConfigError(f"{key} must be >= 0 (0 turns block swap off).")
    if count and adapter.type != "lora":
        raise ConfigError(f"{key} only works with a LoRA (adapter=lora): swapped blocks hold only frozen base "
                          f"weights, and a full fine-tune or LoKr/LoHa trains weights inside them. Use adapter=lora or "
                          f"model.blocks_to_swap=0.")
    if count and not _single_process(trainer):
        raise ConfigError(f"{key} works in a single process (DDP needs every weight of the model on its device): "
                          f"set trainer.devices=1 and trainer.num_nodes=1, or model.blocks_to_swap=0.")


def _single_process(trainer: DictConfig) -> bool:
    return trainer.get("devices", 1) in (1, "1") and trainer.get("num_nodes", 1) == 1


def _check_schema(schema: type, node: DictConfig, where: str, ranges: Optional[dict[str, Range]] = None) -> DictConfig:
    """Unknown keys first (entries of lists such as dataset.directories before their list), then types, required
    keys and ranges (by default the group's, from schema.RANGES). Returns the node with the schema's defaults filled
    in."""
    types = {f.name: f.type for f in fields(schema)}
    for key in node.keys():
        if key not in types:
            raise ConfigError(_unknown_key_message(key, list(types), where))
    for key, entry_schema in _entry_lists(types).items():
        if OmegaConf.is_list(node.get(key)):
            _check_entries(entry_schema, node[key], _join(where, key))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
    except ValidationError as e:
        raise ConfigError(_wrong_type_message(e, node, types, where)) from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"{_join(where, missing[0])} is required but not set.")
    _check_ranges(merged, RANGES.get(where, {}) if ranges is None else ranges, types, where)
    return merged


def _check_entries(schema: type, entries: list, where: str) -> None:
    """The entries of a list (dataset.directories, eval_datasets): each a dataset folder, with the dataset's ranges."""
    for i, entry in enumerate(entries):
        if not OmegaConf.is_dict(entry):
            keys = ", ".join(f.name for f in fields(schema))
            raise ConfigError(f"{where}[{i}]={entry!r} should be a mapping with some of the keys: {keys}.")
        _check_schema(schema, entry, f"{where}[{i}]", RANGES["dataset"])


def _check_ranges(node: DictConfig, ranges: dict[str, Range], types: dict[str, Any], where: str) -> None:
    for key, allowed in ranges.items():
        value = node.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value not in allowed:
            null = ", or null" if type(None) in get_args(types.get(key)) else ""
            note = f" ({allowed.note})" if allowed.note else ""
            raise ConfigError(f"{_join(where, key)}={value} is out of range: use a number {allowed}{null}{note}.")


def _entry_lists(types: dict[str, Any]) -> dict[str, type]:
    """The fields that hold a list of schema entries, e.g. {'directories': DirectoryConfig}."""
    entries = {}
    for key, annotation in types.items():
        args = get_args(annotation)
        if get_origin(annotation) is list and args and is_dataclass(args[0]):
            entries[key] = args[0]
    return entries


def _wrong_type_message(error: ValidationError, node: DictConfig, types: dict[str, Any], where: str) -> str:
    if error.key not in types:
        return f"{_join(where, error.key or '')}: {error.msg.splitlines()[0]}"
    value = node.get(error.key)
    return f"{_join(where, error.key)}={value!r} has the wrong type: expected {_type_name(types[error.key])}."


def _type_name(annotation: Any) -> str:
    """float, list[Any], list[DirectoryConfig], 'float or null' for Optional[float]."""
    if get_origin(annotation) is Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(annotation))
    return annotation.__name__ if isinstance(annotation, type) else re.sub(r"[\w.]+\.(\w+)", r"\1", str(annotation))


def _unknown_key_message(key: str, known: list[str], where: str) -> str:
    if where == "model" and key in DDPM_ONLY_KEYS:
        return (f"model.{key} applies to the DDPM objective (model=sdxl), not to this family's flow matching, whose "
                f"loss has no SNR weighting or v-prediction: remove it.")
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean '{_join(where, close[0])}'?" if close else ""
    valid = ", ".join(k for k in known if k != "_target_")
    listing = f"Valid keys{' of ' + where if where else ''}: {valid}." if valid else f"{where} has no keys."
    return f"Unknown config key '{_join(where, key)}'.{hint} {listing}"


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _check_model(model: DictConfig, adapter: DictConfig) -> DictConfig:
    """The keys, types, choices and paths its family's constructor declares (family.py), then the shared rules.
    Returns the model config with the constructor's defaults filled in."""
    keys = model_keys(model.get("_target_"))
    model = _check_schema(keys_schema(keys), model, "model")
    for key in keys.values():
        _check_model_key(key, model)
    if not 0.0 <= model.min_t < model.max_t <= 1.0:
        raise ConfigError(f"model.min_t={model.min_t} and model.max_t={model.max_t} must satisfy 0 <= min_t < max_t <= 1.")
    if model.get("transformer_dtype") is not None and (adapter.type != "lora" or adapter.get("use_dora")):
        raise ConfigError("model.transformer_dtype (fp8/nf4 storage) only works with a LoRA (adapter=lora, no "
                          "use_dora): a full fine-tune must update every weight in full precision, and DoRA, LoKr "
                          "and LoHa are not supported on a quantized base. Use adapter=lora or unset "
                          "model.transformer_dtype.")
    return model


def _check_model_key(key: Key, model: DictConfig) -> None:
    value, name = model[key.name], f"model.{key.name}"
    allowed = choices(key.annotation)
    if allowed is not None and value is not None:
        words = marker(key.annotation, Choices) or Choices()
        _check_choice(value, allowed, name, words.what, words.listed)
    path = marker(key.annotation, ModelPath)
    if path is not None and value is not None:
        if not (path.repo_id and _is_repo_id(value)):
            _check_path(value, name, path.what)
    elif path is not None and path.required and not model.tiny:
        example = f" ({name}={path.example})" if path.example else ""
        raise ConfigError(f"{name} is not set. Point it at {path.what}{example}, or use model.tiny=true for a tiny "
                          f"test model.")


def _check_dataset_paths(dataset: DictConfig, where: str) -> None:
    if dataset.path is None and not dataset.directories:
        raise ConfigError(f"{where}.path is not set. Point it at a folder of images with captions "
                          f"({where}.path=/data/mine) or list folders in {where}.directories.")
    if dataset.path is not None:
        _check_path(dataset.path, f"{where}.path", "a folder of images with captions", folder=True)
    for i, directory in enumerate(dataset.directories):
        _check_path(directory.path, f"{where}.directories[{i}].path", "a folder of images with captions", folder=True)


def _check_dataset_entries(cfg: DictConfig) -> None:
    """The keys the dataset, each of its directories and each eval dataset set alike."""
    entries = [("dataset", cfg.dataset)] + [(f"dataset.directories[{i}]", d) for i, d in enumerate(cfg.dataset.directories)]
    entries += [(f"eval_datasets[{i}]", d) for i, d in enumerate(cfg.eval_datasets)]
    for where, entry in entries:
        if entry.get("video_clip_mode") is not None:
            _check_choice(entry.video_clip_mode, VIDEO_CLIP_MODES, f"{where}.video_clip_mode", "how clips are cut from videos")
        for i, resolution in enumerate(entry.get("resolutions") or ()):
            _check_resolution(resolution, f"{where}.resolutions[{i}]")


def _check_resolution(resolution: Any, key: str) -> None:
    """A side length (512: 512x512 pixels) or [width, height]; None is the default."""
    sides = list(resolution) if OmegaConf.is_list(resolution) else [resolution]
    if resolution is None or (len(sides) in (1, 2) and all(_is_count(side) for side in sides)):
        return
    raise ConfigError(f"{key}={resolution} is not a resolution. Use a side length in pixels (512) or [width, height] "
                      f"([768, 512]), each > 0.")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_repo_id(value: str) -> bool:
    """`owner/name` that is no path on disk: a Hugging Face repo id."""
    return not Path(value).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", value) is not None


def _check_path(path: str, key: str, what: str, folder: bool = False) -> None:
    if not Path(path).exists():
        raise ConfigError(f"{key}={path} does not exist. It should be {what}.")
    if folder and not Path(path).is_dir():
        raise ConfigError(f"{key}={path} is a file. It should be {what}.")


def _check_choice(value, allowed, key: str, what: str, listed: str = "") -> None:
    if value not in allowed:
        listed = listed or f"one of: {', '.join(map(str, allowed))}"
        raise ConfigError(f"{key}={value} is not valid{' (' + what + ')' if what else ''}. Choose {listed}.")


def _check_callable_kwargs(node: DictConfig, group: str) -> None:
    """Optimizer and scheduler keys are the keyword arguments of their `_target_`: known, in range and, for a
    `Literal` argument, one of its values."""
    params = _target_parameters(node, group)
    known = _callable_keys(params, group)
    for key in node.keys():
        if known is not None and not key.startswith("_") and key not in known and key not in OPTIMIZER_OPTIONS:
            raise ConfigError(_unknown_key_message(key, known, group))
    _check_ranges(node, RANGES[group], {}, group)
    for key in node.keys():
        allowed = choices(params[key].annotation) if key in params else None
        if allowed is not None:
            _check_choice(node[key], allowed, _join(group, key), "")


def _target_parameters(node: DictConfig, group: str) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(_import_target(node._target_, f"{group}._target_")).parameters


def _callable_keys(params: Mapping[str, inspect.Parameter], group: str) -> Optional[list[str]]:
    """The parameters of the group's `_target_` that the config may set; None when it takes **kwargs."""
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [name for name in params if name not in SUPPLIED_BY_TRAINER[group]]


def _import_target(path: str, key: str) -> Any:
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{key}={path} cannot be imported ({e}). Check the spelling, or install the package "
                          f"that provides it.") from None
