"""Readable run names. A sweep job (`python train.py -m optimizer.lr=1e-4,1e-3 adapter.rank=16,32`) is named after
the values its swept keys take, each key shortened to its last part (`lr=1e-4,rank=16`), so its folder
(hydra.sweep.subdir), TensorBoard run and W&B run say what differs; without sweep overrides, after the job number.
Light (Hydra's override parser only): the names resolve while the config is composed."""
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException


def swept_keys(command_line: Sequence[str]) -> set[str]:
    """Keys the command line sweeps (`a=1,2`, `a=range(...)`, `a=choice(...)`, `a=glob(...)`)."""
    arguments = [arg for arg in command_line if not arg.startswith("-") and "=" in arg]
    try:
        overrides = OverridesParser.create().parse_overrides(arguments)
    except HydraException:
        return set()
    return {o.key_or_group for o in overrides if o.is_sweep_override()}


def sweep_job_name(job_num: int, job_overrides: Sequence[str], command_line: Sequence[str] = ()) -> str:
    """`lr=1e-4,rank=16` from the job's overrides of the swept keys; the job number when nothing is swept."""
    swept = swept_keys(command_line or sys.argv[1:])
    parts = []
    for override in job_overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in swept:
            parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return re.sub(r"[/\\]", "_", ",".join(parts)) or str(job_num)


def path_name(path: str) -> str:
    """The last component of a path: a run folder's name (in a sweep, the job's readable name)."""
    return Path(path).name
