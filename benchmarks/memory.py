"""Memory of the big-model mechanisms, as ratios within one run:

1. peak memory of one full fine-tune step (forward, backward, AdamW step) with and without gradient release:
   CPU RSS sampled every millisecond here, CUDA max allocated where a GPU is present;
2. optimizer state bytes: bitsandbytes 8-bit AdamW (plain and with Kahan summation) vs fp32 torch AdamW
   (target for 8-bit: <= 0.30)."""
import argparse
import functools
import multiprocessing
import resource

import _common  # noqa: F401  (puts the repository on sys.path, quiet defaults)
import bitsandbytes as bnb
import psutil
import torch
from _common import default_device, print_table, verdict
from diffusers import FluxTransformer2DModel, FluxPipeline

from difftrain.optim.adamw8bit_kahan import AdamW8bitKahan
from difftrain.optim.gradient_release import GradientReleaseOptimizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="double blocks")
    parser.add_argument("--single-layers", type=int, default=8, help="single blocks")
    parser.add_argument("--heads", type=int, default=8, help="attention heads of 64 dims")
    parser.add_argument("--tokens", type=int, default=256, help="image tokens")
    return parser.parse_args()


def flux(args, device: torch.device) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=args.layers,
                                  num_single_layers=args.single_layers, attention_head_dim=64,
                                  num_attention_heads=args.heads, joint_attention_dim=256, pooled_projection_dim=64,
                                  guidance_embeds=True, axes_dims_rope=[16, 24, 24]).to(device)


def inputs(model, tokens: int, device: torch.device) -> dict:
    side = int(tokens ** 0.5)
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, side * side, 64, generator=g).to(device),
                encoder_hidden_states=torch.randn(1, 16, 256, generator=g).to(device),
                pooled_projections=torch.randn(1, 64, generator=g).to(device),
                timestep=torch.tensor([0.5], device=device), guidance=torch.tensor([1.0], device=device),
                img_ids=FluxPipeline._prepare_latent_image_ids(1, side, side, device, torch.float32),
                txt_ids=torch.zeros(16, 3, device=device), return_dict=False)


def train_step(model, optimizer, batch: dict) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(**batch)[0].square().mean().backward()
    optimizer.step()


def step_peak(args, device: torch.device, release: bool) -> float:
    """Peak extra memory (MiB) of a first training step over the loaded model and batch. On CPU it is measured
    in a fresh process (the kernel's peak RSS), since a warm allocator reuses freed pages unseen."""
    if device.type != "cuda":
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_first_step_peak_rss, (args, release))
    model, optimizer, batch = _setup(args, device, release)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    train_step(model, optimizer, batch)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _setup(args, device: torch.device, release: bool):
    model = flux(args, device)
    make_adamw = functools.partial(torch.optim.AdamW, lr=1e-5)
    params = [{"params": list(model.parameters())}]
    optimizer = GradientReleaseOptimizer(params, make_adamw) if release else make_adamw(params)
    return model, optimizer, inputs(model, args.tokens, device)


def _first_step_peak_rss(args, release: bool) -> float:
    torch.set_num_threads(1)
    model, optimizer, batch = _setup(args, torch.device("cpu"), release)
    before = psutil.Process().memory_info().rss
    train_step(model, optimizer, batch)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2**20


def state_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t))


def optimizer_state_bytes(args, device: torch.device) -> dict[str, int]:
    model = flux(args, device)
    sizes = {}
    for name, make, dtype in (("AdamW fp32 states (torch)", torch.optim.AdamW, torch.float32),
                              ("AdamW8bit", bnb.optim.AdamW8bit, torch.float32),
                              ("AdamW8bitKahan on bf16 weights", AdamW8bitKahan, torch.bfloat16)):
        params = [torch.nn.Parameter(p.detach().to(dtype)) for p in model.parameters()]
        optimizer = make(params, lr=1e-5)
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
        sizes[name] = state_bytes(optimizer)
    return sizes


def main() -> None:
    args = parse_args()
    device = default_device()
    params = sum(p.numel() for p in flux(args, device).parameters())
    what = "CUDA max allocated" if device.type == "cuda" else "CPU peak RSS, fresh process"
    plain, released = step_peak(args, device, release=False), step_peak(args, device, release=True)
    print_table(f"Full fine-tune step, Flux with {params / 1e6:.1f}M parameters ({what}, extra over the step)",
                ["optimizer", "peak MiB", "ratio"],
                [["AdamW", plain, 1.0], ["AdamW + gradient release", released, released / plain]])
    sizes = optimizer_state_bytes(args, device)
    base = sizes["AdamW fp32 states (torch)"]
    print_table("Optimizer state bytes", ["optimizer", "MiB", "ratio vs fp32 AdamW"],
                [[name, size / 2**20, size / base] for name, size in sizes.items()])
    print(verdict(sizes["AdamW8bit"] / base, 0.30))


if __name__ == "__main__":
    main()
