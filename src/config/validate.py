"""Validate a composed config before anything heavy loads: unknown keys (with a suggestion), wrong types,
impossible combinations and missing paths each become one `ConfigError` naming the key and the fix."""
import difflib
import importlib
import inspect
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from src.datamodules.shards import check_shards

from .errors import ConfigError
from .family import Key, choices, marker, model_keys, model_schema
from .keys import Choices, ModelPath
from .samples import sample_requests
from .schema import EXPORT_LAYOUTS, GROUPS, VIDEO_CLIP_MODES, AdapterConfig, DatasetConfig, RootConfig, WebDatasetConfig

__all__ = ["ConfigError", "validate", "validate_model"]

# Arguments of optimizer / scheduler targets that the trainer passes itself, never the config.
SUPPLIED_BY_TRAINER = {"optimizer": ("params",), "scheduler": ("optimizer", "total_steps")}
# Optimizer keys our module handles itself rather than passing to the optimizer class.
OPTIMIZER_OPTIONS = ("gradient_release",)


def validate(cfg: DictConfig) -> None:
    root = {k: v for k, v in cfg.items() if k not in GROUPS and k != "hydra"}
    _check_schema(RootConfig, OmegaConf.create(root), "")
    model = _check_model(cfg.model, cfg.adapter)
    shards = cfg.dataset.get("_target_") == WebDatasetConfig._target_
    _check_schema(WebDatasetConfig if shards else DatasetConfig, cfg.dataset, "dataset")
    if shards:
        check_shards(cfg.dataset, cfg.eval_datasets)
    else:
        _check_dataset_paths(cfg.dataset, "dataset")
        for i, eval_set in enumerate(cfg.eval_datasets):
            _check_path(eval_set.path, f"eval_datasets[{i}].path", "a folder of held-out images with captions")
    _check_video_keys(cfg.dataset, "dataset")
    _check_schema(AdapterConfig, cfg.adapter, "adapter")
    _check_choice(cfg.adapter.type, ("lora", "none"), "adapter.type", "adapter=lora or adapter=none")
    _check_choice(cfg.export_layout, EXPORT_LAYOUTS, "export_layout", "where LoRA exports are written")
    for group in ("optimizer", "scheduler"):
        _check_callable_kwargs(cfg[group], group)
    if cfg.optimizer.get("gradient_release"):
        _check_gradient_release(cfg.trainer)
    _check_block_swap(model.blocks_to_swap, cfg.adapter, cfg.trainer)
    if cfg.save_every_n_steps is None and cfg.save_every_n_epochs is None:
        raise ConfigError("Nothing would be exported: set save_every_n_steps or save_every_n_epochs.")
    sample_requests(cfg)


def validate_model(model: DictConfig, adapter_type: str = "none") -> None:
    """The model group alone, for commands that compose no dataset or trainer (scripts/sample.py)."""
    _check_model(model, OmegaConf.create({"type": adapter_type}))


def _check_gradient_release(trainer: DictConfig) -> None:
    if trainer.get("gradient_clip_val"):
        raise ConfigError("optimizer.gradient_release=true steps each weight during backward, before a global "
                          "gradient norm exists, so it cannot clip: set trainer.gradient_clip_val=0.")
    if not _single_process(trainer):
        raise ConfigError("optimizer.gradient_release=true works in a single process (each weight steps before "
                          "gradients are averaged across processes): set trainer.devices=1, or turn it off.")


def _check_block_swap(count: int, adapter: DictConfig, trainer: DictConfig) -> None:
    key = f"model.blocks_to_swap={count}"
    if count < 0:
        raise ConfigError(f"{key} must be >= 0 (0 turns block swap off).")
    if count and adapter.type != "lora":
        raise ConfigError(f"{key} only works with a LoRA: swapped blocks keep frozen base weights in CPU memory, "
                          f"and a full fine-tune trains every weight. Use adapter=lora or model.blocks_to_swap=0.")
    if count and not _single_process(trainer):
        raise ConfigError(f"{key} works in a single process (DDP needs every weight of the model on its device): "
                          f"set trainer.devices=1 and trainer.num_nodes=1, or model.blocks_to_swap=0.")


