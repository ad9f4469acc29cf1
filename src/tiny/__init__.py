"""Tiny random-weight models in the real on-disk layouts, built offline and cached on disk.

`tiny_model_dir("flux")` returns a folder that the real loading code (from_pretrained, single-file
loaders) reads unchanged. Builders are deterministic, so a cached folder equals a fresh build of the
same FACTORY_VERSION. Importing this package is cheap: builders import their modules on first use.
"""
import fcntl
import importlib
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# Bump whenever any builder's output changes, so stale caches are not reused.
FACTORY_VERSION = 1

CACHE_ENV = "DIFFTRAIN_TINY_DIR"
DEFAULT_CACHE_ROOT = Path("~/.cache/difftrain/tiny")


def _lazy_builder(module: str, function: str = "build") -> Callable[[Path], None]:
    def build(out_dir: Path) -> None:
        getattr(importlib.import_module(module), function)(out_dir)

    return build


BUILDERS: dict[str, Callable[[Path], None]] = {
    "flux": _lazy_builder("src.tiny.flux"),
    "sdxl": _lazy_builder("src.tiny.sdxl"),
    "wan21_t2v": _lazy_builder("src.tiny.wan", "build_wan21_t2v"),
    "wan21_i2v": _lazy_builder("src.tiny.wan", "build_wan21_i2v"),
    "wan22_a14b": _lazy_builder("src.tiny.wan", "build_wan22_a14b"),
    "wan22_a14b_i2v": _lazy_builder("src.tiny.wan", "build_wan22_a14b_i2v"),
    "wan22_5b": _lazy_builder("src.tiny.wan", "build_wan22_5b"),
}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT).expanduser()


def tiny_model_dir(family: str) -> Path:
    """The cached tiny model folder of `family`, built on first use."""
    return build_once(family, cache_root() / f"{family}-v{FACTORY_VERSION}")


def build_once(family: str, target: Path) -> Path:
    """Build `family` into `target` unless it is already there; safe against crashes and concurrent callers."""
    build = _builder(family)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.with_name(target.name + ".lock")):
        if not target.is_dir():  # another process may have built it while we waited
            _remove_stale_temp_dirs(target)
            _build_atomically(build, target)
    return target


def _builder(family: str) -> Callable[[Path], None]:
    if family not in BUILDERS:
        raise ValueError(f"unknown tiny model family {family!r}; known: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[family]


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _temp_prefix(target: Path) -> str:
    return f"{target.name}.tmp-"


def _remove_stale_temp_dirs(target: Path) -> None:
    # Only called under the lock, so any temp folder left is from a build that crashed.
    for stale in target.parent.glob(_temp_prefix(target) + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def _build_atomically(build: Callable[[Path], None], target: Path) -> None:
    # Same parent folder, so os.rename is atomic: target is either absent or complete.
    temp_dir = target.with_name(f"{_temp_prefix(target)}{os.getpid()}")
    temp_dir.mkdir()
    try:
        build(temp_dir)
        os.rename(temp_dir, target)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
