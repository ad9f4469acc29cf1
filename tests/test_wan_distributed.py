"""The command users type most, as a test: `python train.py model=wan22_low dataset=videos trainer.devices=2` with
the tiny model, on CPU: two DDP processes (gloo) share the caching (no rank encodes what another did, nobody
hangs), both train, one ComfyUI LoRA is written; a second run finds everything cached."""
import os
import subprocess
import sys

from safetensors.torch import load_file

from difftrain.modules.wan import LORA_FILE
from tests.conftest import ROOT
from tests.test_distributed import encoded_counts

EXAMPLE_VIDEOS = 4


def headline(run_dir, cache_dir):
    result = subprocess.run(
        [sys.executable, "train.py", "model=wan22_low", "dataset=videos", "trainer.devices=2", "model.tiny=true",
         "trainer.max_steps=2", "logger=none", f"hydra.run.dir={run_dir}", f"dataset.cache_dir={cache_dir}"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout  # Hydra's console handler
    return [encoded_counts(run_dir / "train.log"), encoded_counts(run_dir / "train_ddp_process_1.log")]


def test_wan22_low_on_two_processes_caches_once_trains_and_exports_one_comfyui_lora(tmp_path):
    per_rank = headline(tmp_path / "first", tmp_path / "cache")
    assert all(latents > 0 for latents, _ in per_rank), per_rank  # both ranks shared the work
    assert sum(latents for latents, _ in per_rank) == EXAMPLE_VIDEOS  # each clip encoded once
    assert sum(captions for _, captions in per_rank) == EXAMPLE_VIDEOS
    exports = tmp_path / "first" / "exports"
    assert sorted(p.name for p in exports.iterdir()) == ["final", "first.safetensors"]  # written once
    lora = load_file(exports / "final" / LORA_FILE)
    assert lora and all(k.startswith("diffusion_model.blocks.") for k in lora)

    assert headline(tmp_path / "second", tmp_path / "cache") == [(0, 0), (0, 0)]  # all cached
