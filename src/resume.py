"""What a run continues from, and that it may.

`resume`: null starts fresh; a `.ckpt` file or a run directory (its checkpoints/last.ckpt) continues that run;
`auto` continues the newest run under outputs_root, the current run directory included, whose settings equal
this run's (so each sweep job resumes only its own). Every checkpoint records its run's settings; a resumed run
keeps them: a changed setting (other than the CONTINUATION_KEYS) stops the run with a one-line ConfigError, before
any model loads, as does a missing, unreadable or malicious checkpoint.

ResumableRun makes SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) leave a resumable checkpoint."""
import logging
import signal
import zipfile
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Optional

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from difftrain.config.errors import ConfigError
from difftrain.utils.atomic import remove_stale_temps, write_text

log = logging.getLogger(__name__)

SETTINGS_KEY = "difftrain_settings"  # the run's resolved config, in every checkpoint
# Dotted config keys (and their sub-keys) a continued run may change: where and what it writes, logs, evaluates and
# previews, how long it trains, and switches that trade memory for time without changing the result.
CONTINUATION_KEYS = ("run_dir", "outputs_root", "resume", "dry_run", "save_*", "export_*", "keep_last_n_*",
                     "checkpoint_every_n_*", "callbacks", "logger", "eval_*", "sample_*", "trainer.max_steps",
                     "trainer.max_epochs", "trainer.accelerator", "trainer.devices", "trainer.num_nodes",
                     "trainer.strategy", "trainer.log_every_n_steps", "trainer.enable_*", "dataset.cache_dir",
                     "dataset.num_workers", "dataset.cache_workers", "model.activation_checkpointing",
                     "model.blocks_to_swap")
# Keys that decide which weights exist and their shapes: a checkpoint of another value does not fit the model.
SHAPE_KEYS = ("model._target_", "model.tiny", "model.variant", "model.*path", "adapter.type", "adapter.rank",
              "adapter.target*")


def run_settings(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def resume_checkpoint(cfg: DictConfig) -> Optional[str]:
    """The checkpoint this run continues from (None: start fresh), checked against this run's settings."""
    if cfg.resume is None:
        return None
    settings = run_settings(cfg)
    if cfg.resume == "auto":
        path = _newest_run_with(settings, Path(cfg.outputs_root), Path(cfg.run_dir))
        return str(path) if path else None
    path = Path(cfg.resume)
    if path.is_dir() and path.suffix != ".ckpt":  # a run directory; a sharded checkpoint (trainer=fsdp) is a folder
        path = path / "checkpoints" / "last.ckpt"
    if not path.exists():
        raise ConfigError(f"resume={cfg.resume}: no checkpoint at {path}. Pass a .ckpt file, a run directory "
                          f"containing checkpoints/last.ckpt, or resume=auto.")
    checkpoint = read_checkpoint(path, f"resume={cfg.resume}")
    stored = checkpoint.get(SETTINGS_KEY)
    if stored is None:
        log.warning("resume=%s: the checkpoint does not record its run's settings (an older difftrain wrote it); "
                    "they are not compared with this run's.", cfg.resume)
    elif changes := changed_settings(stored, settings):
        raise ConfigError(_refusal(f"resume={cfg.resume}", changes, stored, settings))
    log.info("Resuming from %s (step %d).", path, checkpoint["global_step"])
    return str(path)


def read_checkpoint(path: Path, context: str) -> dict[str, Any]:
    """The checkpoint's contents as data: tensors (memory-mapped, not read), numbers, strings; never pickled code."""
    if path.is_dir():  # a sharded checkpoint: everything but the weights and optimizer state is in meta.pt
        path = path / "meta.pt"
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError("not the zip archive torch.save writes")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{context}: {path} is not a checkpoint this trainer can read ({reason}). Pass a "
                          f"checkpoints/last.ckpt a difftrain run wrote, or resume=null to start fresh.") from None


