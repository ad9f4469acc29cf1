"""A run interrupted again and again, as the real command line: SIGTERM (a scheduler's preemption), Ctrl-C, then
SIGKILLs at seeded random moments, some while a checkpoint or an export is being written. Each launch resumes
with resume=<run dir>; the run ends with the uninterrupted run's LoRA, bit for bit.

All interruptions fall within the first epoch (8 example images, batch 1, 6 steps)."""
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftrain.tiny import flux as tiny_flux
from difftrain.tiny import tiny_model_dir
from difftrain.training import run
from tests.conftest import ROOT, compose_config

MAX_STEPS = 6
RUN = ("adapter.rank=4", "optimizer.lr=1e-2", "scheduler=cosine", "scheduler.warmup_steps=1",
       f"trainer.max_steps={MAX_STEPS}", "dataset.resolutions=[64]", "checkpoint_every_n_steps=1",
       "save_every_n_steps=1")
RARE_CHECKPOINTS = "checkpoint_every_n_steps=100"  # so that only the signal writes a checkpoint
LORA = Path("exports") / "final" / "pytorch_lora_weights.safetensors"
TEMP = re.compile(r"\..+\.\d+\.tmp")
STEP_EXPORT = re.compile(r".+_step(\d+)\.safetensors")


@dataclass
class Interruption:
    signal: signal.Signals
    after_step: int  # sent once this launch has exported this step (or a later one)
    during_write_in: str = ""  # and, if set, while a temp file exists in this folder of the run
    returncode: int | None = None  # None: the launch finished before the moment came
    temps_at_signal: list[str] = field(default_factory=list)


def plan(seed: int) -> list[Interruption]:
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(1, MAX_STEPS), 4))
    return [Interruption(signal.SIGTERM, steps[0]), Interruption(signal.SIGINT, steps[1]),
            Interruption(signal.SIGKILL, steps[2], rng.choice(["checkpoints", "exports"])),
            Interruption(signal.SIGKILL, steps[3], rng.choice(["checkpoints", "exports"])),
            Interruption(signal.SIGKILL, MAX_STEPS, "exports")]  # while writing the final export


def launch(run_dir: Path, cache: Path, *overrides: str) -> subprocess.Popen:
    resume = run_dir if (run_dir / "checkpoints" / "last.ckpt").exists() else "null"
    with open(run_dir.parent / f"{run_dir.name}-launch-{time.monotonic_ns()}.log", "w") as log:
        return subprocess.Popen([sys.executable, "train.py", *RUN, f"hydra.run.dir={run_dir}", f"resume={resume}",
                                 f"dataset.cache_dir={cache}", f"outputs_root={run_dir.parent}", "logger=none",
                                 "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                                 *overrides],
                                cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log,
                                stderr=subprocess.STDOUT)


def temps(folder: Path) -> list[str]:
    return [entry.name for entry in os.scandir(folder) if TEMP.fullmatch(entry.name)] if folder.is_dir() else []


def newest_step_exported(run_dir: Path, since_ns: int) -> int:
    exports = run_dir / "exports"
    steps = [int(match[1]) for entry in (os.scandir(exports) if exports.is_dir() else [])
             if (match := STEP_EXPORT.fullmatch(entry.name)) and entry.stat().st_mtime_ns >= since_ns]
    return max(steps, default=0)


def interrupt(process: subprocess.Popen, run_dir: Path, moment: Interruption) -> None:
    """Polls the run's files until the moment comes, then signals; records how the process ended."""
    started, signalled = time.time_ns(), False
    while not signalled and process.poll() is None:
        reached = newest_step_exported(run_dir, started) >= moment.after_step
        if reached and (not moment.during_write_in or temps(run_dir / moment.during_write_in)):
            moment.temps_at_signal = temps(run_dir / "checkpoints") + temps(run_dir / "exports")
            process.send_signal(moment.signal)
            signalled = True
        time.sleep(0.0005)
    returncode = process.wait(timeout=600)
    moment.returncode = returncode if signalled else None


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """The interruptions, the run's final LoRA after a last resume, and the uninterrupted run's."""
    folder = tmp_path_factory.mktemp("faults")
    tiny_model_dir("flux", tiny_flux.build)
    reference = folder / "uninterrupted"
    run(compose_config(reference, *RUN))  # also fills the latent cache the launches share
    run_dir = folder / "interrupted"
    run_dir.mkdir()
    moments = plan(seed=15)
    checkpoint_steps = []
    for moment in moments:
        rare = (RARE_CHECKPOINTS,) if moment.signal != signal.SIGKILL else ()
        interrupt(launch(run_dir, folder / "cache", *rare), run_dir, moment)
        checkpoint_steps.append(_checkpoint_step(run_dir))
        if moment.returncode is None:
            break  # the launch trained to the end before the moment came
    run(compose_config(run_dir, *RUN, f"resume={run_dir}"))
    return moments, checkpoint_steps, run_dir, reference


def _checkpoint_step(run_dir: Path) -> int:
    last = run_dir / "checkpoints" / "last.ckpt"
    return torch.load(last, weights_only=True, mmap=True)["global_step"] if last.exists() else -1


def test_sigterm_and_ctrl_c_stop_with_a_resumable_checkpoint_and_a_failure_status(interrupted):
    moments, checkpoint_steps, _, _ = interrupted
    for moment, step in zip(moments[:2], checkpoint_steps):
        assert moment.returncode == 128 + moment.signal, moment
        assert step >= moment.after_step, f"{moment.signal.name}: checkpoint of step {step}"


def test_killed_at_random_moments_the_run_ends_with_the_uninterrupted_lora(interrupted):
    moments, _, run_dir, reference = interrupted
    kills = [m for m in moments if m.signal == signal.SIGKILL and m.returncode is not None]
    assert kills and all(m.returncode == -signal.SIGKILL for m in kills)
    assert any(m.temps_at_signal for m in kills), "no kill landed while a checkpoint or export was written"
    expected, actual = load_file(reference / LORA), load_file(run_dir / LORA)
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    assert not list(run_dir.rglob("*.tmp")), "a killed writer's temp file outlived the resumes"
