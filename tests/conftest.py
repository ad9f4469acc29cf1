"""Shared fixtures: configs composed exactly as train.py composes them, runs in temporary folders, and tiny
models built once per session into a temporary cache (so CI always exercises the builders)."""
import os

# One math thread per process: the tiny models gain nothing from more, and on a busy machine (or with two DDP
# processes on two cores) spinning OpenMP threads made every step several times slower. Set before torch loads;
# subprocesses (train.py runs, DDP ranks) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import difftrain.config  # resolvers

ROOT = Path(__file__).resolve().parents[1]
if difftrain.config.PROJECT_ROOT != ROOT:  # an editable install of another checkout would be tested instead
    raise ImportError(f"difftrain is imported from {difftrain.config.PROJECT_ROOT}: run `pip install -e .` in {ROOT}")
EXAMPLE_IMAGES = ROOT / "data" / "examples" / "images"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def tiny_model_cache(tmp_path_factory):
    if "DIFFTRAIN_TINY_DIR" not in os.environ:
        os.environ["DIFFTRAIN_TINY_DIR"] = str(tmp_path_factory.mktemp("tiny-models"))
    return Path(os.environ["DIFFTRAIN_TINY_DIR"])


def compose_config(run_dir: Path, *overrides: str) -> DictConfig:
    """The config train.py would see for these overrides, writing into run_dir."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"run_dir={run_dir}", f"outputs_root={run_dir.parent}",
                                           f"dataset.cache_dir={run_dir.parent / 'cache'}", "logger=none",
                                           "trainer.enable_progress_bar=false",
                                           "trainer.enable_model_summary=false", *overrides])


@pytest.fixture
def make_config(tmp_path):
    def make(*overrides: str, run_name: str = "run") -> DictConfig:
        return compose_config(tmp_path / run_name, *overrides)
    return make
