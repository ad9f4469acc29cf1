"""Learning-rate schedules: constant, linear (to 0) or cosine (to min_lr), each after a linear warmup."""
import math
from typing import Literal, get_args

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

Schedule = Literal["constant", "linear", "cosine"]
SCHEDULES = get_args(Schedule)


def build_scheduler(optimizer: Optimizer, total_steps: int, name: Schedule = "constant", warmup_steps: int = 0,
                    min_lr: float = 0.0) -> LambdaLR:
    if name not in SCHEDULES:
        raise ValueError(f"scheduler.name={name} is not one of {', '.join(SCHEDULES)}")
    base_lrs = [group["lr"] for group in optimizer.param_groups]

    def factor(step: int, base_lr: float) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if name == "linear":
            return 1.0 - progress
        if name == "cosine":
            floor = min(min_lr / base_lr, 1.0) if base_lr > 0 else 0.0
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return LambdaLR(optimizer, [lambda step, lr=lr: factor(step, lr) for lr in base_lrs])
