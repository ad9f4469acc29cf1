"""Peak GPU memory and step time of a LoRA training step with model.blocks_to_swap = 0, N/4 and N/2 on FLUX.1-dev's
block stack (19 double + 38 single blocks by default, N = 57), CUDA only: without CUDA it says so and exits 0.

Each row builds the real FluxModule from the composed config (LoRA rank 16, bf16, activation checkpointing
`--checkpointing`), whose denoiser is FLUX.1-dev's architecture holding one shared set of random bf16 weights
(their values change neither memory nor speed), moves it to the GPU as Lightning does (module.to), and times
forward + backward of one cached-style batch: a 1024x1024 image (128x128 latents, 4096 tokens) and 512 text
tokens. Peak = torch.cuda.max_memory_allocated over the timed steps. Targets (issue 5): peak memory falls about
linearly with the swapped blocks, and step time at N/2 is at most 1.25x that at 0. See benchmarks/README.md."""
import argparse
import functools
import gc
import tempfile
import time
from pathlib import Path

from _common import compose_config, instantiate_module, median, print_table, quiet, verdict

import torch
from diffusers import FluxTransformer2DModel

from difftrain.modules.flux import FluxModule

TARGET_TIME_RATIO = 1.25
# diffusers' FluxTransformer2DModel defaults are FLUX.1-dev's shapes, except that dev has a guidance embedding;
# main() sets the block counts from the command line.
ARCHITECTURE = dict(guidance_embeds=True)


@functools.cache
def random_weights() -> dict[str, torch.Tensor]:
    """One set of bf16 weights for ARCHITECTURE, shared by every row (each row's swap and device copies are its own)."""
    with torch.device("meta"):
        shapes = FluxTransformer2DModel(**ARCHITECTURE).state_dict()
    generator = torch.Generator().manual_seed(0)
    return {name: torch.empty(t.shape, dtype=torch.bfloat16).normal_(std=0.02, generator=generator)
            for name, t in shapes.items()}


class RandomFlux1DevModule(FluxModule):
    """FluxModule whose denoiser is ARCHITECTURE with random_weights(), built without any file."""

    def load_denoiser(self) -> FluxTransformer2DModel:
        with torch.device("meta"):
            model = FluxTransformer2DModel(**ARCHITECTURE)
        model.load_state_dict(random_weights(), assign=True)
        return model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=19, help="double blocks")
    p.add_argument("--single-layers", type=int, default=38, help="single blocks")
    p.add_argument("--checkpointing", default="true", choices=["true", "offload", "false"],
                   help="model.activation_checkpointing")
    p.add_argument("--latent-size", type=int, default=128, help="latent side (x8 = image side)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row")
    return p.parse_args()


def batch_and_noise(args: argparse.Namespace) -> tuple[dict, torch.Tensor]:
    """What the datamodule's collate yields from the cache (random values, on the GPU), and the step's noise."""
    g = torch.Generator().manual_seed(0)
    side = args.latent_size
    batch = {"latents": torch.randn(1, 16, side, side, generator=g).cuda(),
             "text": {"prompt_embeds": torch.randn(1, args.text_tokens, 4096, generator=g).cuda(),
                      "pooled_prompt_embeds": torch.randn(1, 768, generator=g).cuda()}}
    return batch, torch.randn(1, 16, side, side, generator=g)


def step(module, batch: dict, noise: torch.Tensor) -> None:
    module.forward_loss(batch, torch.tensor([0.6]), noise).backward()
    module.zero_grad(set_to_none=True)


def measure(args: argparse.Namespace, swapped: int, work_dir: Path) -> dict:
    cfg = compose_config(work_dir / f"swap{swapped}", "model=flux", "model.tiny=true", "model.dtype=bfloat16",
                         f"model.blocks_to_swap={swapped}", f"model.activation_checkpointing={args.checkpointing}",
                         "adapter=lora", "adapter.rank=16", "adapter.dtype=bfloat16")
    module = instantiate_module(cfg, f"{__name__}.{RandomFlux1DevModule.__name__}")
    module.configure_model()
    module.to("cuda")
    inputs = batch_and_noise(args)
    for _ in range(args.warmup):
        step(module, *inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step(module, *inputs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    row = {"swapped": swapped, "peak": torch.cuda.max_memory_allocated(), "time": median(times)}
    del module, inputs
    gc.collect()
    torch.cuda.empty_cache()
    return row


def report(args: argparse.Namespace, rows: list[dict], num_blocks: int) -> None:
    base = rows[0]
    gib = 2 ** 30
    table = [[r["swapped"], r["peak"] / gib,
              (base["peak"] - r["peak"]) / gib / r["swapped"] if r["swapped"] else "-", r["time"],
              r["time"] / base["time"]] for r in rows]
    print_table(f"FLUX.1-dev-shaped block stack ({args.layers} double + {args.single_layers} single = {num_blocks} "
                f"blocks), LoRA rank 16, bf16, activation_checkpointing={args.checkpointing}, "
                f"{args.latent_size}x{args.latent_size} latents + {args.text_tokens} text tokens, "
                f"{torch.cuda.get_device_name()}",
                ["blocks_to_swap", "peak GiB", "GiB saved per swapped block", "step s (median)", "time vs 0"], table)
    print(f"\nstep time at N/2 vs 0: {rows[-1]['time'] / base['time']:.3f} "
          f"{verdict(rows[-1]['time'] / base['time'], TARGET_TIME_RATIO)}")


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/block_swap.py measures GPU memory and copy overlap and needs CUDA; none here, so nothing "
              "was measured.")
        return
    quiet()
    ARCHITECTURE.update(num_layers=args.layers, num_single_layers=args.single_layers)
    num_blocks = args.layers + args.single_layers
    with tempfile.TemporaryDirectory() as work_dir:
        rows = [measure(args, swapped, Path(work_dir)) for swapped in (0, num_blocks // 4, num_blocks // 2)]
    report(args, rows, num_blocks)


if __name__ == "__main__":
    main()
