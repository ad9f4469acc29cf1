"""Flow-matching timestep sampling shared by every family.

t = 0 is the clean latent, t = 1 pure noise. A base distribution (logit-normal or uniform) is shifted towards
noise (`shift`, or the resolution-dependent `flux_shift`) and restricted to [min_t, max_t]. The range is applied
to quantiles of the shifted distribution, so it holds exactly whatever the shift, and eval can ask for fixed
quantiles of the same distribution."""
import math
from dataclasses import dataclass
from typing import Optional

import torch


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def unshift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    return t / (shift - (shift - 1) * t)


def flux_shift_for(image_seq_len: int) -> float:
    """sd-scripts' resolution-dependent shift: mu linear in the token count, 256 -> 0.5, 4096 -> 1.15."""
    mu = 0.5 + (1.15 - 0.5) * (image_seq_len - 256) / (4096 - 256)
    return math.exp(mu)


@dataclass
class TimestepSampler:
    method: str = "logit_normal"
    sigmoid_scale: float = 1.0
    shift: Optional[float] = None
    flux_shift: bool = False
    min_t: float = 0.0
    max_t: float = 1.0

    def effective_shift(self, image_seq_len: int) -> float:
        if self.flux_shift:
            return flux_shift_for(image_seq_len)
        return self.shift or 1.0

    def sample(self, n: int, image_seq_len: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.at_quantiles(torch.rand(n, generator=generator, dtype=torch.float64), image_seq_len)

    def at_quantiles(self, u: torch.Tensor, image_seq_len: int) -> torch.Tensor:
        """The timesteps at quantiles u in [0, 1] of the shifted, range-restricted distribution (eval uses fixed u)."""
        lo, hi = self._quantile_range(image_seq_len)
        u = (lo + (hi - lo) * u.to(torch.float64)).clamp(1e-6, 1 - 1e-6)
        base = u if self.method == "uniform" else torch.sigmoid(self.sigmoid_scale * torch.special.ndtri(u))
        return shift_timesteps(base, self.effective_shift(image_seq_len)).float()

    def _quantile_range(self, image_seq_len: int) -> tuple[float, float]:
        shift = self.effective_shift(image_seq_len)
        bounds = unshift_timesteps(torch.tensor([self.min_t, self.max_t], dtype=torch.float64), shift)
        if self.method == "uniform":
            quantiles = bounds
        else:
            quantiles = torch.special.ndtr(torch.logit(bounds) / self.sigmoid_scale)
        return float(quantiles[0]), float(quantiles[1])
