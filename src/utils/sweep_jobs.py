"""A Hydra multirun job that trains on several processes, started once.

Lightning's subprocess launcher (DDP on one machine) starts the other ranks with this process's command line plus
`hydra.run.dir=<hydra.run.dir>`. In a sweep job that command line is the whole sweep (`-m` and every swept value)
and hydra.run.dir is not the job's folder, so each rank would launch the sweep again. Within `single_run_command()`
the job looks like what it is: a single run of its own overrides in its own folder; after it, the process is as
before it (the launcher's LOCAL_RANK & co. would tell the next job's launcher that its ranks were started already).
A sweeper that minimises what train.py returns (Optuna) gets the eval loss, so it needs eval_datasets
(`require_objective`)."""
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, read_write

from difftrain.config.errors import ConfigError


def require_objective(cfg: DictConfig) -> None:
    if not HydraConfig.initialized() or cfg.eval_datasets:
        return
    if "optuna" in HydraConfig.get().sweeper.get("_target_", "").lower():
        raise ConfigError("the Optuna sweeper (hparams_search=lora_optuna) minimises the eval loss: set "
                          "eval_datasets='[{name: heldout, path: /data/eval}]' (and evaluate at the last step).")


@contextmanager
def single_run_command() -> Iterator[None]:
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    hydra_cfg = HydraConfig.get()
    sweep_command, environment = sys.argv, dict(os.environ)
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = sweep_command  # the next job's name is read from the sweep's command line
        os.environ.clear()
        os.environ.update(environment)
        import torch.distributed  # here, not at the top: train.py reports config errors before importing torch

        if torch.distributed.is_initialized():  # the next job starts its own process group
            torch.distributed.destroy_process_group()
