"""Timestep sampling and learning-rate schedules, against values computed by hand."""
import math

import pytest
import torch

from difftrain.modules.timesteps import TimestepSampler, flux_shift_for
from difftrain.optim.schedulers import build_scheduler


@pytest.mark.parametrize("shift", [None, 3.0])
@pytest.mark.parametrize("method", ["logit_normal", "uniform"])
def test_timesteps_stay_in_range_with_and_without_shift(method, shift):
    sampler = TimestepSampler(method=method, shift=shift, min_t=0.875, max_t=1.0)
    t = sampler.sample(20000, image_seq_len=1024, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0.875 and t.max() <= 1.0
    assert t.max() - t.min() > 0.1  # the whole range is used, not one point


def test_flux_shift_moves_mass_towards_noise_and_respects_range():
    plain = TimestepSampler(min_t=0.0, max_t=0.875).sample(20000, 4096, torch.Generator().manual_seed(0))
    shifted = TimestepSampler(flux_shift=True, min_t=0.0, max_t=0.875).sample(20000, 4096,
                                                                              torch.Generator().manual_seed(0))
    assert shifted.max() <= 0.875 and shifted.mean() > plain.mean() + 0.05
    assert flux_shift_for(256) == pytest.approx(math.exp(0.5))
    assert flux_shift_for(4096) == pytest.approx(math.exp(1.15))


def test_shift_formula_and_median():
    """Median of logit-normal is 0.5; shift s maps it to s*0.5 / (1 + (s-1)*0.5)."""
    t = TimestepSampler(shift=3.0).at_quantiles(torch.tensor([0.5]), 1024)
    assert t.item() == pytest.approx(0.75)


def lrs(name, steps=10, warmup=2, **kw):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(optimizer, total_steps=steps, name=name, warmup_steps=warmup, **kw)
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_lr_schedules():
    assert lrs("constant") == pytest.approx([0.5, 1.0] + [1.0] * 8)
    assert lrs("linear") == pytest.approx([0.5, 1.0] + [1 - i / 8 for i in range(8)])
    cosine = lrs("cosine", min_lr=0.1)
    assert cosine[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert cosine[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    with pytest.raises(ValueError, match="constant, linear, cosine"):
        lrs("exponential")
