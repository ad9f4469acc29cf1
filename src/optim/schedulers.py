"""Learning-rate schedules: transformers' `get_scheduler` (the schedules diffusers' training scripts use, plus
cosine to a floor), stepped per optimizer step. Warmup rises linearly to the optimizer's lr over warmup_steps."""
from typing import Literal, Optional

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from difftrain.config.errors import ConfigError

Schedule = Literal["constant", "linear", "cosine", "constant_with_warmup", "cosine_with_restarts", "polynomial",
                   "cosine_with_min_lr"]
# Our `constant` and `cosine` take warmup_steps and min_lr: the library's schedules that add them (equal to its
# plain constant and cosine when both are 0).
LIBRARY_NAMES = {"constant": "constant_with_warmup", "cosine": "cosine_with_min_lr"}
# The keys only some schedules read, and those schedules.
SCHEDULE_KEYS = {"min_lr": ("cosine", "cosine_with_min_lr"), "num_cycles": ("cosine_with_restarts",),
                 "power": ("polynomial",), "lr_end": ("polynomial",)}


def build_scheduler(optimizer: Optimizer, total_steps: int, name: Schedule = "constant", warmup_steps: int = 0,
                    min_lr: Optional[float] = None, num_cycles: Optional[int] = None, power: Optional[float] = None,
                    lr_end: Optional[float] = None) -> LambdaLR:
    """min_lr: the cosine's floor; num_cycles: hard restarts of cosine_with_restarts; power and lr_end: the
    polynomial's exponent and final lr. A key left null takes the library's default."""
    from transformers import get_scheduler  # here: config validation reads this module's signature, and
                                            # importing transformers takes seconds
    given = {"min_lr": min_lr, "num_cycles": num_cycles, "power": power, "lr_end": lr_end}
    specific = {key: value for key, value in given.items() if value is not None}
    for key in specific:
        if name not in SCHEDULE_KEYS[key]:
            raise ConfigError(f"scheduler.{key} does not apply to scheduler.name={name} (only to "
                              f"{' and '.join(SCHEDULE_KEYS[key])}): remove it.")
    if name in SCHEDULE_KEYS["min_lr"]:
        specific.setdefault("min_lr", 0.0)
    return get_scheduler(LIBRARY_NAMES.get(name, name), optimizer, num_warmup_steps=warmup_steps,
                         num_training_steps=total_steps, scheduler_specific_kwargs=specific)
