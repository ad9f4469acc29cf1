"""Two ranks on CPU (gloo), launched by the real command line, two ways: a Hydra sweep of two jobs on a fresh machine
(empty tiny-model and latent caches) whose second ranks Lightning starts, and two "nodes" (two launches of train.py with
NODE_RANK 0 and 1 on 127.0.0.1, one process each) reading the cache the first run filled. Caching is split across
ranks, each sweep job starts once, one export is written, previews are rendered once, and both launches train the
same weights. Tiny SDXL: the family whose tiny model, built inside a process group, was incomplete (issue 13)."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftrain.tiny import CACHE_ENV
from tests.conftest import ROOT

ENCODED = re.compile(r"Cache: encoded (\d+) latent\(s\) and (\d+) caption\(s\)")
LORA = Path("exports/final/lora.safetensors")
SAME_RUN = ["model=sdxl_tiny", "trainer.strategy=ddp", "trainer.accelerator=cpu", "dataset.resolutions=[64]",
            "logger=none", "sample_prompts=[a red square,a blue circle]", "sample_every_n_steps=1",
            "sample_before_first_step=true", "sample_steps=2"]


def start(*overrides: str, multirun: bool = False, **env: str) -> subprocess.Popen:
    flags = ["-m"] if multirun else []
    return subprocess.Popen([sys.executable, "train.py", *flags, *SAME_RUN, *overrides], cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(*processes: subprocess.Popen) -> list[str]:
    outputs = [process.communicate(timeout=900)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    return outputs


def encoded_counts(log_file: Path) -> tuple[int, int]:
    """(latents, captions) this rank encoded, from its log; (0, 0) when it had nothing to encode."""
    match = ENCODED.search(log_file.read_text())
    return tuple(map(int, match.groups())) if match else (0, 0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    cache = f"dataset.cache_dir={root / 'cache'}"
    sweep_output = finish(start("trainer.devices=2", "trainer.max_steps=2,1", f"hydra.sweep.dir={root / 'sweep'}",
                                cache, multirun=True, **{CACHE_ENV: str(root / "empty-tiny-cache")}))[0]
    nodes = root / "nodes"
    node_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    finish(*(start("trainer.num_nodes=2", "trainer.devices=1", "trainer.max_steps=2", f"hydra.run.dir={nodes}", cache,
                   f"hydra.job.name=node{rank}", "hydra.output_subdir=null", NODE_RANK=str(rank), **node_env)
             for rank in (0, 1)))
    return {"sweep_output": sweep_output, "ddp": root / "sweep" / "max_steps=2",
            "second_job": root / "sweep" / "max_steps=1", "nodes": nodes}


def test_ddp_sweep_jobs_on_a_fresh_machine_start_once_and_split_caching(runs):
    assert runs["sweep_output"].count("Launching 2 jobs") == 1  # no second rank launched the sweep again
    assert (runs["second_job"] / LORA).is_file() and (runs["second_job"] / "train_ddp_process_1.log").is_file()
    per_rank = [encoded_counts(runs["ddp"] / "train.log"), encoded_counts(runs["ddp"] / "train_ddp_process_1.log")]
    assert all(latents > 0 for latents, _ in per_rank), per_rank  # both ranks shared the work
    assert sum(latents for latents, _ in per_rank) == 8  # the 8 example images, each encoded once
    assert sum(captions for _, captions in per_rank) == 8
    lora = load_file(runs["ddp"] / LORA)
    assert any(k.startswith("lora_unet_") for k in lora)


def test_previews_are_rendered_once(runs):
    samples = runs["ddp"] / "samples"
    assert {step.name: sorted(f.name for f in step.iterdir()) for step in samples.iterdir()} == {
        step: ["0.png", "1.png"] for step in ("0", "1", "2")}


def test_two_nodes_train_the_same_lora_as_two_processes_from_the_cache(runs):
    nodes = runs["nodes"]
    assert [encoded_counts(nodes / "node0.log"), encoded_counts(nodes / "node1.log")] == [(0, 0), (0, 0)]
    ddp, multi_node = load_file(runs["ddp"] / LORA), load_file(nodes / LORA)
    assert ddp.keys() == multi_node.keys()
    for key in ddp:
        torch.testing.assert_close(multi_node[key], ddp[key], rtol=0, atol=1e-6)
