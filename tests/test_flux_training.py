"""What is special to Flux (the conformance suite checks LoRA, full fine-tune reload, fp8 and resume): the BFL
file and diffusers folder of a full fine-tune, save points, the bypassed guidance embedding, e5m2 storage."""
import re

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

from difftrain.formats.flux import load_bfl_transformer
from difftrain.tiny import flux as tiny_flux
from difftrain.tiny import tiny_model_dir
from difftrain.training import run

FAST = ("dataset.resolutions=[64]", "trainer.max_steps=3", "checkpoint_every_n_steps=null")
BFL_BLOCK_LINEAR = re.compile(r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02]|mod\.lin)"
                              r"|single_blocks\.\d+\.(linear[12]|modulation\.lin))$")


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


def test_exports_at_save_points_each_with_its_config(make_config):
    result = run(make_config(*FAST, "trainer.max_steps=4", "save_every_n_steps=2", "save_every_n_epochs=null",
                             "export_layout=folders"))
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


def test_fp8_e5m2_storage(make_config):
    """e5m2 (the conformance suite checks e4m3): base block weights stored in it, LoRA trains in float32."""
    denoiser = run(make_config(*FAST, "model.transformer_dtype=float8_e5m2")).module.denoiser
    block_weights = [p for n, p in denoiser.named_parameters() if "blocks." in n and "base_layer.weight" in n]
    assert block_weights and all(p.dtype == torch.float8_e5m2 for p in block_weights)
    assert any(p.abs().sum() > 0 for n, p in denoiser.named_parameters() if "lora_B" in n), "no LoRA update"
