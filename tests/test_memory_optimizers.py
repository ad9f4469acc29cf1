"""Optimizers for big models on one GPU: gradient release, 8-bit AdamW with Kahan summation, optimi, Prodigy."""
import bitsandbytes as bnb
import pytest
import torch
from lightning import Callback
from safetensors.torch import load_file

from difftrain.config.validate import ConfigError, validate
from difftrain.optim.adamw8bit_kahan import AdamW8bitKahan
from difftrain.training import run

FULL_FT = ("dataset.resolutions=[64]", "trainer.max_steps=3", "adapter=none", "trainer.gradient_clip_val=0",
           "checkpoint_every_n_steps=null")
SGD = ("optimizer._target_=torch.optim.SGD", "~optimizer.betas", "~optimizer.eps", "+optimizer.momentum=0.9")


def exported_weights(result):
    return load_file(result.final_export / "flux1-transformer-bfl.safetensors")


@pytest.mark.parametrize("optimizer", [(), SGD], ids=["adamw", "sgd"])
def test_gradient_release_matches_the_normal_optimizer_path(make_config, optimizer):
    normal = exported_weights(run(make_config(*FULL_FT, *optimizer, "optimizer.lr=1e-3", run_name="normal")))
    released = exported_weights(run(make_config(*FULL_FT, *optimizer, "optimizer.lr=1e-3",
                                                "optimizer.gradient_release=true", run_name="released")))
    assert normal.keys() == released.keys()
    for key in normal:
        torch.testing.assert_close(released[key], normal[key], rtol=1e-5, atol=1e-6)


class LiveGradientMeter(Callback):
    """Largest number of gradient elements alive at once during backward, sampled as each one completes."""

    def __init__(self):
        self.peak = 0

    def on_train_start(self, trainer, module):
        params = module.trainable_parameters()
        self.total = sum(p.numel() for p in params)

        def sample(_):
            self.peak = max(self.peak, sum(p.grad.numel() for p in params if p.grad is not None))

        for param in params:
            param.register_post_accumulate_grad_hook(sample)


def peak_live_gradients(make_config, *overrides, name):
    meter = f"+callbacks.meter={{_target_:{__name__}.LiveGradientMeter}}"
    result = run(make_config(*FULL_FT, meter, *overrides, run_name=name))
    meter = next(c for c in result.trainer.callbacks if isinstance(c, LiveGradientMeter))
    return meter.peak, meter.total


def test_gradient_release_never_holds_all_gradients(make_config):
    normal_peak, total = peak_live_gradients(make_config, name="normal")
    released_peak, _ = peak_live_gradients(make_config, "optimizer.gradient_release=true", name="released")
    assert normal_peak == total
    assert released_peak < total / 4, f"{released_peak} of {total} gradient elements alive at once"


def test_gradient_release_with_accumulation_trains(make_config):
    result = run(make_config(*FULL_FT, "optimizer.gradient_release=true", "trainer.accumulate_grad_batches=2"))
    assert result.trainer.global_step == 3 and torch.isfinite(result.trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("override,message", [
    ("trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val=0"),
    ("trainer.devices=2", "trainer.devices=1"),
])
def test_gradient_release_refuses_what_it_cannot_do(make_config, override, message):
    cfg = make_config(*FULL_FT, "optimizer.gradient_release=true", override)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def bf16_trajectory(make_optimizer, steps=200, lr=1e-4):
    """Weights after `steps` steps of a fixed gradient sequence, from the same bf16-representable start."""
    start = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).bfloat16()
    results = {}
    for name, dtype in (("reference", torch.float32), ("trial", torch.bfloat16)):
        param = torch.nn.Parameter(start.to(dtype, copy=True))
        optimizer = torch.optim.AdamW([param], lr=lr, weight_decay=0.0) if name == "reference" else \
            make_optimizer([param], lr=lr, weight_decay=0.0)
        grads = torch.Generator().manual_seed(1)
        for _ in range(steps):
            param.grad = (torch.randn(param.shape, generator=grads) + 0.5).to(dtype)
            optimizer.step()
        results[name] = param.detach().float()
    moved = (results["reference"] - start.float()).abs().mean()
    return (results["trial"] - results["reference"]).abs().mean() / moved


def test_kahan_8bit_adamw_tracks_fp32_on_bf16_weights():
    plain = bf16_trajectory(bnb.optim.AdamW8bit)
    kahan = bf16_trajectory(AdamW8bitKahan)
    assert plain > 0.5, "plain 8-bit AdamW should lose most sub-rounding updates on bf16 weights"
    assert kahan < 0.2 and kahan < plain / 4  # what is left is the 8-bit quantization of the moments


def test_stabilize_clips_the_update_after_a_gradient_spike():
    def step_size(stabilize):
        param = torch.nn.Parameter(torch.zeros(4096))
        optimizer = AdamW8bitKahan([param], lr=1e-2, weight_decay=0.0, stabilize=stabilize)
        for scale in [1.0] * 20 + [1000.0]:
            before = param.detach().clone()
            param.grad = torch.full_like(param, scale)
            optimizer.step()
        return (param.detach() - before).abs().max()

    assert step_size(stabilize=True) < step_size(stabilize=False) / 2


@pytest.mark.parametrize("optimizer", ["adamw8bit_kahan", "adamw_optimi", "prodigy"])
def test_optimizer_configs_train(make_config, optimizer):
    result = run(make_config("dataset.resolutions=[64]", "trainer.max_steps=2", f"optimizer={optimizer}"))
    assert torch.isfinite(result.trainer.callback_metrics["train/loss"])
    assert any(p.abs().sum() > 0 for n, p in result.module.denoiser.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("recipe,tiny_overrides", [
    ("flux_24gb", ("model.blocks_to_swap=2",)),  # the tiny Flux has 4 blocks
    ("sdxl_fft_24gb", ()),
    ("wan14b_24gb", ("model.blocks_to_swap=0", "dataset=videos")),  # the tiny Wan has 2 blocks: none swappable
    ("hidream_24gb", ("model.blocks_to_swap=2",)),  # the tiny HiDream has 4 blocks; its Llama loads in 4-bit
])
def test_low_vram_recipes_train_at_tiny_size(make_config, recipe, tiny_overrides):
    result = run(make_config(f"experiment={recipe}", "model.tiny=true", "dataset.resolutions=[64]",
                             "trainer.max_steps=2", *tiny_overrides))
    assert result.trainer.global_step == 2
    assert torch.isfinite(result.trainer.callback_metrics["train/loss"])
