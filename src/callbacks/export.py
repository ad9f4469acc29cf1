"""Writes the user-facing model files at save points and at the end of training, atomically.

Folders (`export_layout` folders or both): <run_dir>/exports/step<N>/, epoch<N>/ and final/, each with the resolved
config that produced it. Flat files (flat or both): the LoRA file alone, named for ComfyUI's loras/ folder,
<exports>/<name>_step00050.safetensors, <name>_epoch0003.safetensors and <name>.safetensors (the final one). A full
fine-tune always keeps its folder (several files). With EMA on (`ema_decay`), each folder also holds ema/, the
averaged weights in the same format, and each flat file has an `_ema` twin (<name>_step00050_ema.safetensors).
`keep_last_n_exports` prunes the older save points (folders and flat files alike), never the final export."""
import re
import shutil
from pathlib import Path
from typing import Literal, Optional

from lightning import Callback, LightningModule, Trainer

from difftrain.callbacks.ema import EMACallback
from difftrain.utils.atomic import atomic_directory, copy_file

ExportLayout = Literal["folders", "flat", "both"]
SAVE_POINT_FOLDER = re.compile(r"(?:step|epoch)\d+")
EMA = "ema"  # the averaged weights' folder inside an export, and their flat file's suffix


def export_name(name: str) -> str:
    """A file-name-safe export name: `lr=1e-4,rank=16` -> `lr-1e-4_rank-16`."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name.replace("=", "-")).strip("._") or "lora"


class ExportCallback(Callback):
    def __init__(self, run_dir: str, resolved_config: str, every_n_steps: Optional[int] = None,
                 every_n_epochs: Optional[int] = None, save_dtype: Optional[str] = None, name: Optional[str] = None,
                 layout: ExportLayout = "both", keep_last_n: Optional[int] = None, ema: Optional[EMACallback] = None):
        self.exports_dir = Path(run_dir) / "exports"
        self.resolved_config = resolved_config
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.save_dtype = save_dtype
        self.name = export_name(name or Path(run_dir).name)
        self.layout = layout
        self.keep_last_n = keep_last_n
        self.ema = ema
        self._last_step_exported = -1
        self.final: Optional[Path] = None  # the final export, once written

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, *args) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step_exported:
            self._last_step_exported = step
            self.export(trainer, module, f"step{step}", f"_step{step:05d}")

    def on_train_epoch_end(self, trainer: Trainer, module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        finished = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch  # not cut short by max_steps
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and finished:
            self.export(trainer, module, f"epoch{epoch}", f"_epoch{epoch:04d}")

    def on_train_end(self, trainer: Trainer, module: LightningModule) -> None:
        self.export_final(trainer, module)

    def on_fit_end(self, trainer: Trainer, module: LightningModule) -> None:
        if self.final is None:  # nothing was left to train (a finished run resumed, max_steps=0): no on_train_end
            self.export_final(trainer, module)

    def export_final(self, trainer: Trainer, module: LightningModule) -> None:
        folder = self.export(trainer, module, "final", "")
        self.final = self.flat_file() if module.is_lora and self.layout == "flat" else folder

    def export(self, trainer: Trainer, module: LightningModule, folder: str, suffix: str) -> Path:
        """The export folder (absent when only the flat file is kept); `suffix`: the flat file's, '' when final."""
        target = self.exports_dir / folder
        flat = module.is_lora and self.layout != "folders"
        weights = module.export_weights(self.save_dtype)  # on every rank: FSDP gathers the shards
        averaged = self.ema.export_weights(module, self.save_dtype) if self.ema else None
        if trainer.is_global_zero:
            with atomic_directory(target) as tmp:
                module.write_export(weights, tmp)
                (tmp / "config.yaml").write_text(self.resolved_config)
                if averaged is not None:
                    (tmp / EMA).mkdir()
                    module.write_export(averaged, tmp / EMA)
                if flat:
                    copy_file(lora_file(tmp), self.flat_file(suffix))
                    if averaged is not None:
                        copy_file(lora_file(tmp / EMA), self.flat_file(f"{suffix}_{EMA}"))
            if flat and self.layout == "flat":
                shutil.rmtree(target)
            if suffix:
                self.prune()
        trainer.strategy.barrier("export")
        return target

    def flat_file(self, suffix: str = "") -> Path:
        return self.exports_dir / f"{self.name}{suffix}.safetensors"

    def prune(self) -> None:
        """Keeps the newest `keep_last_n` save-point folders and as many flat files; the final export stays."""
        if self.keep_last_n is None:
            return
        entries = list(self.exports_dir.iterdir())
        folders = [p for p in entries if p.is_dir() and SAVE_POINT_FOLDER.fullmatch(p.name)]
        for old in _older_than_newest(folders, self.keep_last_n):
            shutil.rmtree(old)
        for ema in ("", f"_{EMA}"):  # the raw files and their EMA twins, each their newest keep_last_n
            flat = re.compile(rf"{re.escape(self.name)}_(?:step|epoch)\d+{ema}\.safetensors")
            for old in _older_than_newest([p for p in entries if flat.fullmatch(p.name)], self.keep_last_n):
                old.unlink()


def _older_than_newest(paths: list[Path], keep: int) -> list[Path]:
    by_age = sorted(paths, key=lambda p: p.stat().st_mtime_ns)
    return by_age[:max(len(by_age) - keep, 0)]


def lora_file(folder: Path) -> Path:
    """The one LoRA weights file a family's export_lora wrote into `folder`."""
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(f"Expected one LoRA .safetensors file in the export {folder}, found {files}.")
    return files[0]
