"""Shard lists in webdataset's notation (brace patterns, '::'-separated lists, local paths or URLs), checked
before anything heavy loads: importable without torch (validate.py checks `dataset=webdataset` configs here)."""
from pathlib import Path
from urllib.parse import urlparse

from braceexpand import braceexpand
from omegaconf import DictConfig

from src.config.errors import ConfigError

EXAMPLE = "'dataset.shards=\"/data/shards/train-{000000..000009}.tar\"'"


def shard_urls(shards: str) -> list[str]:
    """The shards `shards` names, in order."""
    return [url for part in shards.split("::") for url in braceexpand(part)]


def is_local(url: str) -> bool:
    return urlparse(url).scheme == ""


def default_cache_dir(shards: str) -> Path:
    """Beside the first shard, as the folders' cache is beside the first folder."""
    return Path(shard_urls(shards)[0]).parent / ".difftrain_cache"


def check_shards(dataset: DictConfig, eval_datasets: list) -> None:
    """Every shard list names shards, the local ones exist, and the cache has a local home."""
    if dataset.path is not None:
        raise ConfigError(f"dataset.path={dataset.path} names a folder, but dataset=webdataset reads shards: set "
                          f"dataset.shards instead (e.g. {EXAMPLE}), or use dataset=images for a folder.")
    if dataset.control_path is not None or dataset.control_paths is not None:
        raise ConfigError("dataset=webdataset reads no control images: unset dataset.control_path and "
                          "control_paths (edit datasets are folders: dataset=images).")
    lists = [("dataset.shards", dataset.shards)]
    lists += [(f"dataset.directories[{i}].path", d.path) for i, d in enumerate(dataset.directories)]
    lists += [(f"eval_datasets[{i}].path", d.path) for i, d in enumerate(eval_datasets)]
    for key, shards in lists:
        missing = [url for url in shard_urls(shards) if is_local(url) and not Path(url).is_file()]
        if missing:
            raise ConfigError(f"{key}={shards}: shard {missing[0]} does not exist. Point it at tar shards, e.g. "
                              f"{EXAMPLE}; scripts/make_shards.py writes them from a folder of captioned images.")
    if dataset.cache_dir is None and not is_local(shard_urls(dataset.shards)[0]):
        raise ConfigError(f"dataset.cache_dir is not set, and the shards ({dataset.shards}) are not local files: set "
                          f"dataset.cache_dir to a local folder for the unpacked media and the cached latents.")
