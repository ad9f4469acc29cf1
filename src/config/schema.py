"""Typed schemas for the config groups. A key that is not declared here is a typo, and a value of the wrong
type is an error, both reported before anything heavy loads (see `validate.py`). The model group has no schema
here: each family declares its keys in its constructor (see `family.py`).

Keys keep the reference trainer's names (diffusion-pipe) so its users feel at home."""
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class DirectoryConfig:
    """One media folder. Unset keys inherit the dataset-level value."""

    path: str = "???"
    resolutions: Optional[list[Any]] = None
    enable_ar_bucket: Optional[bool] = None
    min_ar: Optional[float] = None
    max_ar: Optional[float] = None
    num_ar_buckets: Optional[int] = None
    ar_buckets: Optional[list[Any]] = None
    num_repeats: Optional[int] = None
    caption_prefix: Optional[str] = None
    frame_buckets: Optional[list[int]] = None
    video_clip_mode: Optional[str] = None
    control_path: Optional[str] = None  # control / reference images, same stems as the targets
    control_paths: Optional[list[str]] = None  # several control folders (one reference image from each)
    recursive: Optional[bool] = None  # scan subfolders too
    caption_extension: Optional[str] = None
    shuffle_tags: Optional[bool] = None
    keep_tokens: Optional[int] = None
    tag_separator: Optional[str] = None
    cache_shuffle_num: Optional[int] = None
    mask_path: Optional[str] = None  # loss masks, same stems as the targets


@dataclass
class DatasetConfig:
    _target_: str = "difftrain.datamodules.datamodule.DiffusionDataModule"
    path: Optional[str] = None
    directories: list[DirectoryConfig] = field(default_factory=list)
    resolutions: list[Any] = field(default_factory=lambda: [512])
    enable_ar_bucket: bool = True
    min_ar: float = 0.5
    max_ar: float = 2.0
    num_ar_buckets: int = 7
    ar_buckets: Optional[list[Any]] = None
    num_repeats: int = 1
    caption_prefix: str = ""
    frame_buckets: list[int] = field(default_factory=lambda: [1])
    video_clip_mode: str = "single_beginning"
    control_path: Optional[str] = None
    control_paths: Optional[list[str]] = None
    recursive: bool = True
    caption_extension: str = ".txt"
    shuffle_tags: bool = False
    keep_tokens: int = 0
    tag_separator: str = ", "
    cache_shuffle_num: int = 0
    mask_path: Optional[str] = None
    caption_dropout_p: float = 0.0
    batch_size: int = 1
    num_workers: int = 0
    cache_dir: Optional[str] = None
    cache_workers: int = 1


@dataclass
class WebDatasetConfig(DatasetConfig):
    """dataset=webdataset: tar shards instead of folders (src/datamodules/webdataset.py)."""

    _target_: str = "difftrain.datamodules.webdataset.WebDataModule"
    shards: str = "???"  # paths or URLs as webdataset reads them: brace patterns, '::'-separated lists


@dataclass
class EvalDatasetConfig(DirectoryConfig):
    name: str = "eval"


@dataclass
class AdapterConfig:
    type: str = "lora"
    rank: int = 16
    alpha: Optional[float] = None
    dropout: float = 0.0
    dtype: str = "float32"
    use_dora: bool = False  # lora only
    rank_dropout: float = 0.0  # lokr, loha
    module_dropout: float = 0.0  # lokr, loha
    decompose_factor: int = -1  # lokr
    decompose_both: bool = False  # lokr
    init_path: Optional[str] = None


