"""Config mistakes are one clear message naming the key and the fix, raised before anything heavy loads and
shown by train.py without a traceback; every config file in conf/ composes and validates."""
import os
import subprocess
import sys

import pytest
from hydra.utils import instantiate

from src.config.validate import ConfigError, validate
from tests.conftest import EXAMPLE_IMAGES, ROOT

MISTAKES = {
    "misspelled key": (["+model.flux_shfit=true"], ["'model.flux_shfit'", "Did you mean 'model.flux_shift'?"]),
    "wrong type": (["model.min_t=abc"], ["model.min_t='abc'", "expected float"]),
    "model path missing": (["model=flux"], ["model.diffusers_path is not set", "model.tiny=true"]),
    "nonexistent path": (["dataset.path=/no/such/folder"], ["dataset.path=/no/such/folder does not exist"]),
    "fp8 full fine-tune": (["model.transformer_dtype=float8", "adapter=none"],
                           ["model.transformer_dtype", "adapter=lora"]),
    "unknown optimizer kwarg": (["+optimizer.weight_decy=0.1"],
                                ["'optimizer.weight_decy'", "Did you mean 'optimizer.weight_decay'?"]),
    "unknown scheduler kwarg": (["+scheduler.warmup=10"], ["'scheduler.warmup'", "'scheduler.warmup_steps'"]),
    "optimizer not importable": (["optimizer._target_=torch.optim.AdamWW"],
                                 ["optimizer._target_=torch.optim.AdamWW cannot be imported"]),
    "typo in a directory entry": ([f"dataset.directories=[{{path: '{EXAMPLE_IMAGES}', num_repeat: 2}}]"],
                                  ["'dataset.directories[0].num_repeat'", "'dataset.directories[0].num_repeats'"]),
    "wrong type in a directory entry": ([f"dataset.directories=[{{path: '{EXAMPLE_IMAGES}', num_repeats: many}}]"],
                                        ["dataset.directories[0].num_repeats='many'", "expected int or null"]),
    "directory entry without path": (["dataset.directories=[{num_repeats: 2}]"],
                                     ["dataset.directories[0].path is required"]),
    "CLIP folder for a Wan without CLIP": (["model=wan22_low_i2v", "model.tiny=true", f"model.clip_path={ROOT}"],
                                           ["model.clip_path", "no CLIP image encoder", "Unset model.clip_path"]),
}


def assert_one_message(error: ConfigError, expected: list[str]) -> None:
    message = str(error)
    assert "\n" not in message, message
    for part in expected:
        assert part in message


@pytest.mark.parametrize("overrides, expected", MISTAKES.values(), ids=MISTAKES.keys())
def test_mistake_is_one_message_naming_the_key_and_the_fix(make_config, overrides, expected):
    with pytest.raises(ConfigError) as error:
        validate(make_config(*overrides))
    assert_one_message(error.value, expected)


def test_typo_in_an_experiment_file_is_reported(make_config, tmp_path):
    experiments = tmp_path / "my_conf" / "experiment"
    experiments.mkdir(parents=True)
    (experiments / "my_recipe.yaml").write_text("# @package _global_\nmodel:\n  min_t: 0.1\n  flux_shfit: true\n")
    cfg = make_config(f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "experiment=my_recipe")
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert_one_message(error.value, ["'model.flux_shfit'", "Did you mean 'model.flux_shift'?"])


def run_train_py(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", "logger=none", *overrides], cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mistake", ["misspelled key", "empty dataset folder"])
def test_train_py_prints_one_message_without_traceback(tmp_path, mistake):
    empty = tmp_path / "empty"
    empty.mkdir()
    override, first_line = {
        "misspelled key": ("+model.flux_shfit=true",
                           "Error: Unknown config key 'model.flux_shfit'. Did you mean 'model.flux_shift'?"),
        "empty dataset folder": (f"dataset.path={empty}",
                                 f"Error: The dataset is empty: no usable image with a caption in {empty}."),
    }[mistake]
    result = run_train_py(override, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(first_line), result.stderr[-2000:]


VALIDATE_AND_LIST_HEAVY_MODULES = """
import sys
from pathlib import Path
from tests.conftest import compose_config
from src.config.validate import validate
validate(compose_config(Path(sys.argv[1])))
print(sorted(m for m in ("diffusers", "transformers", "lightning", "peft") if m in sys.modules))
"""


def test_validation_loads_no_model_library(tmp_path):
    result = subprocess.run([sys.executable, "-c", VALIDATE_AND_LIST_HEAVY_MODULES, str(tmp_path / "run")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def every_config_option() -> list[str]:
    """`group=option` for every file of every config group in conf/."""
    return [f"{group.name}={option.stem}" for group in sorted(p for p in (ROOT / "conf").iterdir() if p.is_dir())
            for option in sorted(group.glob("*.yaml"))]


@pytest.mark.parametrize("option", every_config_option())
def test_every_config_file_composes_and_validates(make_config, option):
    # Stand-ins for what the user must supply: a model folder (model=flux alone asks for model.diffusers_path)
    # and a dataset folder (dataset=images alone asks for dataset.path).
    cfg = make_config(option, "model.tiny=true", f"dataset.path={EXAMPLE_IMAGES}")
    validate(cfg)
    # validate() checks everything but the Trainer and logger arguments: building them checks those.
    loggers = [instantiate(logger) for logger in (cfg.logger or {}).values()]
    instantiate(cfg.trainer, logger=loggers or False)
