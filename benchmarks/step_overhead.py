"""Framework overhead of one optimizer step: our Lightning Trainer running DiffusionModule.training_step vs a bare
PyTorch loop calling the same module's forward_loss, on the same small Flux, LoRA, AdamW and cached batch.

Both sides share one module (same weights, same LoRA), so only the loop around forward_loss differs. Rounds
alternate which side goes first, to spread the drift of a shared machine over both. See benchmarks/README.md."""
import argparse
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from _common import (compose_config, default_device, instantiate_module, median, print_table, quiet,
                     seconds_since, synchronize, verdict)

import torch
from diffusers import FluxTransformer2DModel
from hydra.utils import instantiate
from lightning import Callback
from torch.utils.data import DataLoader, Dataset

LATENT_CHANNELS = 16
TARGET_RATIO = 1.10


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent-size", type=int, default=64, help="latent side; tokens = (side/2)^2 (64 -> 1024)")
    p.add_argument("--text-tokens", type=int, default=32, help="length of the T5 embedding sequence")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--layers", type=int, default=2, help="double-stream blocks")
    p.add_argument("--single-layers", type=int, default=4, help="single-stream blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads of dim 64")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    p.add_argument("--dtype", default=None, help="model.dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of (ours, bare)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per side per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side per round")
    return p.parse_args()


# --- the model and its batch
def small_flux(args: argparse.Namespace) -> FluxTransformer2DModel:
    """A FLUX.1-dev-shaped transformer (guidance embedding, 64-dim heads, real RoPE split), a few M parameters."""
    torch.manual_seed(0)
    width = 64 * args.heads
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=args.layers, num_single_layers=args.single_layers,
        attention_head_dim=64, num_attention_heads=args.heads, joint_attention_dim=width,
        pooled_projection_dim=width, guidance_embeds=True, axes_dims_rope=(16, 24, 24))


def write_diffusers_folder(transformer: FluxTransformer2DModel, root: Path) -> Path:
    """Only the transformer subfolder: training from a cached batch never loads the VAE or text encoders."""
    transformer.save_pretrained(root / "transformer", safe_serialization=True)
    return root


def cached_batch(args: argparse.Namespace, config) -> dict:
    """What the datamodule's collate yields from the cache, with random values."""
    g = torch.Generator().manual_seed(0)
    b, side = args.batch_size, args.latent_size
    return {"latents": torch.randn(b, LATENT_CHANNELS, side, side, generator=g),
            "text": {"prompt_embeds": torch.randn(b, args.text_tokens, config.joint_attention_dim, generator=g),
                     "pooled_prompt_embeds": torch.randn(b, config.pooled_projection_dim, generator=g)}}


def batch_to(batch: dict, device: torch.device) -> dict:
    return {"latents": batch["latents"].to(device), "text": {k: v.to(device) for k, v in batch["text"].items()}}


class SameBatch(Dataset):
    def __init__(self, batch: dict, length: int):
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.batch


def compose(args: argparse.Namespace, work_dir: Path, model_dir: Path, dtype: str):
    adapter = ["adapter=none"] if args.full else ["adapter=lora", f"adapter.rank={args.rank}"]
    return compose_config(work_dir / "run", "model=flux", f"model.diffusers_path={model_dir}",
                          f"model.dtype={dtype}", *adapter)


# --- ours: the real Trainer
class StepClock(Callback):
    """Wall time between consecutive on_train_batch_end calls: one full loop iteration each (data, transfer,
    training_step, logging, backward, clipping, optimizer and scheduler step, hooks)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(self.device)
        self.ends.append(time.perf_counter())

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def bench_trainer(cfg, max_steps: int, callbacks=()):
    """Our trainer config (precision, clipping, logging cadence) without loggers, checkpoints, bars or eval."""
    return instantiate(cfg.trainer, max_steps=max_steps, callbacks=list(callbacks), logger=False,
                       enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                       limit_val_batches=0)


def time_ours(cfg, module, batch: dict, steps: int, warmup: int, device: torch.device) -> list[float]:
    total = warmup + steps + 1  # n ends give n - 1 intervals
    clock = StepClock(device)
    trainer = bench_trainer(cfg, total, [clock])
    trainer.fit(module, train_dataloaders=DataLoader(SameBatch(batch, total), batch_size=None))
    return clock.intervals()[warmup:]


# --- bare: the same math in a plain loop
@contextmanager
def attached_unfitted_trainer(module, cfg, total_steps: int):
    """configure_optimizers reads the trainer's step budget; lend it a trainer that never fits."""
    module.trainer = bench_trainer(cfg, total_steps)
    try:
        yield
    finally:
        module.trainer = None


