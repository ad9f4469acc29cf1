"""Config mistakes are one clear message naming the key and the fix, raised before anything heavy loads and
shown by train.py without a traceback; every config file in conf/ composes and validates."""
import os
import subprocess
import sys
from typing import Annotated, Literal, Optional

import pytest
import torch
from hydra.utils import instantiate

from difftrain.config.family import model_keys
from difftrain.config.keys import ModelPath
from difftrain.config.validate import ConfigError, validate
from difftrain.modules.flux import FluxModule
from difftrain.modules.wan import WanModule
from tests.conftest import EXAMPLE_IMAGES, ROOT


class LeafFamily(FluxModule):
    """A family declared here, in a test file: its config keys come from this constructor and the ones it passes
    **keys to (Flux's, then DiffusionModule's)."""

    def __init__(self, leaf_path: Annotated[Optional[str], ModelPath(
                     "the leaf weights", example="/models/leaf.safetensors", required=True)] = None,
                 leaf_mode: Literal["fast", "slow"] = "fast", guidance=2.5, **keys):
        super().__init__(guidance=guidance, **keys)
        self.leaf_path, self.leaf_mode = leaf_path, leaf_mode


LEAF_CLASS = "tests.test_config.LeafFamily"  # as train.py names it (pytest may import this file as test_config)
LEAF = [f"model._target_={LEAF_CLASS}", f"+model.leaf_path={ROOT}"]

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
    "not a choice": (["model.dtype=float64"],
                     ["model.dtype=float64 is not valid (a compute dtype)", "Choose one of: float32, float16, bfloat16"]),
    "not a choice, explained": (["model.activation_checkpointing=sometimes"],
                                ["model.activation_checkpointing=sometimes is not valid", "Choose true (recompute"]),
    "Wan variant": (["model=wan21_t2v", "model.tiny=true", "model.variant=wan3"],
                    ["model.variant=wan3 is not valid (the Wan model)", "wan21_t2v", "wan22_5b"]),
    "model path that does not exist": (["model=sdxl", "model.checkpoint_path=/no/such.safetensors"],
                                       ["model.checkpoint_path=/no/such.safetensors does not exist",
                                        "It should be the original single-file checkpoint."]),
    "unknown family class": (["model._target_=difftrain.modules.flux.FluxModel"],
                             ["model._target_=difftrain.modules.flux.FluxModel", "difftrain.modules.flux has no class FluxModel"]),
    "unknown family module": (["model._target_=difftrain.modules.flax.FluxModule"], ["no module difftrain.modules.flax"]),
    "typo in a test file family's key": ([*LEAF, "+model.leaf_mod=slow"],
                                         ["'model.leaf_mod'", "Did you mean 'model.leaf_mode'?"]),
    "not a choice of a test file family": ([*LEAF, "+model.leaf_mode=medium"],
                                           ["model.leaf_mode=medium is not valid. Choose one of: fast, slow."]),
    "required path of a test file family": ([*LEAF[:1], "model.tiny=false", f"model.diffusers_path={ROOT}"],
                                            ["model.leaf_path is not set. Point it at the leaf weights "
                                             "(model.leaf_path=/models/leaf.safetensors), or use model.tiny=true"]),
    "added key with a typo": (["+model.diffuser_path=/x"], ["Did you mean 'model.diffusers_path'?"]),
    "negative learning rate": (["optimizer.lr=-1e-4"], ["optimizer.lr=-0.0001 is out of range", ">= 0"]),
    "rank 0": (["adapter.rank=0"], ["adapter.rank=0 is out of range", ">= 1"]),
    "dropout above 1": (["adapter.dropout=1.5"], ["adapter.dropout=1.5 is out of range", "between 0 and 1"]),
    "resolution 0": (["dataset.resolutions=[0]"], ["dataset.resolutions[0]=0 is not a resolution", "[width, height]"]),
    "resolution of a directory": ([f"dataset.directories=[{{path: '{EXAMPLE_IMAGES}', resolutions: [[512, 0]]}}]"],
                                  ["dataset.directories[0].resolutions[0]=[512, 0] is not a resolution"]),
    "dataset path that is a file": ([f"dataset.path={EXAMPLE_IMAGES / '00_red_circle.jpg'}"],
                                    ["00_red_circle.jpg is a file. It should be a folder of images"]),
    "batch size 0": (["dataset.batch_size=0"], ["dataset.batch_size=0 is out of range"]),
    "scheduler name typo": (["scheduler.name=cosin"], ["scheduler.name=cosin is not valid", "constant, linear, cosine"]),
    "negative warmup": (["scheduler.warmup_steps=-10"], ["scheduler.warmup_steps=-10 is out of range"]),
    "adapter dtype float64": (["adapter.dtype=float64"],
                              ["adapter.dtype=float64 is not valid", "float32, bfloat16, float16"]),
    "trainer key not a number": (["trainer.max_steps=ten"], ["trainer.max_steps='ten'", "expected int"]),
    "negative max_epochs": (["trainer.max_epochs=-5"], ["trainer.max_epochs=-5 is out of range", "-1: no limit"]),
    "negative devices": (["trainer.devices=-2"], ["trainer.devices=-2 is not valid", "-1 (all of them)"]),
    "trainer key typo": (["+trainer.max_step=3"], ["'trainer.max_step'", "Did you mean 'trainer.max_steps'?"]),
    "trainer class typo": (["trainer._target_=lightning.Trainr"], ["trainer._target_=lightning.Trainr is not a class"]),
    **{f"negative {key}": ([f"{key}=-1"], [f"{key}=-1 is out of range: use a number >= 1, or null"])
       for key in ("checkpoint_every_n_steps", "save_every_n_steps", "save_every_n_epochs", "eval_every_n_steps",
                   "sample_every_n_steps")},
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


