"""Import a diffusion-pipe training config (its main TOML and dataset TOML) as a Hydra experiment file:
`python scripts/import_diffusion_pipe.py config.toml [dataset.toml] [--write NAME]`.

Most keys share our names; the tables below say where each one goes. A key with no equivalent is never dropped
silently: it is listed at the end of the output as a comment, with what to use instead."""
import argparse
import json
import sys
import tomllib
from collections.abc import Container
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from . import CONFIG_DIR
from .errors import ConfigError
from .family import model_keys

# Main-config keys with an equivalent: diffusion-pipe key -> our dotted key.
MAIN_KEYS = {
    "output_dir": "outputs_root",
    "epochs": "trainer.max_epochs",
    "max_steps": "trainer.max_steps",
    "gradient_accumulation_steps": "trainer.accumulate_grad_batches",
    "gradient_clipping": "trainer.gradient_clip_val",
    "logging_steps": "trainer.log_every_n_steps",
    "warmup_steps": "scheduler.warmup_steps",
    "save_every_n_epochs": "save_every_n_epochs",
    "save_every_n_steps": "save_every_n_steps",
    "save_dtype": "save_dtype",
    "checkpoint_every_n_minutes": "checkpoint_every_n_minutes",
    "keep_last_n_checkpoints": "keep_last_n_checkpoints",
    "ema_decay": "ema_decay",
    "eval_every_n_epochs": "eval_every_n_epochs",
    "eval_every_n_steps": "eval_every_n_steps",
    "eval_before_first_step": "eval_before_first_step",
    "blocks_to_swap": "model.blocks_to_swap",
    "video_clip_mode": "dataset.video_clip_mode",
    "map_num_proc": "dataset.cache_workers",
    "uncond_fraction": "dataset.caption_dropout_p",
}
LR_SCHEDULERS = ("constant", "linear", "cosine")  # conf/scheduler presets with diffusion-pipe's names
# Main-config keys without an equivalent -> what to use instead.
FSDP = "trainer=fsdp trainer.devices=N (FSDP shards the model over the GPUs instead of pipelining it)"
EVAL_BATCH = "none: eval batches are dataset.batch_size"
MAIN_INSTEAD = {
    "pipeline_stages": FSDP,
    "partition_method": FSDP,
    "partition_split": FSDP,
    "steps_per_print": "trainer.log_every_n_steps",
    "caching_batch_size": "dataset.cache_workers (processes decoding media while caching)",
    "checkpoint_every_n_epochs": "checkpoint_every_n_steps or checkpoint_every_n_minutes",
    "save_every_n_examples": "save_every_n_steps",
    "eval_every_n_examples": "eval_every_n_steps",
    "eval_micro_batch_size_per_gpu": EVAL_BATCH,
    "eval_image_micro_batch_size_per_gpu": EVAL_BATCH,
    "image_eval_micro_batch_size_per_gpu": EVAL_BATCH,
    "eval_gradient_accumulation_steps": EVAL_BATCH,
    "image_micro_batch_size_per_gpu": "dataset.batch_size (one batch size for images and videos)",
    "reentrant_activation_checkpointing": "model.activation_checkpointing=true (non-reentrant)",
    "force_constant_lr": "scheduler=constant optimizer.lr=<value>",
    "resume_from_checkpoint": "resume=auto (or resume=<run dir>) on the command line",
    "regenerate_cache": "delete the dataset's cache_dir",
    "disable_block_swap_for_eval": "none: eval runs with the training's block swap",
    "x_axis_examples": "none: the loggers plot against the step",
    "micro_batch_size_per_gpu": "dataset.batch_size (one batch size for every resolution)",
    "lr_scheduler": f"scheduler={'|'.join(LR_SCHEDULERS)}",
}
# Dataset keys (top level) and [[directory]] keys with our name, and those without an equivalent.
DATASET_KEYS = ("resolutions", "enable_ar_bucket", "min_ar", "max_ar", "num_ar_buckets", "ar_buckets",
                "frame_buckets", "num_repeats", "caption_prefix", "control_path", "caption_dropout_p",
                "shuffle_tags", "keep_tokens", "cache_shuffle_num")
DIRECTORY_KEYS = ("path", "mask_path", "control_path", "resolutions", "enable_ar_bucket", "min_ar", "max_ar",
                  "num_ar_buckets", "ar_buckets", "frame_buckets", "num_repeats", "caption_prefix")