def bare_optimizer(module, cfg, total_steps: int):
    """The AdamW and scheduler our configure_optimizers builds, for the bare loop to step itself."""
    with attached_unfitted_trainer(module, cfg, total_steps):
        config = module.configure_optimizers()
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def bare_step(module, batch: dict, optimizer, scheduler, clip: float, device: torch.device) -> None:
    """training_step's math (timestep and noise sampling, forward_loss) plus what Lightning does around it."""
    on_device = batch_to(batch, device)
    latents = on_device["latents"]
    t = module.timesteps.sample(latents.shape[0], module.image_seq_len(latents))
    loss = module.forward_loss(on_device, t, torch.randn_like(latents))
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def time_bare(module, batch: dict, optimizer, scheduler, clip: float, steps: int, warmup: int,
              device: torch.device) -> list[float]:
    module.to(device).train()
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        bare_step(module, batch, optimizer, scheduler, clip, device)
        synchronize(device)
        times.append(seconds_since(start))
    return times[warmup:]


# --- the comparison
def alternate_rounds(cfg, module, batch: dict, args, device: torch.device) -> dict[str, list[list[float]]]:
    """Per side, one list of step times per round."""
    optimizer, scheduler = bare_optimizer(module, cfg, args.rounds * (args.warmup + args.steps))
    clip = cfg.trainer.gradient_clip_val or 0.0
    sides = {"ours": partial(time_ours, cfg, module, batch, args.steps, args.warmup, device),
             "bare": partial(time_bare, module, batch, optimizer, scheduler, clip, args.steps, args.warmup, device)}
    rounds = {name: [] for name in sides}
    for r in range(args.rounds):
        for name in (("ours", "bare") if r % 2 == 0 else ("bare", "ours")):
            rounds[name].append(sides[name]())
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(
            f"{name} {median(per_round[-1]):.4f} s/step" for name, per_round in rounds.items()), flush=True)
    return rounds


def report(args, module, device: torch.device, rounds: dict[str, list[list[float]]]) -> None:
    ours, bare = (sum(rounds[name], []) for name in ("ours", "bare"))
    paired = median([median(o) / median(b) for o, b in zip(rounds["ours"], rounds["bare"])])
    ratio = median(ours) / median(bare)
    print_table(_title(args, module, device), ["loop", "steps timed", "median s/step", "min s/step", "max s/step"],
                [["ours (Lightning Trainer)", len(ours), median(ours), min(ours), max(ours)],
                 ["bare PyTorch", len(bare), median(bare), min(bare), max(bare)]])
    print(f"\nratio ours/bare, median over all steps: {ratio:.3f}  {verdict(ratio, TARGET_RATIO)}")
    print(f"ratio ours/bare, median of per-round ratios: {paired:.3f}   (robust to load drift between rounds)")
    print(f"ratio ours/bare, fastest step: {min(ours) / min(bare):.3f}   (least disturbed by other processes)")


def _title(args, module, device: torch.device) -> str:
    params = sum(p.numel() for p in module.denoiser.parameters())
    trainable = sum(p.numel() for p in module.trainable_parameters())
    setup = "full fine-tune" if args.full else f"LoRA rank {args.rank}"
    return (f"Step time, small Flux ({params:,} params, {trainable:,} trainable, {setup}), "
            f"{(args.latent_size // 2) ** 2} image + {args.text_tokens} text tokens, batch {args.batch_size}, "
            f"{module.compute_dtype}, {device}")


def main() -> None:
    args = parse_args()
    quiet()
    device = default_device()
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        work_dir = Path(tmp)
        transformer = small_flux(args)
        model_dir = write_diffusers_folder(transformer, work_dir / "small-flux")
        cfg = compose(args, work_dir, model_dir, dtype)
        module = instantiate_module(cfg)
        module.configure_model()
        batch = cached_batch(args, transformer.config)
        rounds = alternate_rounds(cfg, module, batch, args, device)
    report(args, module, device, rounds)


if __name__ == "__main__":
    main()
