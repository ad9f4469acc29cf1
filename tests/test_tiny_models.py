import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

import difftrain.tiny as tiny
from difftrain.tiny import flux, wan
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("flux")
    flux.build(out_dir)
    return out_dir


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv(tiny.CACHE_ENV, str(tmp_path))
    return tmp_path


def counting(build) -> tuple:
    """`build` wrapped so that each call is recorded, and the list of calls."""
    calls = []

    def counting_build(out_dir):
        calls.append(out_dir)
        build(out_dir)

    return counting_build, calls


def relative_files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_flux_build_is_byte_identical(flux_dir, tmp_path):
    flux.build(tmp_path)
    files = relative_files(flux_dir)
    assert files == relative_files(tmp_path)
    assert {f.name for f in files if f.suffix == ".safetensors"} >= {
        flux.BFL_TRANSFORMER_FILE, "diffusion_pytorch_model.safetensors", "model.safetensors"}
    for f in files:
        assert (flux_dir / f).read_bytes() == (tmp_path / f).read_bytes(), f


def test_flux_folder_loads_and_generates(flux_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8
    images = pipe(prompt="a cat", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()


def test_tiny_model_dir_builds_once_per_builder_source(cache_root, tmp_path):
    build, calls = counting(flux.build)
    first = tiny.tiny_model_dir("flux", build)
    mtime = first.stat().st_mtime_ns
    second = tiny.tiny_model_dir("flux", build)
    assert first == second == cache_root / f"flux-{tiny.builders_digest()}"
    assert len(calls) == 1
    assert second.stat().st_mtime_ns == mtime
    assert (first / "model_index.json").is_file()

    edited = shutil.copytree(Path(tiny.__file__).parent, tmp_path / "tiny", ignore=shutil.ignore_patterns("__pycache__"))
    assert tiny.source_digest(edited) == tiny.builders_digest()
    with open(edited / "flux.py", "a") as builder:
        builder.write("\n# an edited builder\n")
    assert tiny.source_digest(edited) != tiny.builders_digest()  # so it gets a fresh cache folder


def test_a_cold_cache_leaves_the_runs_random_numbers_alone(cache_root):
    """Builders seed torch's generator; training seeds it first, then builds what the cache lacks."""
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    tiny.tiny_model_dir("flux", flux.build)
    assert torch.equal(torch.rand(4), expected)


def test_crashed_builds_leave_nothing_behind(cache_root):
    target = cache_root / f"flux-{tiny.builders_digest()}"
    stale = cache_root / f"{target.name}.tmp-999999"  # from a build killed before its rename
    stale.mkdir()
    (stale / "model_index.json").write_text("{")

    def crashing_build(out_dir):
        (out_dir / "partial").write_text("x")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        tiny.tiny_model_dir("flux", crashing_build)
    assert not target.exists()
    assert not list(cache_root.glob("*.tmp-*"))

    stale.mkdir()
    assert tiny.tiny_model_dir("flux", flux.build) == target
    assert (target / flux.BFL_TRANSFORMER_FILE).is_file()
    assert not list(cache_root.glob("*.tmp-*"))


def test_concurrent_callers_build_once(cache_root):
    def slow_build(out_dir):
        time.sleep(0.2)
        (out_dir / "done").write_text("ok")

    build, calls = counting(slow_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(tiny.tiny_model_dir("flux", build))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(set(results)) == 1 and len(results) == 3
    assert (results[0] / "done").read_text() == "ok"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_models.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_script_finds_every_family_module_builders(tmp_path):
    result = run_script("--out", str(tmp_path), "not-a-family")
    assert result.returncode != 0
    known = result.stderr.strip().splitlines()[-1].split("known: ")[1].split(", ")
    assert set(known) == {"flux", "sdxl", "chroma", "qwen_image", "sd3", "lumina2", "hidream", "omnigen2",
                          "hunyuan_image", "ltx_video", "hunyuan_video", "cosmos_predict2", "cosmos",
                          *wan.TINY_MODELS}


def test_script_builds_into_out(tmp_path, flux_dir):
    result = run_script("--out", str(tmp_path), "flux")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"flux: {tmp_path / 'flux'}"
    assert relative_files(tmp_path / "flux") == relative_files(flux_dir)


def test_flux_bfl_file_holds_the_folder_transformer(flux_dir):
    from diffusers import FluxTransformer2DModel

    from difftrain.formats.flux import load_bfl_transformer

    folder_model = FluxTransformer2DModel.from_pretrained(flux_dir, subfolder="transformer", local_files_only=True)
    bfl_model = load_bfl_transformer(str(flux_dir / flux.BFL_TRANSFORMER_FILE), flux_dir, torch.float32)
    expected = folder_model.state_dict()
    for key, tensor in bfl_model.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
