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


@dataclass
class DatasetConfig:
    _target_: str = "src.datamodules.datamodule.DiffusionDataModule"
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
    batch_size: int = 1
    num_workers: int = 0
    cache_dir: Optional[str] = None
    cache_workers: int = 1


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
