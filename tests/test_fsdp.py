"""trainer=fsdp (FSDP2) and the strategy presets. Two processes on CPU (gloo), launched by the real command line,
full fine-tune: every trainable weight is sharded across the ranks, the weights after 3 steps are DDP's (same global
batch), the sharded checkpoint resumes to the uninterrupted run's weights, and the export is DDP's; a LoRA on an fp8
base: sharded, exported whole. The same LoRA under FSDP in one process: the plain run's weights, exact resume.
Other strategies, and what sharding cannot combine with, are one-line config errors before anything loads."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning import Callback
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from difftrain.config.validate import ConfigError
from difftrain.training import run
from tests.conftest import ROOT


class ShardReport(Callback):
    """Writes <out_dir>/rank<r>.json: per trainable weight, whether it is a DTensor, its shape and the elements
    this rank holds (passed to train.py as an extra callback)."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_start(self, trainer, module) -> None:
        report = {name: {"sharded": isinstance(p, DTensor), "shape": list(p.shape),
                         "local": (p.to_local() if isinstance(p, DTensor) else p).numel()}
                  for name, p in module.named_parameters() if p.requires_grad}
        self.out_dir.mkdir(exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def train_two_processes(run_dir: Path, *overrides: str) -> Path:
    """A 3-step run (a full fine-tune unless the overrides name an adapter) on 2 CPU processes; returns its final
    export folder."""
    result = subprocess.run(
        [sys.executable, "train.py", "trainer.devices=2", "trainer.accelerator=cpu", "adapter=none",
         "trainer.max_steps=3", "dataset.resolutions=[64]", "logger=none", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false", f"hydra.run.dir={run_dir}",
         f"dataset.cache_dir={run_dir.parent / 'cache'}", *overrides],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "exports" / "final"


def export_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file of an export, keyed by file and tensor name."""
    return {f"{path.relative_to(folder)}:{key}": tensor for path in sorted(folder.rglob("*.safetensors"))
            for key, tensor in load_file(path).items()}


def shard_report(out_dir: Path) -> str:
    return f"+callbacks.shards={{_target_:tests.test_fsdp.ShardReport,out_dir:'{out_dir}'}}"


def assert_halved_between_ranks(shards: Path) -> dict[str, dict]:
    """Every trainable weight split between the two ranks' reports, each element on exactly one rank; returns rank
    0's report."""
    ranks = [json.loads((shards / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] and ranks[0].keys() == ranks[1].keys()
    for name, weight in ranks[0].items():
        whole = math.prod(weight["shape"])
        assert weight["sharded"] and ranks[1][name]["sharded"], name
        assert weight["local"] + ranks[1][name]["local"] == whole, name  # each element on exactly one rank
        assert weight["local"] <= math.ceil(weight["shape"][0] / 2) * whole // weight["shape"][0], name
    held = [sum(w["local"] for w in rank.values()) for rank in ranks]
    assert held[0] / sum(held) == pytest.approx(0.5, abs=0.02)
    return ranks[0]


def test_fsdp_two_processes_shards_every_weight_matches_ddp_and_resumes_exactly(tmp_path):
    fsdp = train_two_processes(tmp_path / "fsdp", "trainer=fsdp", "checkpoint_every_n_steps=2",
                               shard_report(tmp_path / "shards"))
    assert_halved_between_ranks(tmp_path / "shards")
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "epoch=0-step=2.ckpt"
    assert len(list(checkpoint.glob("*.distcp"))) == 2  # sharded: one file per rank
    resumed = train_two_processes(tmp_path / "resumed", "trainer=fsdp", f"resume='{checkpoint}'")
    ddp = train_two_processes(tmp_path / "ddp", "trainer=ddp")

    exported, reference = export_tensors(fsdp), export_tensors(ddp)
    assert exported.keys() == reference.keys() and len(exported) > 100
    for key, tensor in exported.items():
        torch.testing.assert_close(tensor, reference[key], atol=1e-5, rtol=0, msg=key)
    assert all(torch.equal(tensor, exported[key]) for key, tensor in export_tensors(resumed).items())


def test_fsdp_two_processes_lora_on_an_fp8_base_is_sharded_and_exported_whole(tmp_path):
    fsdp = train_two_processes(tmp_path / "fsdp", "trainer=fsdp", "adapter=lora", "model.transformer_dtype=float8",
                               shard_report(tmp_path / "shards"))
    trainable = assert_halved_between_ranks(tmp_path / "shards")
    assert all("lora_" in name for name in trainable)
    exported = load_file(fsdp / "pytorch_lora_weights.safetensors")
    assert sorted(list(t.shape) for t in exported.values()) == sorted(w["shape"] for w in trainable.values())


@pytest.fixture
def single_process_group():
    """FSDP in this process builds a one-process group; later tests must find neither it nor the MASTER_PORT &
    co. Lightning set for it (a later DDP launch would inherit the port the group still holds)."""
    environment = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)


def lora_weights(result) -> dict[str, torch.Tensor]:
    return load_file(result.final_export / "pytorch_lora_weights.safetensors")


def test_fsdp_lora_on_an_fp8_base_is_sharded_trains_like_one_process_and_resumes_exactly(make_config,
                                                                                         single_process_group):
    common = ("trainer.accelerator=cpu", "trainer.max_steps=3", "dataset.resolutions=[64]",
              "model.transformer_dtype=float8")
    plain = run(make_config(*common, run_name="plain"))
    sharded = run(make_config("trainer=fsdp", "checkpoint_every_n_steps=2", *common, run_name="fsdp"))
    trainable = sharded.module.trainable_parameters()
    assert trainable and all(isinstance(p, DTensor) and "lora_" in name
                             for name, p in sharded.module.named_parameters() if p.requires_grad)
    frozen_dtypes = {p.dtype for p in sharded.module.denoiser.parameters() if not p.requires_grad}
    assert torch.float8_e4m3fn in frozen_dtypes  # the fp8 base stays fp8 in its shards
    checkpoint = sharded.trainer.checkpoint_callback.dirpath + "/epoch=0-step=2.ckpt"
    resumed = run(make_config("trainer=fsdp", f"resume='{checkpoint}'", *common, run_name="resumed"))

    weights, reference = lora_weights(sharded), lora_weights(plain)
    assert weights.keys() == reference.keys() and weights
    for key, tensor in weights.items():
        torch.testing.assert_close(tensor, reference[key], atol=1e-5, rtol=0, msg=key)
    assert all(torch.equal(tensor, weights[key]) for key, tensor in lora_weights(resumed).items())


@pytest.mark.parametrize("preset", ["auto", "ddp", "fsdp"])
def test_tested_strategy_presets_are_accepted(make_config, preset):
    from difftrain.config.validate import validate

    validate(make_config(f"trainer={preset}", "trainer.devices=2"))


@pytest.mark.parametrize("overrides, message", [
    (["trainer.strategy=fsdp"], "trainer.strategy=fsdp is not supported. Choose a tested preset: trainer=auto, "
                                "trainer=ddp, trainer=fsdp, trainer=deepspeed."),
    (["trainer.strategy=ddp_spawn"], "trainer.strategy=ddp_spawn is not supported"),
    (["trainer=fsdp", "model.blocks_to_swap=2"], "model.blocks_to_swap=2 keeps whole blocks in CPU memory, which "
                                                 "trainer=fsdp cannot shard"),
    (["trainer=deepspeed", "model.blocks_to_swap=2"], "trainer=deepspeed cannot shard"),
    (["trainer=fsdp", "model.compile=whole"], "model.compile=whole puts trainer=fsdp's per-block hooks inside one "
                                              "graph: use model.compile=true"),
    (["trainer=fsdp", "optimizer.gradient_release=true", "trainer.gradient_clip_val=0"],
     "optimizer.gradient_release=true steps each weight during backward, before trainer=fsdp"),
    (["trainer=fsdp", "sample_prompts=[a cat]", "sample_every_n_steps=1"], "under trainer=fsdp every rank holds"),
    (["trainer=deepspeed", "trainer.accelerator=cpu"], "trainer=deepspeed runs on CUDA GPUs only"),
])
def test_unsupported_strategies_and_combinations_stop_before_anything_loads(make_config, tmp_path, overrides,
                                                                            message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        run(make_config(*overrides))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()  # nothing written, nothing loaded


def test_a_crash_while_saving_a_sharded_checkpoint_keeps_the_previous_one(make_config, single_process_group,
                                                                           monkeypatch, tmp_path):
    from lightning.pytorch.strategies import model_parallel

    real_save, saves = model_parallel._distributed_checkpoint_save, []

    def second_save_dies_half_written(state, path):  # step 1: epoch=0-step=1.ckpt, then last.ckpt
        saves.append(path)
        if len(saves) == 2:
            real_save({"state_dict": state["state_dict"]}, path)
            raise OSError("No space left on device")
        real_save(state, path)

    monkeypatch.setattr(model_parallel, "_distributed_checkpoint_save", second_save_dies_half_written)
    common = ("trainer=fsdp", "trainer.accelerator=cpu", "trainer.max_steps=2", "dataset.resolutions=[64]")
    with pytest.raises(OSError, match="No space left"):
        run(make_config(*common, "checkpoint_every_n_steps=1"))
    monkeypatch.undo()

    checkpoints = tmp_path / "run" / "checkpoints"
    # no half-written last.ckpt for resume=auto to choke on
    assert [p.name for p in checkpoints.iterdir() if not p.name.startswith(".")] == ["epoch=0-step=1.ckpt"]
    resumed = run(make_config(*common, "resume=auto", run_name="run"))
    assert resumed.trainer.global_step == 2
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]  # the half-written temp is gone
