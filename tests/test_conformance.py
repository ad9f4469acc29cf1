"""The family conformance suite: what every family promises, checked the same way for each. A family joins with
one line in FAMILIES; its own test file keeps only what is special to it.

Per family: a tiny LoRA run whose export, loaded by the real consumer into the untrained base model read from
disk, reproduces our trained denoiser to 1e-5 with every trained LoRA module loaded; a preview rendered through
the family's inference hook; a run continued from a mid-run checkpoint ends with the uninterrupted run's LoRA. Where the
seed offers them: a full fine-tune whose export loads back through the family's own loading key bit-identically,
and an fp8 base that keeps the LoRA and the family's keep-list in high precision. Every LoRA file records its run
in its metadata, and the denoiser skeleton the dry run measures has the loaded denoiser's shapes."""
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
from lightning import Callback
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from difftrain.modules.base import DiffusionModule
from difftrain.training import build_module, run
from tests.conftest import ROOT, compose_config

EDIT_CONTROLS = ROOT / "data" / "examples" / "edit" / "control"
TINY_FLOAT32 = ("model.tiny=true", "model.dtype=float32")
WAN = ("model=wan21_t2v", *TINY_FLOAT32, "model.max_sequence_length=16", "dataset=videos", "dataset.resolutions=[32]",
       "dataset.frame_buckets=[1,5]")


@dataclass(frozen=True)
class Family:
    overrides: tuple[str, ...]  # a tiny run of the family on a fitting bundled dataset
    lora_file: str  # the LoRA file in an export folder, as the user gets it
    full_export: Optional[tuple[str, str]] = None  # (model key that loads it, file in the export); None: no FFT
    fp8: bool = True
    edit: bool = False  # trains with control images: the preview edits one


FAMILIES = {
    "flux": Family(("model=flux_tiny", "dataset.resolutions=[64]"), "pytorch_lora_weights.safetensors",
                   ("transformer_path", "flux1-transformer-bfl.safetensors")),
    "flux_kontext": Family(("model=flux_kontext", *TINY_FLOAT32, "model.max_sequence_length=64",
                            "dataset=edit_example"), "pytorch_lora_weights.safetensors",
                           ("transformer_path", "flux1-transformer-bfl.safetensors"), edit=True),
    "sdxl": Family(("model=sdxl_tiny", "dataset.resolutions=[64]"), "lora.safetensors",
                   ("checkpoint_path", "model.safetensors"), fp8=False),
    "sd3": Family(("model=sd3", *TINY_FLOAT32, "model.max_sequence_length=16", "dataset.resolutions=[64]"),
                  "pytorch_lora_weights.safetensors", ("transformer_path", "transformer")),
    "wan": Family(WAN, "adapter_model.safetensors", ("transformer_path", "transformer_comfyui.safetensors")),
    # diffusers' Flux/Chroma LoRA converters take no ComfyUI-format Chroma file (and hard-code full sizes): loaded
    # through the family's reader (load_exported_lora)
    "chroma": Family(("model=chroma", *TINY_FLOAT32, "model.max_sequence_length=64", "dataset.resolutions=[64]"),
                     "adapter_model.safetensors", ("transformer_path", "chroma.safetensors")),
    "qwen_image": Family(("model=qwen_image", *TINY_FLOAT32, "dataset.resolutions=[64]"), "adapter_model.safetensors",
                         ("transformer_path", "qwen_image_bf16.safetensors")),
    "qwen_image_edit": Family(("model=qwen_image_edit", *TINY_FLOAT32, "dataset=edit_example"),
                              "adapter_model.safetensors", ("transformer_path", "qwen_image_bf16.safetensors"), edit=True),
    "qwen_image_edit_plus": Family(("model=qwen_image_edit_plus", *TINY_FLOAT32, "dataset=edit_example",
                                    "dataset.control_path=null", f"dataset.control_paths=[{EDIT_CONTROLS},{EDIT_CONTROLS}]"),
                                   "adapter_model.safetensors", ("transformer_path", "qwen_image_bf16.safetensors"),
                                   edit=True),
    # diffusers' Lumina2 LoRA converter hard-codes full sizes: loaded through the family's reader (load_exported_lora)
    "lumina2": Family(("model=lumina2", *TINY_FLOAT32, "dataset.resolutions=[64]"), "adapter_model.safetensors",
                      ("transformer_path", "lumina_2_model.safetensors"), fp8=False),
    "hidream": Family(("model=hidream", *TINY_FLOAT32, "dataset.resolutions=[64]"), "adapter_model.safetensors"),
    "omnigen2": Family(("model=omnigen2", *TINY_FLOAT32, "dataset.resolutions=[64]"), "adapter_model.safetensors", fp8=False),
    # quoted caption text feeds the glyph ByT5 branch; no diffusers loader: read by the family's reader
    "hunyuan_image": Family(("model=hunyuan_image", *TINY_FLOAT32, "dataset.resolutions=[64]",
                             "dataset.caption_prefix=\"a sign that says 'hi', \""), "adapter_model.safetensors",
                            ("transformer_path", "hunyuanimage2.1.safetensors")),
    "ltx_video": Family(("model=ltx_video", *WAN[1:-1], "dataset.frame_buckets=[1,9]"), "adapter_model.safetensors"),
    "hunyuan_video": Family(("model=hunyuan_video", *WAN[1:]), "adapter_model.safetensors"),  # LoRA only
    "cosmos_predict2": Family(("model=cosmos_predict2", *TINY_FLOAT32, "model.max_sequence_length=16",
                               "dataset.resolutions=[32]"), "adapter_model.safetensors",
                              ("transformer_path", "cosmos_predict2.safetensors")),
    "cosmos": Family(("model=cosmos", *TINY_FLOAT32, "model.max_sequence_length=16", "dataset=videos",
                      "dataset.resolutions=[32]", "dataset.enable_ar_bucket=false", "dataset.frame_buckets=[9]"),
                     "adapter_model.safetensors", fp8=False),
}
FP8_STORED_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)  # layerwise casting's
LORA = ("adapter.rank=4", "adapter.alpha=8", "optimizer.lr=1e-2", "scheduler=cosine", "scheduler.warmup_steps=1",
        "trainer.max_steps=4", "checkpoint_every_n_steps=2")


