"""A crash while writing never leaves a half-written file or folder where a good one was; written files get the
mode the umask gives new files."""
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from difftrain.utils.atomic import atomic_directory, save_safetensors, write_text


class Crash(Exception):
    pass


def test_failed_folder_write_keeps_the_previous_export(tmp_path):
    target = tmp_path / "exports" / "final"
    with atomic_directory(target) as tmp:
        (tmp / "lora.safetensors").write_text("good")
    with pytest.raises(Crash):
        with atomic_directory(target) as tmp:
            (tmp / "lora.safetensors").write_text("half")
            raise Crash
    assert (target / "lora.safetensors").read_text() == "good"
    assert sorted(p.name for p in target.parent.iterdir()) == ["final"]

    with atomic_directory(target) as tmp:
        (tmp / "lora.safetensors").write_text("better")
    assert (target / "lora.safetensors").read_text() == "better"
    assert sorted(p.name for p in target.parent.iterdir()) == ["final"]


def test_failed_file_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "weights.safetensors"
    save_safetensors({"w": torch.ones(2)}, path)

    def dies_half_way(tensors, filename, metadata=None):  # a disk-full or kill in the middle of writing
        with open(filename, "wb") as f:
            f.write(b"\x08\x00\x00")
        raise Crash

    monkeypatch.setattr("difftrain.utils.atomic.save_file", dies_half_way)
    with pytest.raises(Crash):
        save_safetensors({"w": torch.zeros(2)}, path)
    assert torch.equal(load_file(path)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664)])
def test_written_files_get_the_mode_the_umask_gives_new_files(tmp_path, umask, mode):
    """safetensors creates its files 0600: ComfyUI running as another user could not read an export."""
    previous = os.umask(umask)
    try:
        save_safetensors({"w": torch.ones(2)}, tmp_path / "lora.safetensors")
        write_text(tmp_path / "config.yaml", "a: 1")
        with atomic_directory(tmp_path / "export") as folder:
            (folder / "lora.safetensors").touch(mode=0o600)  # as diffusers' save_lora_weights leaves it
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "lora.safetensors").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "config.yaml").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "export" / "lora.safetensors").stat().st_mode) == mode
