"""Gradient release: every parameter is stepped by its own optimizer the moment its gradient is complete, and
that gradient is freed at once, so the gradients of the whole model never exist together (a full fine-tune
then needs about one model's worth less memory).

To Lightning this is an ordinary optimizer whose step() only runs the closure (forward + backward, during which
the real steps happen); its param groups hold the learning rates, so lr schedulers work unchanged."""
from typing import Callable, Iterable

import torch
from torch.optim import Optimizer


class GradientReleaseOptimizer(Optimizer):
    def __init__(self, param_groups: Iterable[dict], make_optimizer: Callable[[list[dict]], Optimizer],
                 accumulation_steps: int = 1):
        """make_optimizer builds the per-parameter optimizer from one param group. With gradient accumulation
        every micro-batch steps, with betas raised to the power 1/accumulation_steps (as the reference does) so
        the moments decay per optimizer step as configured."""
        groups = [dict(g) for g in param_groups]
        self.per_param: dict[torch.nn.Parameter, Optimizer] = {}
        self._group_of: dict[torch.nn.Parameter, dict] = {}
        for group in groups:
            hyper = {k: v for k, v in group.items() if k != "params"}
            for param in group["params"]:
                inner = make_optimizer([{"params": [param], **hyper}])
                _spread_betas(inner, accumulation_steps)
                self.per_param[param] = inner
        first = next(iter(self.per_param.values())).param_groups[0]
        super().__init__(groups, defaults={k: v for k, v in first.items() if k != "params"})
        for group in self.param_groups:
            for param in group["params"]:
                self._group_of[param] = group
                param.register_post_accumulate_grad_hook(self._step_parameter)

    @torch.no_grad()
    def _step_parameter(self, param: torch.nn.Parameter) -> None:
        inner = self.per_param[param]
        inner.param_groups[0]["lr"] = self._group_of[param]["lr"]
        inner.step()
        param.grad = None

    def step(self, closure=None):
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: each gradient is freed as soon as it has been used."""

    def state_dict(self) -> dict:
        return {"per_param": [inner.state_dict() for inner in self.per_param.values()],
                "param_groups": super().state_dict()["param_groups"]}

    def load_state_dict(self, state_dict: dict) -> None:
        for inner, inner_state in zip(self.per_param.values(), state_dict["per_param"]):
            inner.load_state_dict(inner_state)
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})


def _spread_betas(optimizer: Optimizer, accumulation_steps: int) -> None:
    for group in optimizer.param_groups:
        if "betas" in group and accumulation_steps > 1:
            group["betas"] = tuple(beta ** (1 / accumulation_steps) for beta in group["betas"])
