"""Shard lists in webdataset's notation (brace patterns, '::'-separated lists, local paths or URLs), checked
before anything heavy loads: importable without torch (validate.py checks `dataset=webdataset` configs here)."""
from pathlib import Path
from urllib.parse import urlparse

from braceexpand import braceexpand
from omegaconf import DictConfig

from difftrain.config.errors import ConfigError

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
    """Every shard list names shards, the local ones exist, no folder keys are set, and the cache has a home."""
    if dataset.path is not None:
        raise ConfigError(f"dataset.path={dataset.path} names a folder, but dataset=webdataset reads shards: set "
                          f"dataset.shards instead (e.g. {EXAMPLE}), or use dataset=images for a folder.")
    entries = [("dataset", "shards", dataset)]  # (where, the key naming its shards, the entry)
    entries += [(f"dataset.directories[{i}]", "path", d) for i, d in enumerate(dataset.directories)]
    entries += [(f"eval_datasets[{i}]", "path", d) for i, d in enumerate(eval_datasets)]
    for where, key, entry in entries:
        if entry.get("control_path") is not None or entry.get("control_paths") is not None:
            raise ConfigError(f"dataset=webdataset reads no control images: unset {where}.control_path and "
                              f"control_paths (edit datasets are folders: dataset=images).")
        missing = [url for url in shard_urls(entry[key]) if is_local(url) and not Path(url).is_file()]
        if missing:
            raise ConfigError(f"{where}.{key}={entry[key]}: shard {missing[0]} does not exist. Point it at tar "
                              f"shards, e.g. {EXAMPLE}; scripts/make_shards.py writes them from a folder of "
                              f"captioned images.")
    if dataset.cache_dir is None and not is_local(shard_urls(dataset.shards)[0]):
        raise ConfigError(f"dataset.cache_dir is not set, and the shards ({dataset.shards}) are not local files: set "
                          f"dataset.cache_dir to a local folder for the unpacked media and the cached latents.")