@dataclass
class RootConfig:
    """Top-level keys of conf/train.yaml (the groups are validated on their own)."""

    seed: int = 42
    dry_run: bool = False
    run_dir: str = "???"
    resume: Optional[str] = None
    outputs_root: str = "???"
    save_every_n_steps: Optional[int] = None
    save_every_n_epochs: Optional[int] = None
    save_dtype: Optional[str] = None
    export_name: Optional[str] = None
    export_layout: str = "both"
    keep_last_n_exports: Optional[int] = None
    checkpoint_every_n_steps: Optional[int] = None
    checkpoint_every_n_minutes: Optional[float] = None
    keep_last_n_checkpoints: Optional[int] = None
    ema_decay: Optional[float] = None
    ema_every_n_steps: int = 1
    callbacks: dict[str, Any] = field(default_factory=dict)
    eval_datasets: list[EvalDatasetConfig] = field(default_factory=list)
    eval_every_n_steps: Optional[int] = None
    eval_every_n_epochs: Optional[int] = None
    eval_before_first_step: bool = True
    # Previews (src/config/samples.py reads the prompts)
    sample_prompts: Any = field(default_factory=list)  # a list of prompts / {prompt, seed, ...}, or a text file
    sample_every_n_steps: Optional[int] = None
    sample_every_n_epochs: Optional[int] = None
    sample_before_first_step: bool = False
    sample_steps: int = 20
    sample_guidance: Optional[float] = None
    sample_size: Any = None  # a side length or [width, height]; null: the first dataset resolution


GROUPS = ("model", "dataset", "adapter", "optimizer", "scheduler", "trainer", "logger", "experiment")
VIDEO_CLIP_MODES = ("single_beginning", "single_middle", "multiple_overlapping")
EXPORT_LAYOUTS = ("folders", "flat", "both")
ADAPTER_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Range:
    """The numbers a key accepts: from `low` (excluded when `above`) to `high`; `note` explains a special value."""

    low: float
    high: float = float("inf")
    above: bool = False
    note: str = ""

    def __contains__(self, value: float) -> bool:
        return (value > self.low if self.above else value >= self.low) and value <= self.high

    def __str__(self) -> str:
        if self.high != float("inf"):
            return f"between {self.low:g} and {self.high:g}"
        return f"{'>' if self.above else '>='} {self.low:g}"


# The numbers each key accepts, by group ("" for the top level; dataset directory and eval entries share the
# dataset's). A key that may be null is also valid null.
AT_LEAST_1, AT_LEAST_0, POSITIVE = Range(1), Range(0), Range(0, above=True)
RANGES = {
    "": {"save_every_n_steps": AT_LEAST_1, "save_every_n_epochs": AT_LEAST_1, "checkpoint_every_n_steps": AT_LEAST_1,
         "checkpoint_every_n_minutes": POSITIVE, "keep_last_n_checkpoints": AT_LEAST_0,
         "ema_decay": Range(0, 1, note="the weight of the average so far at each update, e.g. 0.999"),
         "ema_every_n_steps": AT_LEAST_1,
         "keep_last_n_exports": AT_LEAST_0, "eval_every_n_steps": AT_LEAST_1, "eval_every_n_epochs": AT_LEAST_1,
         "sample_every_n_steps": AT_LEAST_1, "sample_every_n_epochs": AT_LEAST_1, "sample_steps": AT_LEAST_1},
    "dataset": {"min_ar": POSITIVE, "max_ar": POSITIVE, "num_ar_buckets": AT_LEAST_1, "num_repeats": AT_LEAST_1,
                "keep_tokens": AT_LEAST_0, "cache_shuffle_num": AT_LEAST_0, "caption_dropout_p": Range(0, 1),
                "batch_size": AT_LEAST_1, "num_workers": AT_LEAST_0, "cache_workers": AT_LEAST_1},
    "adapter": {"rank": AT_LEAST_1, "alpha": POSITIVE, "dropout": Range(0, 1), "rank_dropout": Range(0, 1),
                "module_dropout": Range(0, 1)},
    "optimizer": {"lr": AT_LEAST_0},
    "scheduler": {"warmup_steps": AT_LEAST_0, "min_lr": AT_LEAST_0, "num_cycles": AT_LEAST_1, "power": POSITIVE,
                  "lr_end": AT_LEAST_0},
    "trainer": {"num_nodes": AT_LEAST_1, "max_epochs": Range(-1, note="-1: no limit"),
                "max_steps": Range(-1, note="-1: no limit"), "accumulate_grad_batches": AT_LEAST_1,
                "gradient_clip_val": AT_LEAST_0, "log_every_n_steps": AT_LEAST_1},
}
# lightning.Trainer arguments that the trainer sets itself (from callbacks, logger and eval_every_n_*), never the config.
TRAINER_SUPPLIED = ("callbacks", "logger", "plugins", "val_check_interval", "check_val_every_n_epoch",
                    "limit_val_batches")
