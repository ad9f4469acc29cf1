"""Typed schemas for the config groups. A key that is not declared here is a typo, and a value of the wrong
type is an error, both reported before anything heavy loads (see `validate.py`).

Keys keep the reference trainer's names (diffusion-pipe) so its users feel at home."""
from dataclasses import dataclass, field
from typing import Any, Optional, Union


@dataclass
class ModelConfig:
    """Keys every family understands."""

    _target_: str = "???"
    tiny: bool = False
    dtype: str = "bfloat16"
    transformer_dtype: Optional[str] = None
    timestep_sample_method: str = "logit_normal"
    sigmoid_scale: float = 1.0
    shift: Optional[float] = None
    flux_shift: bool = False
    min_t: float = 0.0
    max_t: float = 1.0
    activation_checkpointing: Union[bool, str] = False
    blocks_to_swap: int = 0


@dataclass
class FluxConfig(ModelConfig):
    diffusers_path: Optional[str] = None
    transformer_path: Optional[str] = None
    guidance: float = 1.0
    bypass_guidance_embedding: bool = False
    max_sequence_length: int = 512


WAN_VARIANTS = ("wan21_t2v", "wan21_i2v", "wan22_low", "wan22_high", "wan22_low_i2v", "wan22_high_i2v", "wan22_5b")
WAN_CLIP_VARIANTS = ("wan21_i2v",)  # the variants that read clip_path (Wan2.2 A14B I2V has no image encoder)


@dataclass
class WanConfig(ModelConfig):
    variant: str = "???"
    ckpt_path: Optional[str] = None
    transformer_path: Optional[str] = None
    llm_path: Optional[str] = None
    clip_path: Optional[str] = None  # only for WAN_CLIP_VARIANTS
    max_sequence_length: int = 512


@dataclass
class SDXLConfig(ModelConfig):
    timestep_sample_method: str = "uniform"  # DDPM: a uniform t gives uniform integer timesteps
    checkpoint_path: Optional[str] = None
    v_pred: bool = False
    min_snr_gamma: Optional[float] = None
    debiased_estimation_loss: bool = False
    unet_lr: Optional[float] = None
    text_encoder_1_lr: Optional[float] = None
    text_encoder_2_lr: Optional[float] = None


# The schema of each family, by the `_target_` of its model config.
MODEL_SCHEMAS: dict[str, type[ModelConfig]] = {
    "src.modules.sdxl.SDXLModule": SDXLConfig,
    "src.modules.flux.FluxModule": FluxConfig,
    "src.modules.flux_kontext.FluxKontextModule": FluxConfig,
    "src.modules.wan.WanModule": WanConfig,
}


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
    run_dir: str = "???"
    resume: Optional[str] = None
    outputs_root: str = "???"
    save_every_n_steps: Optional[int] = None
    save_every_n_epochs: Optional[int] = None
    save_dtype: Optional[str] = None
    checkpoint_every_n_steps: Optional[int] = None
    callbacks: dict[str, Any] = field(default_factory=dict)
    eval_datasets: list[EvalDatasetConfig] = field(default_factory=list)
    eval_every_n_steps: Optional[int] = None
    eval_every_n_epochs: Optional[int] = None
    eval_before_first_step: bool = True


GROUPS = ("model", "dataset", "adapter", "optimizer", "scheduler", "trainer", "logger", "experiment")
DTYPES = ("float32", "float16", "bfloat16")
VIDEO_CLIP_MODES = ("single_beginning", "single_middle", "multiple_overlapping")
FP8_DTYPES = ("float8", "float8_e4m3fn", "float8_e5m2")
ACTIVATION_CHECKPOINTING = (False, True, "offload")
