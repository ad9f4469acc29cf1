"""Step time of each choice of compiled regions, in one process, the settings' steps interleaved one by one so that
they see the same machine load: eager; the transformer blocks alone; the blocks and the modules around them (what
model.compile=true compiles); the whole denoiser as one graph (model.compile=whole); and --autotune adds
model.compile=max-autotune. The small Flux of vs_diffusers_flux.py (9.2M parameters) loaded by the real
FluxModule, LoRA, float32; each step is a bare training step (step_overhead.py) on one random cached batch, by
default 512 px (1,024 image tokens) with 512 text tokens as Flux's pipeline pads them. Prints each setting's median
step time after --warmup steps, and its ratio to eager and to the blocks alone."""
import argparse
import tempfile
from pathlib import Path
from time import perf_counter

from _common import (TINY_TEXT_WIDTH, add_threads_option, compose_config, instantiate_module, limit_cpu_threads,
                     median, print_table, quiet, small_flux)
from step_overhead import bare_step, cached_batch, write_diffusers_folder

import torch

from difftrain.modules.compile import compile_regions, regions_outside_blocks


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=24, help="steps of each setting")
    p.add_argument("--warmup", type=int, default=4, help="first steps of each setting left out (the compile)")
    p.add_argument("--latent-size", type=int, default=64, help="latent side (64: 512 px, 1,024 image tokens)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--autotune", action="store_true", help="also time model.compile=max-autotune (~1-2 min compile)")
    add_threads_option(p)
    args = p.parse_args()
    args.batch_size, args.full = 1, False  # what step_overhead's helpers read
    return args


def config(work: Path, model_dir: Path, compile: str, rank: int):
    return compose_config(work / "run", "model=flux", f"model.diffusers_path={model_dir}", "model.dtype=float32",
                          f"model.compile={compile}", "adapter=lora", f"adapter.rank={rank}")


def compiled_module(cfg, regions: str):
    """A FluxModule set up as training.run sets it up (LoRA, model.compile from the config), then compiled by
    `regions`: "blocks", or "config" (model.compile as configured)."""
    module = instantiate_module(cfg)
    module.configure_model()
    if regions == "blocks":
        compile_regions(module.blocks())
    return module


def settings(args, work: Path, model_dir: Path) -> dict[str, object]:
    def cfg_for(compile: str):
        return config(work, model_dir, compile, args.rank)

    chosen = {"eager": compiled_module(cfg_for("false"), "config"),
              "blocks": compiled_module(cfg_for("false"), "blocks"),
              "model.compile=true": compiled_module(cfg_for("true"), "config"),
              "model.compile=whole": compiled_module(cfg_for("whole"), "config")}
    if args.autotune:
        chosen["model.compile=max-autotune"] = compiled_module(cfg_for("max-autotune"), "config")
    return chosen


def time_steps(modules: dict[str, object], batch: dict, args) -> dict[str, list[float]]:
    optimizers = {name: torch.optim.AdamW(module.trainable_parameters(), lr=2e-4, fused=True)
                  for name, module in modules.items()}
    no_schedule = {name: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0) for name, opt in optimizers.items()}
    seconds = {name: [] for name in modules}
    for step in range(args.steps):
        order = list(modules) if step % 2 == 0 else list(modules)[::-1]
        for name in order:
            start = perf_counter()
            bare_step(modules[name], batch, optimizers[name], no_schedule[name], 1.0, torch.device("cpu"))
            seconds[name].append(perf_counter() - start)
    return {name: s[args.warmup:] for name, s in seconds.items()}


def main() -> None:
    args = parse_args()
    quiet()
    limit_cpu_threads(args.threads, torch.device("cpu"))
    transformer = small_flux(2, 4, 4, text_width=TINY_TEXT_WIDTH)
    with tempfile.TemporaryDirectory(prefix="bench-compile-regions-") as tmp:
        model_dir = write_diffusers_folder(transformer, Path(tmp) / "small-flux")
        modules = settings(args, Path(tmp), model_dir)
        outside = regions_outside_blocks(modules["eager"].denoiser, modules["eager"].blocks(), None)
        batch = cached_batch(args, transformer.config)
        seconds = time_steps(modules, batch, args)
    eager, blocks = median(seconds["eager"]), median(seconds["blocks"])
    print_table(f"Median step time (steps {args.warmup + 1}-{args.steps}, interleaved), small Flux, LoRA rank "
                f"{args.rank}, {args.latent_size * 8} px + {args.text_tokens} text tokens, float32, {args.threads} "
                f"threads; modules around the blocks: {', '.join(type(m).__name__ for m in outside)}",
                ["setting", "s/step", "/ eager", "/ blocks"],
                [[name, median(s), median(s) / eager, median(s) / blocks] for name, s in seconds.items()])


if __name__ == "__main__":
    main()
