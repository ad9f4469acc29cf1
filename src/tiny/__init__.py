"""Tiny random-weight models in the real on-disk layouts, built offline and cached on disk.

`tiny_model_dir("flux", tiny_flux.build)` returns a folder that the real loading code (from_pretrained,
single-file loaders) reads unchanged. Builders are deterministic, so a cached folder equals a fresh build of the
same source: the cache folder is named by a digest of this package's code, so an edited builder never reuses a
stale folder. Each src/tiny/<family>.py lists its builders by name in `TINY_MODELS` (`builders()` collects them:
scripts/make_tiny_models.py, and `tiny_model(name)` for the families' `tiny_models`); importing this package is cheap.
"""
import fcntl
import hashlib
import importlib
import os
import pkgutil
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from pathlib import Path

CACHE_ENV = "DIFFTRAIN_TINY_DIR"
DEFAULT_CACHE_ROOT = Path("~/.cache/difftrain/tiny")
_building = ContextVar("tiny_models_building", default=True)


class TinyModelNotBuilt(FileNotFoundError):
    """A tiny model not on disk was asked for where building is off (`without_building`)."""


@contextmanager
def without_building() -> Iterator[None]:
    """Within the block, a tiny model not built yet raises TinyModelNotBuilt instead of being built (a dry run
    reads what is on disk and writes no model)."""
    token = _building.set(False)
    try:
        yield
    finally:
        _building.reset(token)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT).expanduser()


def tiny_model_dir(name: str, build: Callable[[Path], None]) -> Path:
    """The cached tiny model `name`, written by `build(folder)` on first use."""
    return build_once(build, cache_root() / f"{name}-{builders_digest()}")


@cache
def builders_digest() -> str:
    return source_digest(Path(__file__).parent)


def source_digest(package: Path) -> str:
    """A short digest of the Python sources of `package`: it changes whenever any builder or shared piece does."""
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def builders() -> dict[str, Callable[[Path], None]]:
    """Every builder, by name: the `TINY_MODELS` of each module of this package."""
    found = {}
    for module in pkgutil.iter_modules(__path__):
        found.update(getattr(importlib.import_module(f"{__name__}.{module.name}"), "TINY_MODELS", {}))
    return found


def tiny_model(name: str) -> Path:
    """The cached tiny model a module of this package lists as `name` in its `TINY_MODELS`."""
    return tiny_model_dir(name, builders()[name])


def build_once(build: Callable[[Path], None], target: Path) -> Path:
    """Build into `target` unless it is already there; safe against crashes and concurrent callers."""
    if target.is_dir():
        return target
    if not _building.get():
        raise TinyModelNotBuilt(f"the tiny model {target} is not built yet (a training run builds it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.with_name(target.name + ".lock")):
        if not target.is_dir():  # another process may have built it while we waited
            _remove_stale_temp_dirs(target)
            _build_atomically(build, target)
    return target


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
    import torch  # here: importing this package stays cheap

    # Same parent folder, so os.rename is atomic: target is either absent or complete.
    temp_dir = target.with_name(f"{_temp_prefix(target)}{os.getpid()}")
    temp_dir.mkdir()
    try:
        # Builders seed torch's generator: a run must draw the same numbers whether or not the cache was cold
        with torch.random.fork_rng(devices=[]):
            build(temp_dir)
        os.rename(temp_dir, target)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
