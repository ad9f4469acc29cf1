"""dataset=webdataset through real training runs: shards written by scripts/make_shards.py from a folder train
the same LoRA as the folder, share its cache entries, and report bad members (and a damaged shard) by name."""
import logging
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from difftrain.config.errors import ConfigError
from difftrain.training import run
from scripts import make_shards
from tests.conftest import EXAMPLE_IMAGES

FAST = ("dataset.resolutions=[64]", "trainer.max_steps=2", "checkpoint_every_n_steps=null")
LORA = "pytorch_lora_weights.safetensors"


def make_shards_cli(folder, out_dir, monkeypatch, capsys) -> str:
    """scripts/make_shards.py as a user runs it; returns the dataset.shards override it prints."""
    monkeypatch.setattr(sys, "argv", ["make_shards.py", str(folder), str(out_dir), "--maxcount", "3"])
    make_shards.main()
    return capsys.readouterr().out.split("'")[-2]


def test_shards_train_the_same_lora_as_their_folder_and_report_bad_members(make_config, tmp_path, monkeypatch,
                                                                          capsys, caplog):
    folder = shutil.copytree(EXAMPLE_IMAGES, tmp_path / "images")
    (folder / "08_corrupt.jpg").write_bytes((folder / "00_red_circle.jpg").read_bytes()[:400])
    (folder / "08_corrupt.txt").write_text("a truncated image")
    shutil.copy(folder / "01_green_square.jpg", folder / "09_uncaptioned.jpg")
    shards_override = make_shards_cli(folder, tmp_path / "shards", monkeypatch, capsys)
    damaged = tmp_path / "damaged.tar"  # cut inside its first member: nothing in it can be trained on
    damaged.write_bytes((tmp_path / "shards" / "shard-000000.tar").read_bytes()[:1000])

    shards = (*FAST, "dataset=webdataset", shards_override[:-1] + f'::{damaged}"', "dataset.cache_dir=null")
    shards_cache = tmp_path / "shards" / ".difftrain_cache"  # beside the first shard, as beside a folder
    run(make_config(*shards, "dry_run=true", run_name="dry"))
    examples = len(list(EXAMPLE_IMAGES.glob("*.jpg")))
    assert f"latents 0 cached, {examples} to encode" in capsys.readouterr().out
    assert not shards_cache.exists(), "a dry run writes nothing"
    caplog.clear()
    from_shards = run(make_config(*shards, run_name="shards"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    from_folder = run(make_config(*FAST, f"dataset.path={folder}", f"dataset.cache_dir={shards_cache}",
                                  run_name="folder"))

    expected, trained = (load_file(r.final_export / LORA) for r in (from_folder, from_shards))
    assert expected.keys() == trained.keys()
    for key in expected:
        assert torch.equal(trained[key], expected[key]), key
    assert from_shards.datamodule.encoded_latents == len(from_shards.datamodule.train_set) == examples
    assert (from_folder.datamodule.encoded_latents, from_folder.datamodule.encoded_captions) == (0, 0), \
        "the folder's files have the cache entries of the members with their bytes and captions"

    for bad in (f"{tmp_path}/shards/shard-000002.tar/08_corrupt.jpg", f"{tmp_path}/shards/shard-000003.tar/"
                f"09_uncaptioned.jpg", f"{damaged}: unreadable shard"):
        assert sum(bad in message for message in warnings) == 1, (bad, warnings)


def test_missing_shards_and_remote_shards_without_a_cache_folder_are_one_error(make_config, tmp_path):
    with pytest.raises(ConfigError, match=f"dataset.shards=.*: shard {tmp_path}/x-000001.tar does not exist"):
        run(make_config("dataset=webdataset", f"dataset.shards='{tmp_path}/x-{{000001..000002}}.tar'"))
    with pytest.raises(ConfigError, match="dataset.cache_dir is not set"):
        run(make_config("dataset=webdataset", "dataset.shards=https://example.com/x.tar", "dataset.cache_dir=null"))
