"""Sweeps: `hparams_search=lora_optuna` (hydra-optuna-sweeper) minimises the eval loss train.py returns; the launcher
configs (hydra-joblib-launcher, hydra-submitit-launcher) compose with the installed plugins."""
import csv
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class

from difftrain.config.errors import ConfigError
from difftrain.utils.sweep_jobs import require_objective
from tests.conftest import EXAMPLE_IMAGES, ROOT

TRIALS = 4


def compose_with_hydra(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def last_eval_loss(job_dir) -> float:
    with open(next(job_dir.rglob("metrics.csv"))) as file:
        return [float(row["heldout/loss"]) for row in csv.DictReader(file) if row.get("heldout/loss")][-1]


@pytest.fixture
def one_image(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in EXAMPLE_IMAGES.glob("00_*"):  # an image and its caption
        shutil.copy(path, folder)
    return folder


def test_optuna_search_minimises_the_eval_loss(tmp_path, one_image):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "train.py", "-m", "hparams_search=lora_optuna", f"hydra.sweeper.n_trials={TRIALS}",
         f"hydra.sweep.dir={sweep}", f"dataset.path={one_image}", f"dataset.cache_dir={tmp_path / 'cache'}",
         f"eval_datasets=[{{name:heldout,path:{one_image}}}]", "eval_before_first_step=false",
         "trainer.max_steps=1", "eval_every_n_steps=1", "dataset.resolutions=[64]", "logger=csv",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [last_eval_loss(sweep / str(trial)) for trial in range(TRIALS)]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(losses))
    assert len(set(losses)) == TRIALS  # each trial trained with its own sampled learning rate and rank


def test_optuna_search_without_eval_datasets_is_refused():
    cfg = compose_with_hydra("hparams_search=lora_optuna")
    HydraConfig.instance().set_config(cfg)
    try:
        with pytest.raises(ConfigError, match="eval_datasets"):
            require_objective(cfg)
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.parametrize("launcher, plugin_class", [("parallel", "JoblibLauncher"), ("slurm", "SlurmLauncher")])
def test_launcher_configs_compose_with_their_plugins(launcher, plugin_class):
    cfg = compose_with_hydra(f"hydra/launcher={launcher}", "trainer.num_nodes=2", "trainer.devices=4")
    assert get_class(cfg.hydra.launcher._target_).__name__ == plugin_class
    if launcher == "slurm":  # one SLURM task per rank, as Lightning's SLURM environment expects
        assert (cfg.hydra.launcher.nodes, cfg.hydra.launcher.tasks_per_node) == (2, 4)