def changed_settings(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The dotted keys whose value a continued run may not change, shape-changing keys first."""
    old, new = _flat(stored), _flat(current)
    changed = sorted(key for key in old.keys() | new.keys()
                     if not _matches(key, CONTINUATION_KEYS) and old.get(key, _UNSET) != new.get(key, _UNSET))
    return sorted(changed, key=lambda key: not _matches(key, SHAPE_KEYS))


def _newest_run_with(settings: dict[str, Any], outputs_root: Path, run_dir: Path) -> Optional[Path]:
    """This run directory's own checkpoint first, then the newest first."""
    candidates = sorted(outputs_root.rglob("checkpoints/last.ckpt"),
                        key=lambda p: (p.parent.parent.resolve() == run_dir.resolve(), p.stat().st_mtime),
                        reverse=True)
    mismatches = []
    for path in candidates:
        try:
            checkpoint = read_checkpoint(path, "resume=auto")
        except ConfigError as error:
            log.warning("%s", error)
            continue
        stored = checkpoint.get(SETTINGS_KEY)
        changes = changed_settings(stored, settings) if stored is not None else []
        if stored is not None and not changes:
            log.info("resume=auto: continuing the run in %s from step %d.", path.parent.parent,
                     checkpoint["global_step"])
            return path
        mismatches.append(f"{path.parent.parent}, " + (f"differs in {changes[0]}" if changes else
                                                         "records no settings (an older difftrain)"))
    if not mismatches:
        log.info("resume=auto: no checkpoint under %s; starting fresh.", outputs_root)
    else:
        log.info("resume=auto: none of the %d run(s) with a checkpoint under %s has this run's settings (the newest: "
                 "%s); starting fresh.", len(mismatches), outputs_root, mismatches[0])
    return None


def _refusal(context: str, changes: list[str], stored: dict[str, Any], current: dict[str, Any]) -> str:
    old, new = _flat(stored), _flat(current)
    key = changes[0]
    why = ("which gives its weights other shapes" if _matches(key, SHAPE_KEYS)
           else "and a resumed run keeps its run's training settings")
    more = f" ({len(changes) - 1} more differ: {', '.join(changes[1:4])})" if len(changes) > 1 else ""
    return (f"{context}: {key}={_show(new.get(key, _UNSET))} but the checkpoint's run has "
            f"{key}={_show(old.get(key, _UNSET))}, {why}{more}. Resume with {key}={_show(old.get(key, _UNSET))}, "
            f"or start a new run (resume=null).")


_UNSET = object()


def _show(value: Any) -> str:
    return "<unset>" if value is _UNSET else str(value)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        return {key: value for name, child in node.items() for key, value in _flat(child, f"{prefix}{name}.").items()}
    return {prefix[:-1]: node}


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch(key, pattern) or fnmatch(key, f"{pattern}.*") for pattern in patterns)


def prepare_run_dir(run_dir: Path, resolved_config: str) -> None:
    """Removes what a killed run left half-written, and records this run's config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(run_dir)
    write_text(run_dir / "config.yaml", resolved_config)


class ResumableRun(Callback):
    """Records the run's settings in every checkpoint. On SIGTERM or SIGINT (Ctrl-C), training stops after the
    current batch (Lightning's SIGTERM handling; Ctrl-C takes the same path) and `last_checkpoint` is written;
    `exit_status` is then 128 + the signal's number (non-zero, so a scheduler requeues the job rather than records
    success). A second Ctrl-C interrupts at once."""

    def __init__(self, cfg: DictConfig, last_checkpoint: Path):
        self.settings = run_settings(cfg)
        self.last_checkpoint = last_checkpoint
        self.signal = signal.SIGTERM

    def on_save_checkpoint(self, trainer: Trainer, module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[SETTINGS_KEY] = self.settings

    def on_train_start(self, trainer: Trainer, module: LightningModule) -> None:
        lightning_handler = signal.getsignal(signal.SIGTERM)  # Lightning's, set when fit started

        def stop_after_this_batch(signum: int, frame: Any) -> None:
            self.signal = signal.Signals(signum)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            lightning_handler(signum, frame)

        signal.signal(signal.SIGTERM, stop_after_this_batch)
        signal.signal(signal.SIGINT, stop_after_this_batch)

    def on_exception(self, trainer: Trainer, module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.last_checkpoint)
            log.warning("Stopped by %s after step %d: resume with resume=%s", self.signal.name, trainer.global_step,
                        self.last_checkpoint.parent.parent)

    @property
    def exit_status(self) -> int:
        return 128 + self.signal