def test_edge_values_that_work_pass(make_config):
    validate(make_config("optimizer.lr=0", "trainer.devices=-1", "trainer.max_steps=-1", "keep_last_n_exports=0",
                         "adapter.dropout=1", "dataset.resolutions=[[768, 512], 64]", "checkpoint_every_n_steps=null"))


def test_typo_in_an_experiment_file_is_reported(make_config, tmp_path):
    experiments = tmp_path / "my_conf" / "experiment"
    experiments.mkdir(parents=True)
    (experiments / "my_recipe.yaml").write_text("# @package _global_\nmodel:\n  min_t: 0.1\n  flux_shfit: true\n")
    cfg = make_config(f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "experiment=my_recipe")
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert_one_message(error.value, ["'model.flux_shfit'", "Did you mean 'model.flux_shift'?"])


def test_a_family_in_a_test_file_gets_its_keys_from_its_constructors(make_config):
    keys = model_keys(LEAF_CLASS)
    assert {"dtype", "min_t", "diffusers_path", "guidance", "leaf_path", "leaf_mode"} <= set(keys)
    assert not {"adapter", "optimizer", "scheduler", "eval_names", "seed"} & set(keys)  # the trainer's
    assert keys["guidance"].default == 2.5 and keys["timestep_sample_method"].default == "logit_normal"
    cfg = make_config(*LEAF, "+model.leaf_mode=slow")
    validate(cfg)
    module = instantiate(cfg.model, _recursive_=False)
    assert (module.leaf_mode, module.leaf_path, module.tiny) == ("slow", str(ROOT), True)


def test_a_subclass_default_keeps_the_base_rules(make_config):
    keys = model_keys("difftrain.modules.sdxl.SDXLModule")
    assert keys["timestep_sample_method"].default == "uniform"  # SDXL's, with DiffusionModule's choices
    with pytest.raises(ConfigError) as error:
        validate(make_config("model=sdxl_tiny", "model.timestep_sample_method=normal"))
    assert_one_message(error.value, ["model.timestep_sample_method=normal is not valid", "logit_normal, uniform"])


def test_family_cross_checks_are_config_errors_of_its_constructor():
    with pytest.raises(ConfigError) as error:
        WanModule(variant="wan22_low_i2v", tiny=True, clip_path=str(ROOT))
    assert_one_message(error.value, ["model.clip_path", "no CLIP image encoder", "Unset model.clip_path"])


