"""One training run from a composed config: validate, seed, instantiate, (eval,) fit, report."""
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from difftrain.config.validate import ConfigError, validate

log = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    final_export: Path
    module: Any
    datamodule: Any
    trainer: Any


def run(cfg: DictConfig) -> Optional[TrainingRun]:
    validate(cfg)
    if cfg.dry_run:  # the plan printed, nothing loaded or trained
        from difftrain.dry_run import dry_run

        print(dry_run(cfg))
        return None
    # bitsandbytes warns at import that its optional CPU 4-bit matmul kernels are missing; nothing here uses them.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import lightning as L  # heavy imports only after the config is known to be good
    from hydra.utils import instantiate
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from difftrain.callbacks.ema import EMACallback
    from difftrain.callbacks.export import ExportCallback
    from difftrain.callbacks.previews import PreviewCallback
    from difftrain.dashboards import finish_loggers, log_config
    from difftrain.resume import ResumableRun, prepare_run_dir, resume_checkpoint
    from difftrain.utils.checkpoint_io import AtomicCheckpointIO
    from difftrain.utils.cpu_memory import keep_freed_memory
    from difftrain.utils.logs import lightning_logs_to_root_handlers

    lightning_logs_to_root_handlers()
    ckpt_path = resume_checkpoint(cfg)  # before any model loads: a resume that cannot work fails in seconds
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir)
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    prepare_run_dir(run_dir, resolved)

    datamodule = instantiate(cfg.dataset, eval_datasets=cfg.eval_datasets, seed=cfg.seed, _convert_="all")
    module = build_module(cfg, datamodule.eval_names)
    module.refuse_unsupported_training()
    module.build_tiny_models()  # before the trainer starts other processes (DDP), never inside them
    ema = EMACallback(cfg.ema_decay, cfg.ema_every_n_steps) if cfg.ema_decay is not None else None
    exporter = ExportCallback(str(run_dir), resolved, cfg.save_every_n_steps, cfg.save_every_n_epochs, cfg.save_dtype,
                              cfg.export_name, cfg.export_layout, cfg.keep_last_n_exports, ema)
    resumable = ResumableRun(cfg, run_dir / "checkpoints" / "last.ckpt")
    callbacks = [exporter, *_checkpoints(cfg, run_dir / "checkpoints"), resumable, PreviewCallback.from_config(cfg),
                 *(instantiate(c) for c in cfg.callbacks.values())]
    if ema is not None:
        callbacks.insert(0, ema)  # before the exporter, so that a save point exports its step's average
    loggers = [instantiate(c) for c in (cfg.logger or {}).values()]
    log_config(loggers, cfg)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()],
                          **_eval_schedule(cfg))
    if isinstance(trainer.accelerator, CPUAccelerator):
        keep_freed_memory()

    if cfg.eval_datasets and cfg.eval_before_first_step and ckpt_path is None:
        trainer.validate(module, datamodule=datamodule)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # SIGTERM or Ctrl-C: checkpoint written
        raise SystemExit(resumable.exit_status) from None
    finally:
        finish_loggers(loggers)
    if datamodule.skipped:
        log.warning("%d file(s) were skipped (reasons logged above).", len(datamodule.skipped))
    if exporter.final is not None:
        log.info("Final export: %s", exporter.final)
    return TrainingRun(run_dir / "exports" / "final", module, datamodule, trainer)


def _checkpoints(cfg: DictConfig, folder: Path) -> list[Any]:
    """Lightning's ModelCheckpoint every checkpoint_every_n_steps and/or every checkpoint_every_n_minutes (neither:
    every epoch), each also writing last.ckpt and keeping its newest keep_last_n_checkpoints files."""
    from datetime import timedelta

    from lightning.pytorch.callbacks import ModelCheckpoint

    keep = -1 if cfg.keep_last_n_checkpoints is None else cfg.keep_last_n_checkpoints  # -1: Lightning's "all"
    common = {"dirpath": folder, "save_last": True, "save_top_k": keep, "monitor": "step", "mode": "max",
              "enable_version_counter": False}
    minutes = cfg.checkpoint_every_n_minutes
    checkpoints = []
    if cfg.checkpoint_every_n_steps or minutes is None:
        checkpoints.append(ModelCheckpoint(every_n_train_steps=cfg.checkpoint_every_n_steps, **common))
    if minutes is not None:  # its own file names: the two never prune each other's files
        checkpoints.append(ModelCheckpoint(train_time_interval=timedelta(minutes=minutes),
                                           filename="{epoch}-{step}-timed", **common))
    return checkpoints


def _eval_schedule(cfg: DictConfig) -> dict:
    if not cfg.eval_datasets:
        return {"limit_val_batches": 0}
    if cfg.eval_every_n_steps:
        return {"val_check_interval": cfg.eval_every_n_steps * cfg.trainer.accumulate_grad_batches,
                "check_val_every_n_epoch": None}
    return {"check_val_every_n_epoch": cfg.eval_every_n_epochs or 1}


def build_module(cfg: DictConfig, eval_names: tuple[str, ...] = ()) -> Any:
    """The family's LightningModule for a composed config (its models load in configure_model). Its constructor
    checks what depends on several of its keys and raises ConfigError, which Hydra wraps: unwrapped here, so that
    train.py shows it as one message."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(cfg.model, adapter=cfg.adapter, optimizer=cfg.optimizer, scheduler=cfg.scheduler,
                           eval_names=eval_names, seed=cfg.seed, _recursive_=False)
    except InstantiationException as error:
        if isinstance(error.__cause__, ConfigError):
            raise error.__cause__ from None
        raise
