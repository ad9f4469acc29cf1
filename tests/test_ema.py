"""EMA of the trainable weights and checkpoints by time, on shared tiny Flux LoRA runs: the EMA exports against a
hand computation from the raw exports, a resumed run's EMA against an uninterrupted one's, and the checkpoint files a
tiny time interval (a checkpoint after every step, whatever the machine's speed) leaves on disk."""
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftrain.training import run
from tests.conftest import compose_config

DECAY = 0.5
RUN = ("optimizer.lr=1e-2", "dataset.resolutions=[64]", "trainer.max_steps=4",
       "save_every_n_steps=1", "save_every_n_epochs=null", f"ema_decay={DECAY}", "ema_every_n_steps=2",
       "checkpoint_every_n_steps=null", "checkpoint_every_n_minutes=1e-9", "export_name=lora")
LORA_RUN = ("adapter.rank=4", *RUN)
LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """`whole`: LORA_RUN trained to step 4 keeping 2 checkpoints; `resumed`: LORA_RUN stopped at step 2, then resumed to 4,
    keeping every checkpoint; `full`: a 2-step full fine-tune with EMA."""
    folder = tmp_path_factory.mktemp("ema")
    run(compose_config(folder / "full", *RUN, "adapter=none", "trainer.max_steps=2", "save_every_n_steps=null",
                       "save_every_n_epochs=1", "ema_every_n_steps=1"))  # exports: the final one only
    run(compose_config(folder / "whole", *LORA_RUN, "keep_last_n_checkpoints=2"))
    resumed = (*LORA_RUN, "keep_last_n_checkpoints=null")
    run(compose_config(folder / "resumed", *resumed, "trainer.max_steps=2"))
    run(compose_config(folder / "resumed", *resumed, f"resume={folder / 'resumed'}"))
    return folder


def exported(run_dir: Path, point: str, ema: bool) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "exports" / point / ("ema" if ema else "") / LORA)


def test_ema_export_is_the_average_of_the_raw_exports(runs):
    """Updates at steps 2 and 4: the first copies the weights, the second averages them with decay."""
    whole = runs / "whole"
    raw = {step: exported(whole, f"step{step}", ema=False) for step in (2, 4)}
    ema = {step: exported(whole, f"step{step}", ema=True) for step in (2, 3, 4)}
    assert ema[2].keys() == raw[2].keys()
    for key in raw[2]:
        assert torch.equal(ema[2][key], raw[2][key])
        assert torch.equal(ema[3][key], ema[2][key])  # no update at step 3
        expected = DECAY * raw[2][key] + (1 - DECAY) * raw[4][key]
        torch.testing.assert_close(ema[4][key], expected, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(ema[4][key], raw[4][key]) for key in raw[4])


def test_ema_flat_files_match_the_ema_folders(runs):
    exports = runs / "whole" / "exports"
    for flat, point in (("lora_step00004_ema", "step4"), ("lora_ema", "final")):
        flat_file, folder_file = load_file(exports / f"{flat}.safetensors"), exported(runs / "whole", point, ema=True)
        assert flat_file.keys() == folder_file.keys()
        assert all(torch.equal(flat_file[key], folder_file[key]) for key in folder_file)


def test_a_resumed_run_ends_with_the_uninterrupted_runs_ema(runs):
    for ema in (False, True):
        resumed, whole = exported(runs / "resumed", "final", ema), exported(runs / "whole", "final", ema)
        assert resumed.keys() == whole.keys()
        assert all(torch.equal(resumed[key], whole[key]) for key in whole)


def test_a_full_fine_tune_exports_its_ema_in_the_same_format(runs):
    final = runs / "full" / "exports" / "final"
    raw_files = sorted(p.relative_to(final) for p in final.rglob("*.safetensors") if "ema" not in p.parts)
    assert raw_files and sorted(p.relative_to(final / "ema") for p in (final / "ema").rglob("*.safetensors")) == raw_files
    for file in raw_files:
        raw, ema = load_file(final / file), load_file(final / "ema" / file)
        assert raw.keys() == ema.keys()
        assert any(not torch.equal(raw[key], ema[key]) for key in raw)


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of the checkpoints by time in the run's checkpoints folder."""
    names = [path.name for path in (run_dir / "checkpoints").iterdir()]
    assert "last.ckpt" in names
    return sorted(int(re.fullmatch(r"epoch=\d+-step=(\d+)-timed\.ckpt", name)[1]) for name in names
                  if name != "last.ckpt")


def test_checkpoints_by_time_keep_the_newest_n(runs):
    assert checkpoint_steps(runs / "whole") == [3, 4]
    assert checkpoint_steps(runs / "resumed") == [1, 2, 3, 4]  # keep_last_n_checkpoints=null: every one
