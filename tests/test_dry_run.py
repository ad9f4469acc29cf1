"""`dry_run=true` plans without loading: buckets, steps, cache state, skipped files and the denoiser's weight memory,
with no model built, loaded or read; the memory estimate equals the bytes the loaded denoiser really holds, fp8
storage included (tests/test_conformance.py checks every family's skeleton against its loaded denoiser)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from difftrain.dry_run import dry_run, weight_memory
from difftrain.training import build_module, run
from tests.conftest import EXAMPLE_IMAGES, ROOT, compose_config

FLUX = ("model=flux_tiny", "dataset.resolutions=[64]")
TINY = ("model.tiny=true", "model.dtype=float32")
FAMILIES = {  # the other image family and a video family, end to end
    "sdxl": ("model=sdxl_tiny",),
    "wan": ("model=wan21_t2v", *TINY),
}
# Run before train.py in the subprocess: any weight load or model build fails the run.
NO_LOADING = """
import runpy, sys, safetensors.torch, torch, diffusers, transformers
def refuse(*args, **kwargs):
    raise AssertionError(f"a dry run loaded weights: {args[:1]}")
for owner, name in [(safetensors.torch, "load_file"), (safetensors.torch, "load"), (torch, "load"),
                    (diffusers.ModelMixin, "from_pretrained"), (diffusers.DiffusionPipeline, "from_pretrained"),
                    (transformers.PreTrainedModel, "from_pretrained")]:
    setattr(owner, name, refuse)
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def dataset_with_a_broken_file(folder):
    folder.mkdir()
    for image in sorted(EXAMPLE_IMAGES.glob("*.jpg"))[:3]:
        shutil.copy(image, folder)
        shutil.copy(image.with_suffix(".txt"), folder)
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "broken.txt").write_text("a broken file")
    return folder


def test_dry_run_prints_the_plan_and_neither_builds_nor_loads_a_model(tmp_path):
    data = dataset_with_a_broken_file(tmp_path / "data")
    tiny_dir = tmp_path / "tiny"
    result = subprocess.run(
        [sys.executable, "-c", NO_LOADING, "dry_run=true", *FLUX, f"dataset.path={data}", "dataset.num_repeats=2",
         "dataset.batch_size=2", "trainer.max_epochs=3", "trainer.accumulate_grad_batches=2", "logger=none",
         f"hydra.run.dir={tmp_path / 'run'}", f"dataset.cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT, env={**os.environ, "DIFFTRAIN_TINY_DIR": str(tiny_dir), "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Dataset: 3 items, 6 samples" in out
    batches = sum(int(line.split()[-1]) for line in out.splitlines() if line.strip()[:1].isdigit())
    per_epoch = -(-batches // 2)  # accumulate 2
    assert f"{batches} batch(es) of 2 x 1 process(es) per epoch, accumulate 2 -> {per_epoch} optimizer" in out
    assert f"Total: {3 * per_epoch} step(s) = 3 epoch(s) (set by trainer.max_epochs=3)" in out
    assert "broken.jpg" in out and "Skipped 1 file(s)" in out
    assert "latents 0 cached" in out and "not built yet" in out
    assert not tiny_dir.exists() or not any(tiny_dir.iterdir()), "the dry run built a tiny model"
    assert not (tmp_path / "run" / "exports").exists()


def test_dry_run_counts_the_cache_of_an_earlier_run(tmp_path):
    run(compose_config(tmp_path / "first", *FLUX, "trainer.max_steps=1"))
    report = dry_run(compose_config(tmp_path / "second", *FLUX, "dry_run=true", "trainer.max_steps=5"))
    images = len(list(EXAMPLE_IMAGES.glob("*.jpg")))
    assert f"latents {images} cached, 0 to encode; captions {images} cached, 0 to encode" in report
    assert "Total: 5 step(s)" in report and "trainer.max_steps=5" in report


@pytest.mark.parametrize("fp8", [False, True])
def test_weight_memory_is_what_the_loaded_denoiser_holds(fp8, tmp_path):
    overrides = (*FLUX, "model.blocks_to_swap=2", *(["model.transformer_dtype=float8"] if fp8 else []))
    module = build_module(compose_config(tmp_path / "run", *overrides))
    estimate = weight_memory(module, module.denoiser_skeleton())
    module.blocks_to_swap = 0  # the CPU-only test machine cannot swap; the bytes stored are the same
    module.configure_model()
    base = {n: p for n, p in module.denoiser.named_parameters() if "lora_" not in n}
    assert estimate["total"] == sum(p.numel() * p.element_size() for p in base.values())
    if fp8:
        assert any(p.dtype == torch.float8_e4m3fn for p in base.values())
    blocks = module.blocks()
    swapped = [sum(p.numel() * p.element_size() for n, p in b.named_parameters() if "lora_" not in n)
               for b in blocks[-2:]]
    assert estimate["cpu"] == sum(swapped)
    assert estimate["device"] == estimate["total"] - sum(swapped) + max(swapped)


@pytest.mark.parametrize("name, denoiser", [("sdxl", "UNet2DConditionModel"), ("wan", "WanTransformer3DModel")])
def test_dry_run_of_image_and_video_families(name, denoiser, tmp_path):
    overrides = (*FAMILIES[name], "dry_run=true",
                 *(["dataset=videos", "dataset.resolutions=[32]", "dataset.frame_buckets=[1,5]"] if name == "wan" else []))
    cfg = compose_config(tmp_path / "run", *overrides)
    build_module(cfg).denoiser_skeleton()  # builds the tiny model on first use, as a training run would
    report = dry_run(cfg)
    assert f"Denoiser weights ({denoiser}" in report
    if name == "wan":  # every bundled video fills the 5-frame bucket
        rows = [line.split() for line in report.splitlines() if line.strip()[:1].isdigit()]
        assert any(row[1] == "5" for row in rows), report
