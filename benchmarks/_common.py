"""Helpers shared by the benchmark scripts: the real Hydra config and module, timing, and table printing.

The scripts run as `python benchmarks/<name>.py`, so this folder is on sys.path; the repository root is added
here so `tests` imports the same way it does under pytest (`difftrain` is the installed package)."""
import argparse
import logging
import os
import shutil
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported: no progress bars between the tables

import torch  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from difftrain.tiny import flux as tiny_flux  # noqa: E402
from difftrain.tiny import tiny_model_dir  # noqa: E402

from tests.conftest import EXAMPLE_IMAGES, compose_config  # noqa: E402,F401  (the config train.py sees)


def quiet() -> None:
    """Keep the printed tables readable: no Lightning banners, no per-run library warnings."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "difftrain", "diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def instantiate_module(cfg: DictConfig, target: Optional[str] = None):
    """The DiffusionModule exactly as training.run builds it; `target` swaps the class (a benchmark subclass)."""
    extra = {"_target_": target} if target else {}
    return instantiate(cfg.model, adapter=cfg.adapter, optimizer=cfg.optimizer, scheduler=cfg.scheduler,
                       eval_names=(), _recursive_=False, **extra)


FLUX_LATENT_CHANNELS = 16  # 2x2-packed into 64 transformer input channels
TINY_TEXT_WIDTH = tiny_flux.TRANSFORMER_CONFIG["joint_attention_dim"]  # the tiny Flux's T5 and pooled CLIP width


def small_flux(layers: int, single_layers: int, heads: int, text_width: Optional[int] = None) -> FluxTransformer2DModel:
    """A FLUX.1-dev-shaped transformer (guidance embedding, 64-dim heads, real RoPE split 16/24/24), random weights.
    `text_width` is the T5 / pooled CLIP width it reads (default: its own width)."""
    torch.manual_seed(0)
    width = 64 * heads
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * FLUX_LATENT_CHANNELS, num_layers=layers,
        num_single_layers=single_layers, attention_head_dim=64, num_attention_heads=heads,
        joint_attention_dim=text_width or width, pooled_projection_dim=text_width or width, guidance_embeds=True,
        axes_dims_rope=(16, 24, 24))


def small_flux_pipeline_folder(transformer: FluxTransformer2DModel, root: Path) -> Path:
    """A complete diffusers FluxPipeline folder: `transformer` beside the tiny test Flux's VAE, CLIP, T5, tokenizers
    and scheduler (the transformer must read their widths: small_flux(..., text_width=TINY_TEXT_WIDTH))."""
    tiny = tiny_model_dir("flux", tiny_flux.build)
    shutil.copytree(tiny, root, ignore=shutil.ignore_patterns("transformer", tiny_flux.BFL_TRANSFORMER_FILE))
    transformer.save_pretrained(root / "transformer", safe_serialization=True)
    return root


def bench_trainer(cfg: DictConfig, **overrides):
    """Our trainer config (precision, clipping, logging cadence) with no loggers, checkpoints, bars or eval."""
    return instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False, limit_val_batches=0, **overrides)


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads in the main process, 0 = torch's default; 1 is far steadier on a "
                             "machine shared with other jobs (ignored on GPU)")


def limit_cpu_threads(threads: int, device: torch.device) -> None:
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [list(map(str, header))] + [[_format(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = "-+-".join("-" * w for w in widths)
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print(" | ".join(cell.rjust(w) if i else cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print(line)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def interleaved_trials(settings: Sequence[Any], trials: int, measure: Callable[[Any, int], float],
                       unit: str) -> dict[Any, list[float]]:
    """Measures every setting once per trial, alternating the order so that each sees the same load."""
    results = {setting: [] for setting in settings}
    for trial in range(trials):
        for setting in settings if trial % 2 == 0 else settings[::-1]:
            results[setting].append(measure(setting, trial))
            print(f"trial {trial + 1}: {setting}: {results[setting][-1]:.2f} {unit}", flush=True)
    return results


def print_ratios(results: dict[Any, list[float]], what: str) -> None:
    """Median of each setting over the first one's."""
    settings = list(results)
    for setting in settings[1:]:
        ratio = median(results[setting]) / median(results[settings[0]])
        print(f"\nratio {what} {setting} / {settings[0]}: {ratio:.3f}")


def verdict(ratio: float, target: float, lower_is_better: bool = True) -> str:
    ok = ratio <= target if lower_is_better else ratio >= target
    return f"{'PASS' if ok else 'FAIL'} (target {'<=' if lower_is_better else '>='} {target})"