DATASET_INSTEAD = {"size_buckets": "resolutions, ar_buckets and frame_buckets"}
# diffusion-pipe's default where ours differs (its code defaults enable_ar_bucket to false).
DATASET_DEFAULTS = {"enable_ar_bucket": False}
# [adapter] type -> our adapter preset and the keys it shares with diffusion-pipe.
ADAPTERS = {"lora": ("rank", "alpha", "dropout", "dtype"),
            "lokr": ("rank", "alpha", "dropout", "dtype", "decompose_factor", "rank_dropout")}
ADAPTER_INSTEAD = {"init_from_existing": "adapter.init_path=<the .safetensors file in that folder>"}
# [optimizer] type (lower-cased) -> our conf/optimizer preset.
OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "adamw8bitkahan": "adamw8bit_kahan",
              "adamw_optimi": "adamw_optimi", "prodigy": "prodigy"}
# The [model] types we train (flux, qwen_image and wan: the variant follows from the weights' names).
MODEL_TYPES = ("chroma", "flux", "qwen_image", "sdxl", "wan")
SECRET_KEYS = ("wandb_api_key",)


@dataclass
class Experiment:
    """The experiment being built: group choices, values by dotted key, and the keys left out (with why)."""

    groups: dict[str, str] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)

    def set(self, dotted_key: str, value: Any) -> None:
        self.values[dotted_key] = value

    def leave_out(self, where: str, key: str, value: Any, instead: str) -> None:
        shown = "<hidden>" if key in SECRET_KEYS else json.dumps(value)
        self.left_out.append(f"{where}{key} = {shown}: {instead}")

    def to_yaml(self, source: str) -> str:
        tree = OmegaConf.create({"defaults": [{f"override /{g}": c} for g, c in self.groups.items()]})
        for dotted_key, value in self.values.items():
            OmegaConf.update(tree, dotted_key, value, force_add=True)
        header = (f"# @package _global_\n# Imported from diffusion-pipe ({source}); check the paths, then:\n"
                  f"#   python train.py experiment=<this file's name>\n")
        footer = "".join(f"#   {line}\n" for line in self.left_out)
        if footer:
            footer = "\n# Not imported (no equivalent here), with what to use instead:\n" + footer
        return header + OmegaConf.to_yaml(tree) + footer


def import_config(config_path: Path, dataset_path: Optional[Path] = None) -> str:
    """The experiment YAML equivalent to diffusion-pipe's `config_path` and its dataset config (by default the
    file its `dataset` key names, relative to `config_path`)."""
    config_path = Path(config_path)
    main = read_toml(config_path)
    if dataset_path is None:
        if "dataset" not in main:
            raise ConfigError(f"{config_path} has no `dataset` key: pass the dataset TOML as the second argument.")
        dataset_path = config_path.parent / main["dataset"]
    experiment = Experiment()
    model, optimizer = main.get("model", {}), main.get("optimizer")
    experiment.groups["model"] = model_config(model, config_path)
    if optimizer is not None:
        experiment.groups["optimizer"] = optimizer_preset(optimizer)
    model_declares, optimizer_declares = declared_keys(experiment.groups["model"], experiment.groups.get("optimizer"))
    copy_declared("[model] ", model, model_declares, "model", experiment)
    if optimizer is not None:
        copy_declared("[optimizer] ", optimizer, optimizer_declares, "optimizer", experiment)
    import_adapter(main.get("adapter"), model.get("dtype"), experiment)
    import_main_keys(main, config_path, experiment)
    import_monitoring(main.get("monitoring", {}), experiment)
    import_dataset(read_toml(Path(dataset_path)), experiment)
    return experiment.to_yaml(f"{config_path.name} + {Path(dataset_path).name}")


def read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist. Give the path of a diffusion-pipe TOML file.") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}.") from None


def model_config(model: dict, config_path: Path) -> str:
    """Our model config for `[model] type` (and for some types the weights' names)."""
    kind = model.get("type")
    if kind not in MODEL_TYPES:
        raise ConfigError(f"[model] type = {json.dumps(kind)} in {config_path} is not a family difftrain trains. "
                          f"Supported diffusion-pipe types: {', '.join(MODEL_TYPES)}.")
    names = " ".join(str(model.get(k, "")) for k in ("diffusers_path", "transformer_path")).lower()
    if kind == "flux":
        return "flux_kontext" if "kontext" in names else "flux"
    if kind == "qwen_image":
        return qwen_image_variant(names)
    if kind == "wan":
        return wan_variant(model, config_path)
    return kind


def qwen_image_variant(weight_names: str) -> str:
    if "edit" not in weight_names:
        return "qwen_image"
    return "qwen_image_edit_plus" if "2509" in weight_names or "plus" in weight_names else "qwen_image_edit"