def _single_process(trainer: DictConfig) -> bool:
    return trainer.get("devices", 1) in (1, "1") and trainer.get("num_nodes", 1) == 1


def _check_schema(schema: type, node: DictConfig, where: str) -> DictConfig:
    """Unknown keys first (entries of lists such as dataset.directories before their list), then types and
    required keys. Returns the node with the schema's defaults filled in."""
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
    return merged


def _check_entries(schema: type, entries: list, where: str) -> None:
    for i, entry in enumerate(entries):
        if not OmegaConf.is_dict(entry):
            keys = ", ".join(f.name for f in fields(schema))
            raise ConfigError(f"{where}[{i}]={entry!r} should be a mapping with some of the keys: {keys}.")
        _check_schema(schema, entry, f"{where}[{i}]")


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
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean '{_join(where, close[0])}'?" if close else ""
    return (f"Unknown config key '{_join(where, key)}'.{hint} "
            f"Valid keys{' of ' + where if where else ''}: {', '.join(k for k in known if k != '_target_')}.")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _check_model(model: DictConfig, adapter: DictConfig) -> DictConfig:
    """The keys, types, choices and paths its family's constructor declares (family.py), then the shared rules.
    Returns the model config with the constructor's defaults filled in."""
    keys = model_keys(model.get("_target_"))
    model = _check_schema(model_schema(keys), model, "model")
    for key in keys.values():
        _check_model_key(key, model)
    if not 0.0 <= model.min_t < model.max_t <= 1.0:
        raise ConfigError(f"model.min_t={model.min_t} and model.max_t={model.max_t} must satisfy 0 <= min_t < max_t <= 1.")
    if model.get("transformer_dtype") is not None and adapter.type != "lora":
        raise ConfigError("model.transformer_dtype (fp8 storage) only works with a LoRA: a full fine-tune must "
                          "update every weight in full precision. Use adapter=lora or unset model.transformer_dtype.")
    return model


def _check_model_key(key: Key, model: DictConfig) -> None:
    value, name = model[key.name], f"model.{key.name}"
    allowed = choices(key.annotation)
    if allowed is not None and value is not None:
        words = marker(key.annotation, Choices) or Choices()
        _check_choice(value, allowed, name, words.what, words.listed)
    path = marker(key.annotation, ModelPath)
    if path is not None and value is not None:
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
        _check_path(dataset.path, f"{where}.path", "a folder of images with captions")
    for i, directory in enumerate(dataset.directories):
        _check_path(directory.path, f"{where}.directories[{i}].path", "a folder of images with captions")


def _check_video_keys(dataset: DictConfig, where: str) -> None:
    entries = [(where, dataset)] + [(f"{where}.directories[{i}]", d) for i, d in enumerate(dataset.directories)]
    for key, entry in entries:
        if entry.get("video_clip_mode") is not None:
            _check_choice(entry.video_clip_mode, VIDEO_CLIP_MODES, f"{key}.video_clip_mode", "how clips are cut from videos")


def _check_path(path: str, key: str, what: str) -> None:
    if not Path(path).exists():
        raise ConfigError(f"{key}={path} does not exist. It should be {what}.")


def _check_choice(value, allowed, key: str, what: str, listed: str = "") -> None:
    if value not in allowed:
        listed = listed or f"one of: {', '.join(map(str, allowed))}"
        raise ConfigError(f"{key}={value} is not valid{' (' + what + ')' if what else ''}. Choose {listed}.")


def _check_callable_kwargs(node: DictConfig, group: str) -> None:
    """Optimizer and scheduler keys are the keyword arguments of their `_target_`."""
    target = _import_target(node._target_, f"{group}._target_")
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [name for name in params if name not in SUPPLIED_BY_TRAINER[group]]
    for key in node.keys():
        if not key.startswith("_") and key not in known and key not in OPTIMIZER_OPTIONS:
            raise ConfigError(_unknown_key_message(key, known, group))


def _import_target(path: str, key: str) -> Any:
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{key}={path} cannot be imported ({e}). Check the spelling, or install the package "
                          f"that provides it.") from None
