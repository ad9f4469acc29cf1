"""Dashboards tell runs apart: the resolved config goes to TensorBoard hparams and the W&B config (environment values
hidden), and sweep jobs are named after their swept values, in their folders, TensorBoard runs, W&B runs and exports."""
import os
import subprocess
import sys

import yaml
from lightning.pytorch.loggers import WandbLogger
from omegaconf import OmegaConf

from difftrain.config.naming import sweep_job_name
from difftrain.dashboards import HIDDEN, dashboard_config
from difftrain.training import run
from tests.conftest import ROOT

FAST = ("dataset.resolutions=[64]", "trainer.max_steps=1", "checkpoint_every_n_steps=null")
SECRET = "s3cr3t-from-the-environment"


def test_tensorboard_and_wandb_get_the_resolved_config_without_environment_values(make_config, monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFTRAIN_TEST_SECRET", SECRET)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = make_config(*FAST, "optimizer.lr=3e-4", "dataset.caption_prefix=${oc.env:DIFFTRAIN_TEST_SECRET}",
                      "logger=[tensorboard,wandb]", "logger.wandb.offline=true")
    result = run(cfg)
    run_dir = result.final_export.parents[1]

    hparams = yaml.safe_load((run_dir / "tensorboard" / "hparams.yaml").read_text())
    assert hparams == dashboard_config(cfg)
    assert hparams["optimizer"]["lr"] == 3e-4 and hparams["adapter"]["rank"] == cfg.adapter.rank
    assert hparams["dataset"]["caption_prefix"] == HIDDEN
    wandb_run = next(logger for logger in result.trainer.loggers if isinstance(logger, WandbLogger)).experiment
    assert wandb_run.config["optimizer"]["lr"] == 3e-4 and wandb_run.config["dataset"]["caption_prefix"] == HIDDEN
    for written in (run_dir / "tensorboard").iterdir():
        assert SECRET.encode() not in written.read_bytes(), written


def test_sweep_job_names_come_from_the_swept_values():
    command = ["-m", "optimizer.lr=1e-4,1e-3", "adapter.rank=16,32", "dataset.path=/data/x", "model=flux_tiny"]
    job = ["optimizer.lr=1e-4", "adapter.rank=16", "dataset.path=/data/x", "model=flux_tiny"]
    assert sweep_job_name(3, job, command) == "lr=1e-4,rank=16"
    assert sweep_job_name(3, ["model=flux_tiny"], ["-m", "model=flux_tiny"]) == "3"
    named = OmegaConf.create({"run_dir": "/runs/sweep/lr=1e-4,rank=16", "name": "${path_name:${run_dir}}"})
    assert named.name == "lr=1e-4,rank=16"  # the W&B run name (conf/logger/wandb.yaml)


def test_a_two_job_sweep_gets_named_folders_tensorboard_runs_and_exports(tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "train.py", "-m", "optimizer.lr=1e-3,1e-2", *FAST, "trainer.enable_progress_bar=false",
         f"hydra.sweep.dir={sweep}", f"dataset.cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["lr=0.001", "lr=0.01"]
    for job in jobs:
        assert list((sweep / job / "tensorboard").glob("events.out.tfevents.*"))  # the TensorBoard run <job>/...
        assert (sweep / job / "exports" / f"{job.replace('=', '-')}.safetensors").is_file()
        assert yaml.safe_load((sweep / job / "tensorboard" / "hparams.yaml").read_text())["optimizer"]["lr"] == float(
            job.split("=")[1])
