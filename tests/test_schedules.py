"""Timestep sampling against values computed by hand; learning-rate schedule presets and Min-SNR loss weights against
the libraries' own."""
import math

import pytest
import torch
import transformers
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from hydra.utils import instantiate

from difftrain.config.validate import ConfigError, validate
from difftrain.modules.timesteps import TimestepSampler, flux_shift_for
from difftrain.training import build_module


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


STEPS, WARMUP = 12, 3
# Each preset (with its own keys set away from their defaults) and the library schedule it must follow.
PRESETS = {
    "constant": ((), lambda opt: transformers.get_constant_schedule_with_warmup(opt, WARMUP)),
    "constant_with_warmup": ((), lambda opt: transformers.get_constant_schedule_with_warmup(opt, WARMUP)),
    "linear": ((), lambda opt: transformers.get_linear_schedule_with_warmup(opt, WARMUP, STEPS)),
    "cosine": (("scheduler.min_lr=0.1",), lambda opt: transformers.get_cosine_with_min_lr_schedule_with_warmup(
        opt, WARMUP, STEPS, min_lr=0.1)),
    "cosine_with_min_lr": (("scheduler.min_lr=0.2",), lambda opt: transformers.get_cosine_with_min_lr_schedule_with_warmup(
        opt, WARMUP, STEPS, min_lr=0.2)),
    "cosine_with_restarts": (("scheduler.num_cycles=2",), lambda opt: transformers.get_cosine_with_hard_restarts_schedule_with_warmup(
        opt, WARMUP, STEPS, num_cycles=2)),
    "polynomial": (("scheduler.power=2", "scheduler.lr_end=0.01"), lambda opt: transformers.get_polynomial_decay_schedule_with_warmup(
        opt, WARMUP, STEPS, lr_end=0.01, power=2)),
}


def lrs_over_steps(make_scheduler) -> list[float]:
    """The learning rate of each optimizer step, lr 1.0 before scheduling."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer)
    values = []
    for _ in range(STEPS):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


@pytest.mark.parametrize("preset", PRESETS)
def test_scheduler_presets_follow_the_library_schedule(make_config, preset):
    overrides, library_schedule = PRESETS[preset]
    cfg = make_config(f"scheduler={preset}", f"scheduler.warmup_steps={WARMUP}", *overrides)
    validate(cfg)
    ours = lrs_over_steps(lambda opt: instantiate(cfg.scheduler)(opt, total_steps=STEPS))
    assert ours == pytest.approx(lrs_over_steps(library_schedule), abs=1e-12)
    assert len(set(ours)) > 1  # warmup at least: a schedule that never moved would match nothing here


def test_a_key_of_another_schedule_is_refused(make_config):
    cfg = make_config("scheduler=linear", "+scheduler.num_cycles=2")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="scheduler.num_cycles does not apply to scheduler.name=linear"):
        instantiate(cfg.scheduler)(optimizer, total_steps=STEPS)


@pytest.mark.parametrize("v_pred", [False, True])
def test_min_snr_weights_are_diffusers_min_snr(make_config, v_pred):
    """sdxl_tiny's Min-SNR loss weights, as diffusers' training examples compute them from compute_snr."""
    cfg = make_config("model=sdxl_tiny", "model.min_snr_gamma=5", f"model.v_pred={v_pred}")
    validate(cfg)
    schedule = build_module(cfg).noise_schedule
    t = torch.linspace(0.0, 0.998, 50)
    timesteps = schedule.denoiser_timesteps(t)
    snr = compute_snr(DDPMScheduler.from_config(schedule.scheduler.config), timesteps)
    clamped = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    torch.testing.assert_close(schedule.loss_weights(t), clamped / (snr + 1 if v_pred else snr))


def test_min_snr_gamma_is_refused_for_flow_matching_families(make_config):
    with pytest.raises(ConfigError, match=r"^model.min_snr_gamma applies to the DDPM objective \(model=sdxl\)"):
        validate(make_config("model=flux_tiny", "+model.min_snr_gamma=5"))