def wan_variant(model: dict, config_path: Path) -> str:
    """Our Wan config for diffusion-pipe's `ckpt_path` / `transformer_path`: the kind (t2v, i2v, ti2v) from the
    checkpoint's config.json when it is on this machine, else from the folder name (Wan-AI's names); Wan2.2 A14B
    (two experts) when the folder has them or is named so, the expert from the transformer's name."""
    ckpt = Path(model.get("ckpt_path", ""))
    transformer = str(model.get("transformer_path", "")).lower()
    kind = wan_kind(ckpt, Path(model.get("transformer_path", ckpt)))
    if kind not in ("t2v", "i2v", "ti2v"):
        raise ConfigError(f"[model] ckpt_path = {json.dumps(str(ckpt))} in {config_path} is a Wan {kind} model; "
                          f"difftrain trains Wan t2v, i2v and ti2v (5B) models.")
    if kind == "ti2v":
        return "wan22_5b"
    if "a14b" in ckpt.name.lower() or (ckpt / "low_noise_model").is_dir():
        expert = "wan22_high" if "high_noise" in transformer else "wan22_low"
        return f"{expert}_i2v" if kind == "i2v" else expert
    return "wan21_i2v" if kind == "i2v" else "wan21_t2v"


def wan_kind(ckpt: Path, transformer: Path) -> str:
    for config in (transformer / "config.json", ckpt / "config.json", ckpt / "low_noise_model" / "config.json"):
        if config.is_file():
            return json.loads(config.read_text())["model_type"]
    name = ckpt.name.lower()
    return next((kind for kind in ("ti2v", "flf2v", "i2v") if kind in name), "t2v")


def import_adapter(adapter: Optional[dict], model_dtype: Optional[str], experiment: Experiment) -> None:
    """No [adapter] table means a full fine-tune. diffusion-pipe's adapter dtype defaults to the model's."""
    if adapter is None:
        experiment.groups["adapter"] = "none"
        return
    kind = adapter.get("type")
    if kind not in ADAPTERS:
        raise ConfigError(f"[adapter] type = {json.dumps(kind)} is not an adapter difftrain trains: use one of "
                          f"{', '.join(ADAPTERS)}, or remove [adapter] for a full fine-tune.")
    experiment.groups["adapter"] = kind
    defaults = {"dtype": model_dtype} if model_dtype else {}
    for key, value in {**defaults, **adapter}.items():
        if key == "rank":
            value = int(value)  # TOML's 1e6 (LoKr's "full matrix") is a float
        if key in ADAPTERS[kind]:
            experiment.set(f"adapter.{key}", value)
        elif key != "type":
            experiment.leave_out("[adapter] ", key, value, ADAPTER_INSTEAD.get(key, "no equivalent"))


def optimizer_preset(optimizer: dict) -> str:
    kind = str(optimizer.get("type", "")).lower()
    if kind not in OPTIMIZERS:
        raise ConfigError(f"[optimizer] type = {json.dumps(optimizer.get('type'))} has no difftrain equivalent: "
                          f"use one of {', '.join(OPTIMIZERS)} (case-insensitive).")
    return OPTIMIZERS[kind]


@lru_cache
def declared_keys(model_config: str, optimizer_preset: Optional[str]) -> tuple[frozenset[str], frozenset[str]]:
    """The keys our model family and optimizer preset declare, from our configs composed as train.py composes
    them."""
    choices = [f"model={model_config}"] + ([f"optimizer={optimizer_preset}"] if optimizer_preset else [])
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        ours = compose("train", overrides=choices)
    return frozenset(model_keys(ours.model._target_)), frozenset(ours.optimizer)


def copy_declared(where: str, table: dict, declared: Container[str], group: str, experiment: Experiment) -> None:
    """Copies the keys of a diffusion-pipe table that our `group` config declares (same names); lists the others."""
    for key, value in table.items():
        if key in declared:
            experiment.set(f"{group}.{key}", value)
        elif key != "type":
            experiment.leave_out(where, key, value, f"not a key of {group}={experiment.groups[group]}")