def run_train_py(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", "logger=none", *overrides], cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)


def assert_error_without_traceback(result: subprocess.CompletedProcess, first_line: str) -> list[str]:
    """The stderr lines of a run that failed with `first_line` as its last line and no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(first_line), result.stderr[-2000:]
    return lines


@pytest.mark.parametrize("mistake", ["empty dataset folder", "family constructor check"])
def test_train_py_prints_one_message_without_traceback(tmp_path, mistake):
    empty = tmp_path / "empty"
    empty.mkdir()
    overrides, first_line = {
        "empty dataset folder": ([f"dataset.path={empty}"],
                                 f"Error: The dataset is empty: no usable image with a caption in {empty}."),
        "family constructor check": (["model=wan22_low_i2v", "model.tiny=true", f"model.clip_path={ROOT}"],
                                     f"Error: model.clip_path={ROOT} would be ignored"),
    }[mistake]
    assert_error_without_traceback(run_train_py(*overrides, f"hydra.run.dir={tmp_path / 'run'}"), first_line)


@pytest.mark.parametrize("overrides, first_line", [
    (["+model.flux_shfit=true"], "Error: Unknown config key 'model.flux_shfit'. Did you mean 'model.flux_shift'?"),
    # Hydra refuses to override a key the config does not have, before validation runs.
    (["model.diffuser_path=/x"],
     "Error: Unknown config key 'model.diffuser_path'. Did you mean 'model.diffusers_path'?"),
    (["model=sdxl_tiny", "model.transformer_dtype=float8"],
     "Error: 'model.transformer_dtype' is a valid key that the selected model config leaves unset, so the command "
     "line must add it: write '+model.transformer_dtype=...'."),
    (["adapter.rank=0"], "Error: adapter.rank=0 is out of range"),
], ids=["misspelled key", "command-line typo", "key the family's file leaves out", "out of range"])
def test_config_mistake_is_the_only_line_train_py_prints(tmp_path, overrides, first_line):
    result = run_train_py(*overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert len(assert_error_without_traceback(result, first_line)) == 1, result.stderr[-2000:]


VALIDATE_AND_LIST_HEAVY_MODULES = """
import sys
from pathlib import Path
from tests.conftest import compose_config
from difftrain.config.validate import validate
validate(compose_config(Path(sys.argv[1]), *sys.argv[2:]))
print(sorted(m for m in ("diffusers", "transformers", "lightning", "peft") if m in sys.modules))
"""


@pytest.mark.parametrize("family", [[], LEAF], ids=["flux", "family in a test file"])
def test_validation_loads_no_model_library(tmp_path, family):
    result = subprocess.run([sys.executable, "-c", VALIDATE_AND_LIST_HEAVY_MODULES, str(tmp_path / "run"), *family],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def every_config_option() -> list[str]:
    """`group=option` for every file of every config group in conf/."""
    return [f"{group.name}={option.stem}" for group in sorted(p for p in (ROOT / "conf").iterdir() if p.is_dir())
            for option in sorted(group.glob("*.yaml"))]


@pytest.mark.parametrize("option", every_config_option())
def test_every_config_file_composes_and_validates(make_config, option):
    # Stand-ins for what the user must supply: a model folder (model=flux alone asks for model.diffusers_path)
    # and a dataset folder (dataset=images alone asks for dataset.path) or shards (remote: not opened here).
    dataset = "dataset.shards=https://example.com/shard-000000.tar" if option == "dataset=webdataset" else \
        f"dataset.path={EXAMPLE_IMAGES}"
    cfg = make_config(option, "model.tiny=true", dataset)
    if option == "trainer=deepspeed" and not torch.cuda.is_available():  # what it says here: tests/test_fsdp.py
        with pytest.raises(ConfigError, match="CUDA GPUs only"):
            validate(cfg)
        return
    validate(cfg)
    # validate() checks everything but the Trainer and logger arguments: building them checks those.
    loggers = [instantiate(logger) for logger in (cfg.logger or {}).values()]
    instantiate(cfg.trainer, logger=loggers or False)
