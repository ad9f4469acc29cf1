"""The shared training step. A family subclass supplies loading, encoders, its denoiser call and its export
format (the family contract, see DESIGN.md); timestep sampling, loss, LoRA/fp8/full-fine-tune setup,
optimizer groups, logging, eval loss and checkpoint trimming live here once."""
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from diffusers.hooks import apply_layerwise_casting
from hydra.utils import instantiate
from lightning import LightningModule
from lightning.pytorch.utilities import grad_norm
from omegaconf import DictConfig
from peft import LoraConfig, get_peft_model_state_dict

from .timesteps import TimestepSampler

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float8": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
EVAL_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class CacheEncoders(Protocol):
    """What the datamodule needs from a family to fill the cache; dropped once caching is done."""

    def to(self, device: torch.device) -> "CacheEncoders": ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> the latents the denoiser trains on (already scaled)."""

    def encode_captions(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """One dict of text-conditioning tensors per caption."""


class DiffusionModule(LightningModule, ABC):
    # --- family contract: class attributes
    cache_name: str = ""                                # separates caches of different families / variants
    lora_target_blocks: tuple[str, ...] = ()            # class names of blocks whose Linear layers get LoRA
    keep_in_high_precision: tuple[str, ...] = ()        # regexes of module names never stored in fp8
    pixels_round_to_multiple: int = 16

    def __init__(self, tiny: bool = False, dtype: str = "bfloat16", transformer_dtype: Optional[str] = None,
                 timestep_sample_method: str = "logit_normal", sigmoid_scale: float = 1.0,
                 shift: Optional[float] = None, flux_shift: bool = False, min_t: float = 0.0, max_t: float = 1.0,
                 activation_checkpointing: bool = False, adapter: Optional[DictConfig] = None,
                 optimizer: Optional[DictConfig] = None, scheduler: Optional[DictConfig] = None,
                 eval_names: tuple[str, ...] = (), seed: int = 0):
        super().__init__()
        self.tiny = tiny
        self.compute_dtype = DTYPES[dtype]
        self.storage_dtype = DTYPES[transformer_dtype] if transformer_dtype else None
        self.timesteps = TimestepSampler(timestep_sample_method, sigmoid_scale, shift, flux_shift, min_t, max_t)
        self.activation_checkpointing = activation_checkpointing
        self.adapter_cfg = adapter
        self.optimizer_cfg = optimizer
        self.scheduler_cfg = scheduler
        self.eval_names = tuple(eval_names)
        self.seed = seed
        self.denoiser: Optional[torch.nn.Module] = None
        self.strict_loading = False  # checkpoints hold trainable weights only; the base comes from disk

    # --- family contract: methods
    @abstractmethod
    def cache_fingerprints(self) -> tuple[str, str]:
        """(latent encoder, text encoders) fingerprints, computed without loading them."""

    @abstractmethod
    def load_cache_encoders(self) -> CacheEncoders: ...

    @abstractmethod
    def load_denoiser(self) -> torch.nn.Module:
        """The denoiser in the compute dtype."""

    @abstractmethod
    def predict(self, noisy_latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the denoiser; returns a prediction shaped like the latents."""

    @abstractmethod
    def export_lora(self, lora_state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """Write the LoRA (diffusers module names, lora_A/lora_B, scale baked in) in the family's format."""

    @abstractmethod
    def export_full(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """Write a full fine-tune of the denoiser in the family's consumer format(s)."""

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Tokens the denoiser sees for these latents (drives flux_shift)."""
        return latents.shape[-2] * latents.shape[-1] // 4

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - latents

    # --- model setup
    @property
    def is_lora(self) -> bool:
        return self.adapter_cfg is not None and self.adapter_cfg.type == "lora"

    def configure_model(self) -> None:
        if self.denoiser is not None:
            return
        denoiser = self.load_denoiser()
        denoiser.train()
        denoiser.requires_grad_(not self.is_lora)
        if self.is_lora:
            self._add_lora(denoiser)
        if self.storage_dtype is not None:
            # The hook directly, not model.enable_layerwise_casting: that also skips every module whose name
            # contains "norm" (all of Flux's modulation linears), where the family's own list should decide.
            apply_layerwise_casting(denoiser, storage_dtype=self.storage_dtype, compute_dtype=self.compute_dtype,
                                    skip_modules_pattern=(*self.keep_in_high_precision, "lora_"))
        if self.activation_checkpointing:
            denoiser.enable_gradient_checkpointing()
        self.denoiser = denoiser

    def lora_target_modules(self, denoiser: torch.nn.Module) -> list[str]:
        targets = []
        for block_name, block in denoiser.named_modules():
            if type(block).__name__ in self.lora_target_blocks:
                targets += [f"{block_name}.{name}" for name, m in block.named_modules()
                            if isinstance(m, torch.nn.Linear)]
        return targets

    def _add_lora(self, denoiser: torch.nn.Module) -> None:
        cfg = self.adapter_cfg
        config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, lora_dropout=cfg.dropout,
                            target_modules=self.lora_target_modules(denoiser), init_lora_weights=True)
        with torch.random.fork_rng():  # LoRA init must not depend on what consumed the global RNG before
            torch.manual_seed(self.seed)
            denoiser.add_adapter(config)
        for name, param in denoiser.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(DTYPES[cfg.dtype])

    # --- training
    def forward_loss(self, batch: dict[str, Any], t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        latents = batch["latents"].to(self.compute_dtype)
        t = t.to(latents.device)
        expand = t.view(-1, *([1] * (latents.ndim - 1))).to(self.compute_dtype)
        noisy = (1 - expand) * latents + expand * noise.to(self.compute_dtype)
        text = {k: v.to(self.compute_dtype) if v.is_floating_point() else v for k, v in batch["text"].items()}
        prediction = self.predict(noisy, t.to(self.compute_dtype), text)
        target = self.training_target(latents, noise.to(self.compute_dtype))
        return F.mse_loss(prediction.float(), target.float())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        latents = batch["latents"]
        generator = self.step_generator(batch_idx)
        t = self.timesteps.sample(latents.shape[0], self.image_seq_len(latents), generator)
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        loss = self.forward_loss(batch, t, noise)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Non-finite training loss {loss.item()} at step {self.global_step}.")
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("train/epoch_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """Noise and timesteps depend only on (seed, step, micro-batch, rank): a resumed run draws what an
        uninterrupted one would, with no RNG state to restore."""
        return torch.Generator().manual_seed(hash((self.seed, self.global_step, batch_idx, self.global_rank)) % 2**63)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Eval loss at fixed timestep quantiles with noise from a fixed generator: comparable across runs."""
        latents = batch["latents"]
        generator = torch.Generator().manual_seed(batch_idx)
        name = self.eval_names[dataloader_idx] if self.eval_names else "eval"
        losses = []
        for q in EVAL_QUANTILES:
            noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
            t = self.timesteps.at_quantiles(torch.full((latents.shape[0],), q), self.image_seq_len(latents))
            loss = self.forward_loss(batch, t, noise)
            self.log(f"{name}/loss_quantile_{q:.2f}", loss, add_dataloader_idx=False, sync_dist=True)
            losses.append(loss)
        self.log(f"{name}/loss", torch.stack(losses).mean(), add_dataloader_idx=False, sync_dist=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = grad_norm(self.denoiser, norm_type=2)
        if norms:
            self.log("train/grad_norm", norms["grad_2.0_norm_total"])

    def configure_optimizers(self):
        decay, no_decay = [], []
        for param in self.trainable_parameters():
            (no_decay if param.ndim <= 1 else decay).append(param)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = instantiate(self.optimizer_cfg)([g for g in groups if g["params"]])
        scheduler = instantiate(self.scheduler_cfg)(optimizer, total_steps=self.total_optimizer_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def total_optimizer_steps(self) -> int:
        # Not trainer.estimated_stepping_batches: calling it here sets up the train loader before a resumed
        # checkpoint is restored, and Lightning then never restores the data position.
        trainer = self.trainer
        if trainer.max_steps > 0:
            return trainer.max_steps
        batches = len(trainer.datamodule.train_dataloader())
        return trainer.max_epochs * math.ceil(batches / trainer.accumulate_grad_batches)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # --- checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def export(self, out_dir: Path, save_dtype: Optional[str] = None) -> None:
        dtype = DTYPES[save_dtype] if save_dtype else None
        if self.is_lora:
            self.export_lora(self.lora_state_dict(dtype), out_dir)
        else:
            state = self.denoiser.state_dict()
            self.export_full({k: v.to(dtype) if dtype else v for k, v in state.items()}, out_dir)

    def lora_state_dict(self, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """PEFT LoRA weights under diffusers module names, with alpha/rank folded into lora_B so every consumer
        (diffusers, ComfyUI, kohya loaders) applies the trained scale without reading any metadata."""
        state = get_peft_model_state_dict(self.denoiser, adapter_name="default")
        scale = (self.adapter_cfg.alpha or self.adapter_cfg.rank) / self.adapter_cfg.rank
        out = {}
        for key, tensor in state.items():
            tensor = tensor.detach() * scale if ".lora_B." in key else tensor.detach()
            out[key] = tensor.to(dtype or tensor.dtype).contiguous()
        return out

