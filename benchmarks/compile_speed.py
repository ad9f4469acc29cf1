"""Steady-state training step time with model.compile=true (and whole) over eager, for Flux, SDXL and Wan.

Each measurement is a real training run (`difftrain.training.run`, the config composed as train.py composes it)
of the family's tiny model on the example images at one square resolution, LoRA, float32, batch 1; a callback
clocks every optimizer step. The first `--warmup` steps (the compile) are dropped and the median of the rest
is taken. A family's settings alternate, `--trials` runs of each: compiled code persists in the process, so only
the first compiled run pays the compile. Prints median step times and compiled / eager per family and setting."""
import argparse
import tempfile
import time
from pathlib import Path

from _common import add_threads_option, compose_config, limit_cpu_threads, median, print_table, quiet

import torch
from lightning import Callback

from difftrain.training import run

# family -> (model group overrides, square resolution in px, its model.compile settings)
FAMILIES = {"flux": (("model=flux_tiny",), 512, ("true", "whole")),
            "wan": (("model=wan21_t2v", "model.tiny=true", "model.dtype=float32"), 512, ("true", "whole")),
            # whole: the tiny UNet as one graph was still compiling after 10 min on a 2-core CPU
            "sdxl": (("model=sdxl_tiny",), 512, ("true",))}


class StepTimer(Callback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seconds.append(time.perf_counter() - self.start)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="steps dropped from each run (the compile happens here)")
    p.add_argument("--trials", type=int, default=2, help="runs of each setting; the settings alternate")
    add_threads_option(p)
    return p.parse_args()


def step_seconds(family: str, compile: str, run_dir: Path, args: argparse.Namespace) -> list[float]:
    model, resolution, _ = FAMILIES[family]
    cfg = compose_config(run_dir, *model, f"model.compile={compile}", f"trainer.max_steps={args.steps}",
                         f"dataset.resolutions=[{resolution}]", "dataset.enable_ar_bucket=false",
                         "adapter.rank=16", "checkpoint_every_n_steps=null",
                         f"+callbacks.timer._target_={__name__}.StepTimer")
    trainer = run(cfg).trainer
    timer = next(c for c in trainer.callbacks if type(c).__name__ == StepTimer.__name__)
    return timer.seconds[args.warmup:]


def main() -> None:
    args = parse_args()
    quiet()
    limit_cpu_threads(args.threads, torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for family in args.families:
            settings = ("false", *FAMILIES[family][2])
            seconds = {setting: [] for setting in settings}
            for trial in range(args.trials):
                for setting in settings if trial % 2 == 0 else settings[::-1]:
                    seconds[setting] += step_seconds(family, setting, Path(work) / f"{family}-{trial}-{setting}", args)
                    print(f"{family} trial {trial + 1} model.compile={setting}: "
                          f"median {median(seconds[setting]):.3f} s/step", flush=True)
            eager = median(seconds["false"])
            rows += [(family, setting, eager, median(seconds[setting]), median(seconds[setting]) / eager)
                     for setting in settings[1:]]
    print_table("Steady-state step time (s), median", ("family", "model.compile", "eager", "compiled",
                                                        "compiled / eager"), rows)


if __name__ == "__main__":
    main()
