"""Writes the user-facing model files at save points and at the end of training, atomically, each folder with
the resolved config that produced it: <run_dir>/exports/step<N>/, epoch<N>/ and final/."""
from pathlib import Path
from typing import Optional

from lightning import Callback, LightningModule, Trainer

from src.utils.atomic import atomic_directory


class ExportCallback(Callback):
    def __init__(self, run_dir: str, resolved_config: str, every_n_steps: Optional[int] = None,
                 every_n_epochs: Optional[int] = None, save_dtype: Optional[str] = None):
        self.exports_dir = Path(run_dir) / "exports"
        self.resolved_config = resolved_config
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.save_dtype = save_dtype
        self._last_step_exported = -1

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, *args) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step_exported:
            self._last_step_exported = step
            self.export(trainer, module, f"step{step}")

    def on_train_epoch_end(self, trainer: Trainer, module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        finished = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch  # not cut short by max_steps
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and finished:
            self.export(trainer, module, f"epoch{epoch}")

    def on_train_end(self, trainer: Trainer, module: LightningModule) -> None:
        self.export(trainer, module, "final")

    def export(self, trainer: Trainer, module: LightningModule, name: str) -> Path:
        target = self.exports_dir / name
        if trainer.is_global_zero:
            with atomic_directory(target) as tmp:
                module.export(tmp, self.save_dtype)
                (tmp / "config.yaml").write_text(self.resolved_config)
        trainer.strategy.barrier("export")
        return target
