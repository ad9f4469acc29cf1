"""The README's demo command, end to end, in a subprocess exactly as a user runs it."""
import logging
import os
import subprocess
import sys

from diffusers import FluxPipeline

from difftrain.tiny import flux as tiny_flux
from difftrain.tiny import tiny_model_dir
from tests.conftest import ROOT


def test_demo_trains_a_lora_that_diffusers_loads(tmp_path, caplog):
    """Started from another directory: everything it writes (run folder, cache) lands under that directory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [final] = tmp_path.glob("outputs/*/*/exports/final")
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    assert (final / "config.yaml").is_file()
    assert list(tmp_path.glob("outputs/cache/example/*"))
    output = result.stdout + result.stderr
    assert "Epoch 9" in output  # the progress bar ran through the demo's 10 epochs
    assert sum("Seed set to 42" in line for line in output.splitlines()) == 1  # each Lightning log line once

    pipe = FluxPipeline.from_pretrained(tiny_model_dir("flux", tiny_flux.build), local_files_only=True)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(final)
    messages = [r.getMessage() for r in caplog.records]
    problems = [m for m in messages if "led to unexpected keys" in m or "led to missing keys" in m
                or ("No LoRA keys" in m and "Transformer" in m)]
    assert problems == []
    assert sum(1 for _, m in pipe.transformer.named_modules() if hasattr(m, "lora_A")) == 40