def families(having: str = "") -> list[str]:
    return [name for name, family in FAMILIES.items() if not having or getattr(family, having)]


class KeepMidRunCheckpoint(Callback):
    """Copies the checkpoint written at `step` (last.ckpt until the next one) to checkpoints/step<N>.ckpt."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            last = trainer.checkpoint_callback.last_model_path
            shutil.copyfile(last, Path(last).with_name(f"step{self.step}.ckpt"))


KEEP_STEP_2 = f"+callbacks.keep={{_target_:{__name__}.KeepMidRunCheckpoint,step:2}}"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One LoRA run per family, shared by the tests that inspect it (and the reference of the resume test, which
    continues from its step-2 checkpoint)."""
    runs = {}

    def get(name: str):
        if name not in runs:
            runs[name] = run(compose_config(tmp_path_factory.mktemp(name) / "run", *FAMILIES[name].overrides, *LORA,
                                            KEEP_STEP_2))
        return runs[name]
    return get


def untrained_module(name: str, tmp_path, *overrides: str) -> DiffusionModule:
    """The family's base model loaded from disk as a fresh process would, no adapter, in eval mode."""
    module = build_module(compose_config(tmp_path / "fresh", *FAMILIES[name].overrides, "adapter=none", *overrides))
    module.configure_model()
    return module.eval()


@torch.no_grad()
def prediction(module: DiffusionModule, batch: dict) -> torch.Tensor:
    """The denoiser's output on a batch noised to t=0.6 with fixed noise."""
    latents = batch["latents"]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    return module.denoise(batch, torch.full((latents.shape[0],), 0.6), noise)[0]


def lora_modules(module: DiffusionModule) -> dict[str, int]:
    return {part: sum(hasattr(m, "lora_A") for m in model.modules()) for part, model in module.model_parts().items()}


@pytest.mark.parametrize("name", families())
def test_lora_export_loads_in_its_consumer_and_reproduces_our_output(name, lora_run, tmp_path):
    trained = lora_run(name)
    ours = trained.module.eval()
    batch = next(iter(trained.datamodule.train_dataloader()))
    consumer = untrained_module(name, tmp_path)
    base_output = prediction(consumer, batch)

    consumer.load_exported_lora(trained.final_export / FAMILIES[name].lora_file)
    assert lora_modules(consumer) == lora_modules(ours), "the consumer loaded another set of LoRA modules"
    our_output = prediction(ours, batch)
    assert not torch.allclose(our_output, base_output, atol=1e-4), "the LoRA changed nothing"
    torch.testing.assert_close(prediction(consumer, batch), our_output, rtol=1e-5, atol=1e-5)


def parameters_without_gradient(module: DiffusionModule, batch: dict) -> list[str]:
    """The trainable parameters that one backward pass of the training loss leaves without a gradient (or
    an all-zero one: a dead weight)."""
    module.zero_grad(set_to_none=True)
    latents = batch["latents"]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    module.forward_loss(batch, torch.full((latents.shape[0],), 0.6), noise).backward()
    missing = [name for name, p in module.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.any())]
    module.zero_grad(set_to_none=True)
    return missing


@pytest.mark.parametrize("name", families())
def test_every_trainable_parameter_gets_a_gradient(name, lora_run, tmp_path):
    """DDP requires a gradient for every trainable parameter (and one that never gets any trains nothing): checked
    for the LoRA and, where the family has one, the full fine-tune."""
    trained = lora_run(name)
    batch = next(iter(trained.datamodule.train_dataloader()))
    modules = {"LoRA": trained.module.train()}
    if FAMILIES[name].full_export:
        modules["full fine-tune"] = untrained_module(name, tmp_path).train()
    for kind, module in modules.items():
        missing = parameters_without_gradient(module, batch)
        assert not missing, f"{kind}: no gradient reaches {missing}"


