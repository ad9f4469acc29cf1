"""Optimizer config groups, gradient accumulation and clipping through the real trainer."""
import torch

from difftrain.training import run


def test_adamw8bit_keeps_8bit_states(make_config):
    result = run(make_config("dataset.resolutions=[64]", "trainer.max_steps=2", "optimizer=adamw8bit",
                             "+optimizer.min_8bit_size=16"))
    optimizer = result.trainer.optimizers[0]
    states = [s for s in optimizer.state.values() if "state1" in s]
    assert states and all(s["state1"].dtype == torch.uint8 for s in states)
    assert torch.isfinite(result.trainer.callback_metrics["train/loss"])


def test_gradient_accumulation_steps_once_per_n_batches(make_config):
    result = run(make_config("dataset.resolutions=[64]", "trainer.max_steps=2", "trainer.accumulate_grad_batches=3",
                             "trainer.gradient_clip_val=0.01"))
    assert result.trainer.global_step == 2
    assert result.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 6
