"""Resuming, in-process: which checkpoint resume=auto picks, settings a resumed run refuses to change, a finished
run's missing final export, unreadable or malicious checkpoints, and what killed writers leave behind."""
import logging
import pickle
import resource
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftrain.config.errors import ConfigError
from difftrain.training import run
from difftrain.utils.checkpoint_io import AtomicCheckpointIO
from tests.conftest import compose_config

RUN = ("adapter.rank=4", "optimizer.lr=1e-2", "trainer.max_steps=4", "checkpoint_every_n_steps=2",
       "dataset.resolutions=[64]")
LORA = Path("exports") / "final" / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A folder of runs sharing one latent cache, holding `finished`: a run of RUN trained to its end."""
    folder = tmp_path_factory.mktemp("runs")
    run(compose_config(folder / "finished", *RUN))
    return folder


def copy_run(runs: Path, destination: Path) -> Path:
    """A copy of the finished run (and the shared cache beside it) in `destination`."""
    shutil.copytree(runs / "cache", destination.parent / "cache", dirs_exist_ok=True)
    return Path(shutil.copytree(runs / "finished", destination))


def assert_same_lora(actual: Path, expected: Path) -> None:
    actual, expected = load_file(actual), load_file(expected)
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


STALE_TEMPS = ("checkpoints/.last.ckpt.4242.tmp", "exports/.finished.safetensors.4242.tmp",
               "exports/.final.4242.tmp/x")


@pytest.fixture(scope="module")
def resumed_finished_run(runs, tmp_path_factory):
    """A run killed after its last checkpoint, before its final export, and the killed writers' temp files, then
    resumed with resume=<run dir>."""
    run_dir = copy_run(runs, tmp_path_factory.mktemp("killed") / "finished")
    shutil.rmtree(run_dir / "exports" / "final")
    (run_dir / "exports" / "finished.safetensors").unlink()
    for temp in STALE_TEMPS:
        (run_dir / temp).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / temp).write_bytes(b"half")
    run(compose_config(run_dir, *RUN, f"resume={run_dir}"))
    return run_dir


def test_resuming_a_finished_run_writes_its_missing_final_export(runs, resumed_finished_run):
    assert_same_lora(resumed_finished_run / LORA, runs / "finished" / LORA)
    assert_same_lora(resumed_finished_run / "exports" / "finished.safetensors", runs / "finished" / LORA)


def test_temp_files_of_killed_writers_are_removed_when_the_run_starts_again(resumed_finished_run):
    assert not [temp for temp in STALE_TEMPS if (resumed_finished_run / temp).exists()]
    assert not list(resumed_finished_run.rglob("*.tmp"))


def test_max_steps_0_writes_the_final_export_it_names(runs, caplog):
    with caplog.at_level(logging.INFO, logger="difftrain.training"):
        result = run(compose_config(runs / "zero", *RUN, "trainer.max_steps=0"))
    assert result.trainer.global_step == 0
    assert (runs / "zero" / LORA).is_file()
    named = [r.getMessage().removeprefix("Final export: ") for r in caplog.records if "Final export" in r.getMessage()]
    assert named and all(Path(path).exists() for path in named)


def test_resume_auto_continues_the_run_in_its_own_directory(runs, tmp_path):
    """Although another run of the same settings exists (the original), and without a second last.ckpt."""
    run_dir = copy_run(runs, tmp_path / "run")
    result = run(compose_config(run_dir, *RUN, "trainer.max_steps=6", "resume=auto",
                                f"outputs_root={runs.parent}"))
    assert result.trainer.ckpt_path == str(run_dir / "checkpoints" / "last.ckpt")
    assert result.trainer.global_step == 6
    assert [p.name for p in (run_dir / "checkpoints").glob("last*")] == ["last.ckpt"]


def test_resume_auto_takes_only_a_run_with_the_same_settings(runs, tmp_path, caplog):
    """A sweep's other job (another lr) ran later: its checkpoint is newer but not this run's."""
    mine = copy_run(runs, tmp_path / "job0")
    run(compose_config(tmp_path / "job1", *RUN, "optimizer.lr=5e-3", "trainer.max_steps=1",
                       "checkpoint_every_n_steps=1"))
    with caplog.at_level(logging.INFO, logger="difftrain.resume"):
        result = run(compose_config(tmp_path / "again", *RUN, "resume=auto"))
    assert result.trainer.ckpt_path == str(mine / "checkpoints" / "last.ckpt")
    assert any(str(mine) in r.getMessage() for r in caplog.records), "no line says which run is resumed"

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="difftrain.resume"):
        fresh = run(compose_config(tmp_path / "other", *RUN, "adapter.rank=8", "trainer.max_steps=0", "resume=auto"))
    assert fresh.trainer.ckpt_path is None
    assert any("adapter.rank" in r.getMessage() for r in caplog.records), "no line says why no run matched"


@pytest.mark.parametrize("change,key,stored,new", [
    ("optimizer.lr=1", "optimizer.lr", "0.01", "1"),
    ("adapter.rank=8", "adapter.rank", "4", "8"),
    ("model=sdxl_tiny", "model._target_", "FluxModule", "SDXLModule"),
])
def test_a_resumed_run_refuses_changed_settings_in_one_line(runs, tmp_path, change, key, stored, new):
    with pytest.raises(ConfigError) as error:
        run(compose_config(tmp_path / "run", *RUN, change, f"resume={runs / 'finished'}"))
    message = str(error.value)
    assert "\n" not in message and key in message and stored in message and new in message


def test_unreadable_resume_files_stop_the_run_in_one_line(tmp_path, make_config):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    for path in (garbage, tmp_path / "missing.ckpt"):
        with pytest.raises(ConfigError) as error:
            run(make_config(f"resume={path}"))
        assert "\n" not in str(error.value) and str(path) in str(error.value)


class RunsCode:
    """Unpickling it creates `marker`: what a malicious checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, make_config, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default no longer protects
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "global_step": 0, "payload": RunsCode(marker)}, crafted)
    with pytest.raises(ConfigError) as error:
        run(make_config(f"resume={crafted}"))
    assert "\n" not in str(error.value)
    with pytest.raises(pickle.UnpicklingError):
        AtomicCheckpointIO().load_checkpoint(crafted)  # Lightning's own load, should the check above be skipped
    assert not marker.exists()


def test_a_checkpoint_write_that_fails_keeps_the_old_one_and_leaves_no_temp_file(tmp_path):
    """A full disk, simulated by a file size limit."""
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))
    try:
        with pytest.raises((OSError, RuntimeError)):  # torch reports a failed write as RuntimeError
            io.save_checkpoint({"step": 2, "weights": torch.zeros(1_000_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert io.load_checkpoint(path) == {"step": 1}
