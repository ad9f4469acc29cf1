"""A Hydra multirun job that trains on several processes, started once.

Lightning's subprocess launcher (DDP on one machine) starts the other ranks with this process's command line plus
`hydra.run.dir=<hydra.run.dir>`. In a sweep job that command line is the whole sweep (`-m` and every swept value)
and hydra.run.dir is not the job's folder, so each rank would launch the sweep again. Within `single_run_command()`
the job looks like what it is: a single run of its own overrides in its own folder."""
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import read_write


@contextmanager
def single_run_command() -> Iterator[None]:
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    hydra_cfg = HydraConfig.get()
    sweep_command = sys.argv
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = sweep_command  # the next job's name is read from the sweep's command line
        if torch.distributed.is_initialized():  # the next job starts its own process group
            torch.distributed.destroy_process_group()
