"""Framework overhead of one optimizer step: our Lightning Trainer running DiffusionModule.training_step vs a bare
PyTorch loop calling the same module's forward_loss, on the same small Flux, LoRA, AdamW and cached batch.

Both sides share one module (same weights, same LoRA), so only the loop around forward_loss differs. They run
in one fit, a bare step right after each Trainer step, so each pair sees the same load on a shared machine.
See benchmarks/README.md."""
import argparse
import tempfile
import time
from pathlib import Path
from typing import Optional

from _common import (FLUX_LATENT_CHANNELS, add_threads_option, bench_trainer, compose_config, default_device,
                     instantiate_module, limit_cpu_threads, median, print_table, quiet, small_flux, synchronize,
                     verdict)

import torch
from diffusers import FluxTransformer2DModel
from lightning import Callback
from torch.utils.data import DataLoader, Dataset

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
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    add_threads_option(p)
    return p.parse_args()


# --- the model and its batch
def write_diffusers_folder(transformer: FluxTransformer2DModel, root: Path) -> Path:
    """Only the transformer subfolder: training from a cached batch never loads the VAE or text encoders."""
    transformer.save_pretrained(root / "transformer", safe_serialization=True)
    return root


def cached_batch(args: argparse.Namespace, config) -> dict:
    """What the datamodule's collate yields from the cache, with random values."""
    g = torch.Generator().manual_seed(0)
    b, side = args.batch_size, args.latent_size
    return {"latents": torch.randn(b, FLUX_LATENT_CHANNELS, side, side, generator=g),
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


# --- the bare step: training_step's math in a plain loop
def bare_step(module, batch: dict, optimizer, scheduler, clip: float, device: torch.device) -> None:
    """Timestep and noise sampling, forward_loss, backward, clipping, optimizer and scheduler step."""
    optimizer.zero_grad(set_to_none=True)  # first: the Trainer's step leaves its gradients on the shared params
    on_device = batch_to(batch, device)
    latents = on_device["latents"]
    t = module.timesteps.sample(latents.shape[0], module.image_seq_len(latents))
    loss = module.forward_loss(on_device, t, torch.randn_like(latents))
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), clip)
    optimizer.step()
    scheduler.step()


# --- the comparison: one fit, a bare step after each of the Trainer's steps
class InterleavedClock(Callback):
    """Runs one bare step after each Trainer step, so each (ours, bare) pair sees the same machine load.

    ours: wall time from the end of the previous bare step to the end of this Trainer step, i.e. one full
    Lightning loop iteration (fetch, transfer, training_step with its logging, backward, clipping, grad-norm
    hook, optimizer and scheduler step, other hooks). bare: wall time of bare_step."""

    def __init__(self, batch: dict, clip: float, device: torch.device):
        self.batch, self.clip, self.device = batch, clip, device
        self.ours: list[float] = []
        self.bare: list[float] = []
        self._resumed: Optional[float] = None

    def on_train_start(self, trainer, pl_module) -> None:
        config = pl_module.configure_optimizers()  # a second AdamW + scheduler, exactly as the Trainer's
        self.optimizer, self.scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(self.device)
        ended = time.perf_counter()
        if self._resumed is not None:
            self.ours.append(ended - self._resumed)
        bare_step(pl_module, self.batch, self.optimizer, self.scheduler, self.clip, self.device)
        synchronize(self.device)
        self._resumed = time.perf_counter()
        self.bare.append(self._resumed - ended)

    def pairs(self, warmup: int) -> list[tuple[float, float]]:
        """(ours, bare) with bare run right after ours; the first Trainer step has no ours time."""
        return list(zip(self.ours, self.bare[1:]))[warmup:]


def time_pairs(cfg, module, batch: dict, steps: int, warmup: int, device: torch.device) -> list[tuple[float, float]]:
    total = warmup + steps + 1
    clock = InterleavedClock(batch, cfg.trainer.gradient_clip_val or 0.0, device)
    trainer = bench_trainer(cfg, max_steps=total, callbacks=[clock])
    trainer.fit(module, train_dataloaders=DataLoader(SameBatch(batch, total), batch_size=None))
    return clock.pairs(warmup)


def report(args, module, device: torch.device, pairs: list[tuple[float, float]]) -> None:
    ours, bare = [o for o, _ in pairs], [b for _, b in pairs]
    ratio = median(ours) / median(bare)
    print_table(_title(args, module, device), ["loop", "steps timed", "median s/step", "min s/step", "max s/step"],
                [["ours (Lightning Trainer)", len(ours), median(ours), min(ours), max(ours)],
                 ["bare PyTorch", len(bare), median(bare), min(bare), max(bare)]])
    print(f"\nratio ours/bare, of the medians: {ratio:.3f}  {verdict(ratio, TARGET_RATIO)}")
    print(f"ratio ours/bare, median of per-pair ratios: {median([o / b for o, b in pairs]):.3f}"
          "   (each pair ran back to back: robust to load drift)")
    print(f"ratio ours/bare, fastest steps: {min(ours) / min(bare):.3f}   (least disturbed by other processes)")


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
    limit_cpu_threads(args.threads, device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        work_dir = Path(tmp)
        transformer = small_flux(args.layers, args.single_layers, args.heads)  # ~10M params by default
        model_dir = write_diffusers_folder(transformer, work_dir / "small-flux")
        cfg = compose(args, work_dir, model_dir, dtype)
        module = instantiate_module(cfg)
        module.configure_model()
        batch = cached_batch(args, transformer.config)
        pairs = time_pairs(cfg, module, batch, args.steps, args.warmup, device)
    report(args, module, device, pairs)


if __name__ == "__main__":
    main()