def import_main_keys(main: dict, config_path: Path, experiment: Experiment) -> None:
    for key, value in main.items():
        if key in ("model", "adapter", "optimizer", "monitoring", "dataset"):
            continue
        if key in MAIN_KEYS:
            experiment.set(MAIN_KEYS[key], value)
        elif key == "micro_batch_size_per_gpu" and isinstance(value, int):
            experiment.set("dataset.batch_size", value)
        elif key == "activation_checkpointing":
            experiment.set("model.activation_checkpointing", "offload" if value == "unsloth" else value)
        elif key == "lr_scheduler" and value in LR_SCHEDULERS:
            experiment.groups["scheduler"] = value
        elif key == "eval_datasets":
            experiment.set("eval_datasets", import_eval_datasets(value, config_path))
        else:
            experiment.leave_out("", key, value, MAIN_INSTEAD.get(key, "no equivalent"))
    if "save_every_n_steps" in main and "save_every_n_epochs" not in main:
        experiment.set("save_every_n_epochs", None)  # ours saves every epoch by default; diffusion-pipe needs one


def import_monitoring(monitoring: dict, experiment: Experiment) -> None:
    if not monitoring.get("enable_wandb"):
        for key, value in monitoring.items():
            experiment.leave_out("[monitoring] ", key, value, "W&B is off (enable_wandb = false)")
        return
    experiment.groups["logger"] = "wandb"
    for key, value in monitoring.items():
        if key == "wandb_tracker_name" and value:
            experiment.set("logger.wandb.project", value)
        elif key == "wandb_run_name" and value:
            experiment.set("logger.wandb.name", value)
        elif key == "wandb_api_key":
            experiment.leave_out("[monitoring] ", key, value, "set WANDB_API_KEY in the environment (or wandb login)")


def import_dataset(dataset: dict, experiment: Experiment) -> None:
    """Every [[directory]] becomes an entry of dataset.directories; top-level keys stay dataset-level."""
    experiment.groups["dataset"] = "images"
    for key, value in {**DATASET_DEFAULTS, **dataset}.items():
        if key in DATASET_KEYS:
            experiment.set(f"dataset.{key}", value)
        elif key != "directory":
            experiment.leave_out("dataset ", key, value, DATASET_INSTEAD.get(key, "no equivalent"))
    directories = [import_directory(d, f"dataset [[directory]] {i + 1}: ", experiment)
                   for i, d in enumerate(dataset.get("directory", []))]
    experiment.set("dataset.directories", directories)


def import_directory(directory: dict, where: str, experiment: Experiment) -> dict:
    for key, value in directory.items():
        if key not in DIRECTORY_KEYS:
            experiment.leave_out(where, key, value, f"dataset.{key} (dataset-level only)" if key in DATASET_KEYS
                                 else DATASET_INSTEAD.get(key, "no equivalent"))
    return {k: v for k, v in directory.items() if k in DIRECTORY_KEYS}


def import_eval_datasets(entries: list, config_path: Path) -> list[dict]:
    """diffusion-pipe's entries ({name, config}, or a dataset TOML path named eval<i>) -> ours, one per
    [[directory]] of each eval dataset TOML (its top-level keys apply to each of its folders)."""
    imported = []
    for i, entry in enumerate(entries):
        name, config = (entry["name"], entry["config"]) if isinstance(entry, dict) else (f"eval{i}", entry)
        dataset = read_toml(config_path.parent / config)
        shared = {k: v for k, v in dataset.items() if k in DIRECTORY_KEYS}
        folders = dataset.get("directory", [])
        for j, directory in enumerate(folders):
            imported.append({"name": name if len(folders) == 1 else f"{name}_{j + 1}", **shared,
                             **{k: v for k, v in directory.items() if k in DIRECTORY_KEYS}})
    return imported


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="diffusion-pipe main TOML")
    parser.add_argument("dataset", type=Path, nargs="?", help="dataset TOML (default: the config's `dataset`)")
    parser.add_argument("--write", metavar="NAME", help="write <experiment-dir>/NAME.yaml instead of printing")
    parser.add_argument("--experiment-dir", type=Path, default=CONFIG_DIR / "experiment",
                        help="where --write puts the file (default: our conf/experiment)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing experiment of that name")
    args = parser.parse_args(argv)
    try:
        text = import_config(args.config, args.dataset)
        if args.write:
            path = write_experiment(text, args.experiment_dir / f"{args.write}.yaml", args.overwrite)
            print(f"Wrote {path}. Train with: python train.py experiment={args.write}", file=sys.stderr)
        else:
            print(text, end="")
    except ConfigError as error:
        raise SystemExit(f"Error: {error}") from None


def write_experiment(text: str, path: Path, overwrite: bool = False) -> Path:
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists: choose another name for --write, or pass --overwrite to replace it.")
    from difftrain.utils.atomic import write_text  # imports torch: only when a file is written

    write_text(path, text)
    return path
