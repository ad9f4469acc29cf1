"""Atomic writes: the destination either keeps its previous good content or gets the complete new one."""
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    with replacing(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt", **(metadata or {})})


def write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yields a sibling temp file to write (a rename within one filesystem is atomic); once written it gets the
    mode any new file gets here (safetensors creates its files 0600, which another user's ComfyUI cannot read),
    reaches the disk, then replaces `path`. On failure the temp file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def temp_sibling(path: Path) -> Path:
    """Where `path` is written before it replaces the real one: `.<name>.<pid>.tmp`."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


TEMP_NAME = re.compile(r"\..+\.\d+\.tmp")


def remove_stale_temps(folder: Path) -> None:
    """Removes the temp files and folders that killed writers left anywhere under `folder` (call it before
    anything writes there)."""
    for stale in [p for p in Path(folder).rglob(".*.tmp") if TEMP_NAME.fullmatch(p.name)]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(folder: Path) -> None:
    """Makes a rename in `folder` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_directory(path: Path):
    """Yields a temporary sibling folder to fill; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, path)


def replace_directory(filled: Path, path: Path) -> None:
    """The completely written folder `filled` (a temp sibling of `path`) replaces `path` whole."""
    file_mode = 0o666 & ~current_umask()  # what writers such as diffusers' (safetensors, 0600) did not give
    for written in filled.rglob("*"):
        if written.is_file():
            os.chmod(written, file_mode)
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(filled, path)
    shutil.rmtree(old, ignore_errors=True)


def copy_file(source: Path, destination: Path) -> None:
    """`source` copied to `destination`, which never holds a partial copy."""
    with replacing(destination) as tmp:
        shutil.copyfile(source, tmp)