@pytest.mark.parametrize("name", families())
def test_preview_renders_through_the_inference_hook(name, lora_run):
    trained = lora_run(name)
    module = trained.module.eval()
    control = {"image": Image.open(trained.datamodule.train_set.samples[0].item.controls[0])} if FAMILIES[name].edit else {}
    images = module.render("a red square", width=64, height=64, steps=2, seed=0, **control)
    assert images.shape[-3:] == (64, 64, 3) and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0, "a blank preview"


@pytest.mark.parametrize("name", families())
def test_resumed_run_ends_with_the_same_lora(name, lora_run, tmp_path):
    """Continued from the step-2 checkpoint of the shared run (warmup + cosine lr): weights, optimizer, scheduler,
    step and data position must all come back for the LoRA to match the uninterrupted run's. (Killed processes
    resuming by resume=auto: tests/test_faults.py.)"""
    reference = lora_run(name)
    checkpoint = reference.final_export.parents[1] / "checkpoints" / "step2.ckpt"
    resumed = run(compose_config(tmp_path / "resumed", *FAMILIES[name].overrides, *LORA, f"resume='{checkpoint}'"))
    assert resumed.trainer.global_step == 4
    lora_file = FAMILIES[name].lora_file
    expected = load_file(reference.final_export / lora_file)
    actual = load_file(resumed.final_export / lora_file)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", families("full_export"))
def test_full_finetune_export_loads_back_bit_identical(name, tmp_path):
    result = run(compose_config(tmp_path / "run", *FAMILIES[name].overrides, "adapter=none", "optimizer.lr=1e-3",
                                "trainer.max_steps=2", "checkpoint_every_n_steps=null"))
    key, file = FAMILIES[name].full_export
    reloaded = untrained_module(name, tmp_path, f"model.{key}={result.final_export / file}")
    original = untrained_module(name, tmp_path).denoiser.state_dict()
    for part, model in result.module.model_parts().items():
        ours, theirs = model.state_dict(), reloaded.model_parts()[part].state_dict()
        assert ours.keys() == theirs.keys(), part
        assert all(torch.equal(theirs[k], v) for k, v in ours.items()), f"{part} did not load back bit-identical"
    assert any(not torch.equal(v, original[k]) for k, v in result.module.denoiser.state_dict().items())


@pytest.mark.parametrize("name", families("fp8"))
def test_fp8_base_keeps_lora_and_keep_list_in_high_precision(name, tmp_path):
    module = run(compose_config(tmp_path / "run", *FAMILIES[name].overrides, "model.transformer_dtype=float8",
                                "trainer.max_steps=2", "checkpoint_every_n_steps=null", "optimizer.lr=1e-2")).module
    kept = [re.compile(pattern) for pattern in module.keep_in_high_precision]
    stored = set()
    for layer_name, layer in module.denoiser.named_modules():
        for param_name, param in layer.named_parameters(recurse=False):
            if "lora_" in layer_name:
                assert param.dtype == torch.float32 and param.requires_grad, f"{layer_name}.{param_name}"
            elif any(p.search(layer_name) for p in kept):
                assert param.dtype == module.compute_dtype, f"{layer_name}.{param_name}"
            elif isinstance(layer, FP8_STORED_LAYERS):
                stored.add(param.dtype)
    assert stored == {torch.float8_e4m3fn}, stored
    assert any(p.abs().sum() > 0 for n, p in module.denoiser.named_parameters() if "lora_B" in n), "no LoRA update"


@pytest.mark.parametrize("name", families())
def test_lora_file_records_its_run(name, lora_run):
    trained = lora_run(name)
    with safe_open(str(trained.final_export / FAMILIES[name].lora_file), "pt") as file:
        meta = file.metadata()
    sizes = trained.datamodule.trained_sizes()
    assert sizes and meta["difftrain.resolutions"] == ", ".join(sizes)
    assert (meta["difftrain.rank"], meta["difftrain.alpha"], meta["difftrain.steps"]) == ("4", "8", "4")
    assert meta["difftrain.dataset_size"] == str(trained.datamodule.num_items) != "0"
    assert meta["difftrain.base_model"] == trained.module.base_model() != ""
    assert type(trained.module).__name__ in meta["difftrain.family"]


@pytest.mark.parametrize("name", families())
def test_denoiser_skeleton_has_the_loaded_denoisers_shapes(name, tmp_path):
    """What the dry run estimates memory from, built from configs and file headers alone."""
    module = untrained_module(name, tmp_path)
    skeleton = module.denoiser_skeleton()
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    loaded = {k: p.shape for k, p in module.denoiser.named_parameters()}
    assert {k: p.shape for k, p in skeleton.named_parameters()} == loaded
