"""Step time and page faults per step on the CPU, with glibc's default allocator thresholds and with the memory a step
frees kept for the next (src/utils/cpu_memory.py, which training on the CPU applies). The allocator's state is per
process, so each measurement is a fresh process; the two settings alternate, `--pairs` times, so that each pair sees
about the same machine load. Each process loads the small Flux of vs_diffusers_flux.py with the real FluxModule
(LoRA rank 16, float32, eager or `--compile`) and times bare training steps (step_overhead.py) on one random cached
batch at 512 px with 512 text tokens. Prints the medians and the ratio kept / default of every pair."""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from time import perf_counter

from _common import TINY_TEXT_WIDTH, add_threads_option, limit_cpu_threads, median, print_table, quiet, small_flux
from compile_regions import compiled_module, config
from step_overhead import bare_step, cached_batch, write_diffusers_folder

import torch

from difftrain.utils.cpu_memory import keep_freed_memory

SETTINGS = ("default", "kept")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=6, help="processes per setting, alternating")
    p.add_argument("--steps", type=int, default=14, help="steps per process")
    p.add_argument("--warmup", type=int, default=4, help="first steps of each process left out")
    p.add_argument("--compile", default="false", help="model.compile of the module")
    p.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)  # one measurement, in this process
    add_threads_option(p)
    args = p.parse_args()
    args.latent_size, args.text_tokens, args.batch_size, args.full = 64, 512, 1, False  # step_overhead's helpers
    return args


def measure_here(args) -> dict[str, float]:
    """Median seconds and page faults per step after the warmup, in this process."""
    if args.child == "kept" and not keep_freed_memory():
        sys.exit("not glibc: nothing to compare")
    quiet()
    limit_cpu_threads(args.threads, torch.device("cpu"))
    transformer = small_flux(2, 4, 4, text_width=TINY_TEXT_WIDTH)
    with tempfile.TemporaryDirectory(prefix="bench-cpu-memory-") as tmp:
        module = compiled_module(config(Path(tmp), write_diffusers_folder(transformer, Path(tmp) / "flux"),
                                        args.compile, 16), "config")
        batch = cached_batch(args, transformer.config)
        optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=2e-4, fused=True)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        seconds, faults = [], []
        for _ in range(args.steps):
            faults_before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, perf_counter()
            bare_step(module, batch, optimizer, schedule, 1.0, torch.device("cpu"))
            seconds.append(perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    return {"seconds": median(seconds[args.warmup:]), "faults": median(faults[args.warmup:])}


def measure_in_new_process(args, setting: str) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", setting, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--compile", args.compile, "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(measure_here(args)))
        return
    results = {setting: [] for setting in SETTINGS}
    for pair in range(args.pairs):
        for setting in SETTINGS if pair % 2 == 0 else SETTINGS[::-1]:
            results[setting].append(measure_in_new_process(args, setting))
            print(f"pair {pair + 1} {setting}: {results[setting][-1]}", flush=True)
    ratios = [kept["seconds"] / default["seconds"] for default, kept in zip(*results.values())]
    print_table(f"Median per process (steps {args.warmup + 1}-{args.steps}), small Flux, LoRA rank 16, 512 px + 512 "
                f"text tokens, float32, model.compile={args.compile}, {args.threads} threads, {args.pairs} pairs",
                ["allocator", "s/step", "page faults/step"],
                [[s, median([r["seconds"] for r in results[s]]), median([r["faults"] for r in results[s]])]
                 for s in SETTINGS])
    print(f"\nkept / default step time: median of the pairs' ratios {median(ratios):.3f} "
          f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
