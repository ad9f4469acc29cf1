"""What previews render: the `sample_*` keys read into one request per prompt, checked before anything heavy loads
(a prompt file or control image that does not exist, an unknown entry key, a schedule without prompts)."""
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    seed: int
    width: int
    height: int
    frames: Optional[int] = None  # video families only
    image: Optional[str] = None  # a control image (edit and image-to-video families)


ENTRY_KEYS = tuple(f.name for f in fields(SampleRequest))


def read_prompts(value: Any, key: str) -> list[Any]:
    """A list of prompts / entries, or the path of a text file with one prompt per line (blank lines skipped)."""
    if value is None:
        return []
    if isinstance(value, str):
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"{key}={value} is not a file. Give a list of prompts, or the path of a text file with "
                              f"one prompt per line.")
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return list(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


def sample_requests(cfg: DictConfig) -> list[SampleRequest]:
    """The previews a training config asks for, each entry's unset seed / size / frames from the defaults (seed:
    the run's; size: sample_size, else the first dataset resolution; frames: the largest frame bucket)."""
    entries = read_prompts(cfg.get("sample_prompts"), "sample_prompts")
    scheduled = cfg.get("sample_every_n_steps") or cfg.get("sample_every_n_epochs") or cfg.get("sample_before_first_step")
    if entries and not scheduled:
        raise ConfigError("sample_prompts is set but no preview is scheduled: set sample_every_n_steps, "
                          "sample_every_n_epochs or sample_before_first_step=true.")
    if scheduled and not entries:
        raise ConfigError("Previews are scheduled (sample_every_n_steps / sample_every_n_epochs / "
                          "sample_before_first_step) but sample_prompts is empty: give it prompts.")
    width, height = size_of(cfg.get("sample_size") or cfg.dataset.resolutions[0], "sample_size")
    frames = max(cfg.dataset.get("frame_buckets") or [1])
    defaults = dict(seed=cfg.seed, width=width, height=height, frames=frames if frames > 1 else None)
    return [make_request(entry, defaults, f"sample_prompts[{i}]") for i, entry in enumerate(entries)]


def make_request(entry: Any, defaults: dict[str, Any], key: str) -> SampleRequest:
    """One request from a prompt string or a {prompt, seed, width, height, frames, image} mapping."""
    if isinstance(entry, str):
        entry = {"prompt": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
        raise ConfigError(f"{key}={entry!r} should be a prompt, or a mapping with a 'prompt' and some of the keys: "
                          f"{', '.join(ENTRY_KEYS[1:])}.")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise ConfigError(f"Unknown key '{key}.{unknown[0]}'. Valid keys: {', '.join(ENTRY_KEYS)}.")
    request = SampleRequest(**{**defaults, **{k: v for k, v in entry.items() if v is not None}})
    for name in ("seed", "width", "height", "frames"):
        value, minimum = getattr(request, name), 0 if name == "seed" else 1
        if value is not None and (not isinstance(value, int) or value < minimum):
            raise ConfigError(f"{key}.{name}={value!r} should be an integer >= {minimum}.")
    if request.image is not None and not Path(request.image).is_file():
        raise ConfigError(f"{key}.image={request.image} does not exist. It should be a control image.")
    return request


def size_of(resolution: Any, key: str) -> tuple[int, int]:
    """A side length or a [width, height] pair -> (width, height)."""
    if isinstance(resolution, int):
        return resolution, resolution
    if OmegaConf.is_list(resolution) or isinstance(resolution, (list, tuple)):
        if len(resolution) == 2 and all(isinstance(side, int) for side in resolution):
            return tuple(resolution)
    raise ConfigError(f"{key}={resolution!r} should be a side length (512) or a [width, height] pair.")
