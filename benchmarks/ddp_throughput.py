"""Training samples per second with 2 DDP processes vs 1 process: the headline command
`python train.py model=wan22_low dataset=videos trainer.devices=N model.tiny=true`, run as users run it.

Each run is a real `train.py` subprocess (Lightning picks DDP with gloo on CPU for devices=2). A callback counts
optimizer steps after --warmup steps and times them on rank 0; samples/s = steps x batch_size x processes /
seconds. The latent cache is filled once beforehand, so no run pays for encoding; exports happen after the timed
window. Runs alternate the order of the process counts across trials. See benchmarks/README.md.

On one machine with 2 cores the two processes share the cores the single process already used, and each step
adds a gloo all-reduce of the LoRA gradients, so expect a ratio near or below 1 here: data parallelism pays off
when each process has its own accelerator (or cores) and steps are long compared with the all-reduce."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning import Callback

ROOT = Path(__file__).resolve().parents[1]


class StepTimer(Callback):
    """Times optimizer steps after `warmup` of them; rank 0 writes {"steps", "seconds", "world_size"} to `out`."""

    def __init__(self, out: str, warmup: int = 2):
        self.out, self.warmup = out, warmup
        self.start = self.last = None
        self.steps = 0

    def on_train_batch_end(self, trainer, *args) -> None:
        now = time.perf_counter()
        if trainer.global_step == self.warmup:
            self.start = now
        elif trainer.global_step > self.warmup:
            self.steps, self.last = trainer.global_step - self.warmup, now

    def on_train_end(self, trainer, module) -> None:
        if trainer.is_global_zero and self.steps:
            Path(self.out).write_text(json.dumps({"steps": self.steps, "seconds": self.last - self.start,
                                                  "world_size": trainer.world_size}))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per run (timed after --warmup)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--resolution", type=int, default=64, help="bucket side of the example clips")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--trials", type=int, default=2, help="runs per process count; the order alternates")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (OMP_NUM_THREADS); 0 = the default (Lightning gives each DDP "
                        "process cores/processes, a single process every core)")
    return p.parse_args()


def train(devices: int, args: argparse.Namespace, work: Path, name: str) -> dict | None:
    timing = work / f"{name}.json"
    command = [sys.executable, "train.py", "model=wan22_low", "dataset=videos", f"trainer.devices={devices}",
               "model.tiny=true", f"trainer.max_steps={args.steps}", "trainer.max_epochs=-1",
               f"dataset.resolutions=[{args.resolution}]", "logger=none", "save_every_n_epochs=null",
               f"save_every_n_steps={10 ** 9}", "checkpoint_every_n_steps=null", "trainer.enable_progress_bar=false",
               f"hydra.run.dir={work / name}", f"dataset.cache_dir={work / 'cache'}",
               f"+callbacks.timer={{_target_:benchmarks.ddp_throughput.StepTimer,out:'{timing}',warmup:{args.warmup}}}"]
    threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **threads},
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(timing.read_text()) if timing.is_file() else None  # None: nothing was timed


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import interleaved_trials, median, print_ratios, print_table

    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        work = Path(tmp)
        train(1, argparse.Namespace(**{**vars(args), "steps": 0}), work, "fill-cache")

        def samples_per_second(processes: int, trial: int) -> float:
            run = train(processes, args, work, f"p{processes}-t{trial}")
            return run["steps"] * run["world_size"] / run["seconds"]  # batch_size 1

        speed = interleaved_trials(args.processes, args.trials, samples_per_second, "samples/s")
    print_table(f"wan22_low tiny LoRA, example videos at {args.resolution}px, batch 1 per process, "
                f"{args.steps - args.warmup} timed steps", ["processes", "runs", "samples/s (median)"],
                [[p, len(v), median(v)] for p, v in speed.items()])
    print_ratios(speed, "samples/s, processes")


if __name__ == "__main__":
    main()
