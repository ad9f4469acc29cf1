"""Flux training modes through the real trainer: LoRA (checked against diffusers' loader), full fine-tune
(checked against the BFL loader and diffusers' folder loader), fp8 storage, and resume equality."""
import re

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from lightning import Callback
from safetensors.torch import load_file

from src.formats.flux import load_bfl_transformer
from src.tiny import flux as tiny_flux
from src.tiny import tiny_model_dir
from src.training import run

FAST = ("dataset.resolutions=[64]", "trainer.max_steps=3", "checkpoint_every_n_steps=null")
BFL_BLOCK_LINEAR = re.compile(r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02]|mod\.lin)"
                              r"|single_blocks\.\d+\.(linear[12]|modulation\.lin))$")


def denoiser_inputs(transformer, seed=0):
    """A fixed packed-latent input for FluxTransformer2DModel (4x4 patches, 8 text tokens)."""
    g = torch.Generator().manual_seed(seed)
    config = transformer.config
    return dict(hidden_states=torch.randn(1, 16, config.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.6]), guidance=torch.tensor([1.0]),
                img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
                txt_ids=torch.zeros(8, 3), return_dict=False)


@torch.no_grad()
def transformer_output(transformer):
    transformer.eval()
    return transformer(**denoiser_inputs(transformer))[0]


def test_lora_export_reproduces_trained_model_in_diffusers(make_config):
    result = run(make_config(*FAST, "adapter.rank=4", "adapter.alpha=8", "optimizer.lr=1e-2"))
    lora_b = [p for n, p in result.module.denoiser.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "training left every lora_B at its zero init"

    pipe = FluxPipeline.from_pretrained(tiny_model_dir("flux", tiny_flux.build), local_files_only=True)
    base_output = transformer_output(pipe.transformer)
    pipe.load_lora_weights(result.final_export)
    ours = transformer_output(result.module.denoiser)
    theirs = transformer_output(pipe.transformer)
    assert not torch.allclose(ours, base_output, atol=1e-4), "the LoRA changed nothing"
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_full_finetune_exports_bfl_file_and_diffusers_folder(make_config, tmp_path):
    result = run(make_config(*FAST, "adapter=none", "optimizer.lr=1e-3"))
    trained = result.module.denoiser.state_dict()
    original = FluxTransformer2DModel.from_pretrained(tiny_model_dir("flux", tiny_flux.build), subfolder="transformer").state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in trained), "full fine-tune changed no weight"

    bfl_file = result.final_export / "flux1-transformer-bfl.safetensors"
    block_keys = {k.rsplit(".", 1)[0] for k in load_file(bfl_file) if "blocks." in k and k.endswith(".weight")}
    block_linears = {k for k in block_keys if ".norm." not in k}
    assert block_linears and all(BFL_BLOCK_LINEAR.match(k) for k in block_linears), sorted(block_linears)

    reloaded = load_bfl_transformer(bfl_file, tiny_model_dir("flux", tiny_flux.build), torch.float32).state_dict()
    folder = FluxTransformer2DModel.from_pretrained(result.final_export / "transformer").state_dict()
    for key, tensor in trained.items():
        assert torch.equal(reloaded[key], tensor), key
        assert torch.equal(folder[key], tensor), key


def test_transformer_path_loads_a_bfl_export(make_config):
    first = run(make_config(*FAST, "adapter=none", run_name="first"))
    bfl_file = first.final_export / "flux1-transformer-bfl.safetensors"
    second = run(make_config(*FAST, "adapter=none", f"model.transformer_path={bfl_file}", "trainer.max_steps=0",
                             run_name="second"))
    for key, tensor in first.module.denoiser.state_dict().items():
        assert torch.equal(second.module.denoiser.state_dict()[key], tensor), key


def test_exports_at_save_points_each_with_its_config(make_config):
    result = run(make_config(*FAST, "trainer.max_steps=4", "save_every_n_steps=2", "save_every_n_epochs=null"))
    exports = result.final_export.parent
    assert sorted(p.name for p in exports.iterdir()) == ["final", "step2", "step4"]
    for folder in exports.iterdir():
        assert (folder / "pytorch_lora_weights.safetensors").is_file() and (folder / "config.yaml").is_file()
    assert "save_every_n_steps: 2" in (exports / "step2" / "config.yaml").read_text()


def test_bypassed_guidance_embedding_ignores_guidance_and_exports_every_key(make_config):
    def first_loss(*overrides, name):
        result = run(make_config(*FAST, "trainer.max_steps=1", "adapter=none", *overrides, run_name=name))
        return result.trainer.callback_metrics["train/loss"], result.final_export

    bypassed, export = first_loss("model.bypass_guidance_embedding=true", name="a")
    assert first_loss("model.bypass_guidance_embedding=true", "model.guidance=7", name="b")[0] == bypassed
    assert first_loss("model.guidance=7", name="c")[0] != first_loss(name="d")[0]
    bfl = load_file(export / "flux1-transformer-bfl.safetensors")
    assert "guidance_in.in_layer.weight" in bfl
    load_bfl_transformer(export / "flux1-transformer-bfl.safetensors", tiny_model_dir("flux", tiny_flux.build), torch.float32)


@pytest.mark.parametrize("fp8", ["float8", "float8_e5m2"])
def test_fp8_storage_keeps_lora_in_full_precision(make_config, fp8):
    result = run(make_config(*FAST, f"model.transformer_dtype={fp8}"))
    denoiser = result.module.denoiser
    stored = {"float8": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}[fp8]
    block_weights = {n: p for n, p in denoiser.named_parameters()
                     if "blocks." in n and "base_layer.weight" in n}
    assert block_weights and all(p.dtype == stored for p in block_weights.values())
    for name, param in denoiser.named_parameters():
        if "lora_" in name:
            assert param.dtype == torch.float32 and param.requires_grad, name
        elif name.startswith(("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")):
            assert param.dtype == torch.float32, name
    assert any(p.abs().sum() > 0 for n, p in denoiser.named_parameters() if "lora_B" in n), "no LoRA update"
    assert torch.isfinite(result.trainer.callback_metrics["train/loss"])


class SimulatedCrash(RuntimeError):
    pass


class CrashAfterStep(Callback):
    """Kills the run once `step` optimizer steps are done (after that step's checkpoint was written)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise SimulatedCrash(f"crash after step {self.step}")


def test_crashed_and_resumed_run_ends_with_the_same_lora(make_config):
    """Stopped mid-epoch (8 images, batch 1) with warmup + cosine lr: weights, optimizer, scheduler, step and
    data position must all come back for the LoRA to match."""
    common = ("dataset.resolutions=[64]", "checkpoint_every_n_steps=3", "adapter.rank=4", "optimizer.lr=1e-2",
              "scheduler=cosine", "scheduler.warmup_steps=2", "trainer.max_steps=6")
    straight = run(make_config(*common, run_name="straight"))
    crash = f"+callbacks.crash={{_target_:{__name__}.CrashAfterStep,step:3}}"
    with pytest.raises(SimulatedCrash):
        run(make_config(*common, crash, run_name="crashed"))
    resumed = run(make_config(*common, "resume=auto", run_name="resumed"))
    assert resumed.trainer.global_step == 6
    expected = load_file(straight.final_export / "pytorch_lora_weights.safetensors")
    actual = load_file(resumed.final_export / "pytorch_lora_weights.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
