"""How a family whose parts come as single files (ComfyUI's) or a Diffusers folder loads each part: `PARTS`, a
table of `Part`s, and `SingleFileModule`, the methods that read it; and `tokenizer_path`, the tokenizer no weights
file holds."""
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from difftrain.config.errors import ConfigError
from difftrain.formats.single_file import read_shapes

from .base import DiffusionModule


class Part(NamedTuple):
    """How one part loads: its class (from a Diffusers subfolder), how its subfolder's config is read, how its single
    file's config is read off the file's shapes, and how the single file loads with that config."""
    model_cls: type
    folder_config: Callable[[Path], Any]
    file_config: Callable[[dict], Any]
    load_file: Callable[..., torch.nn.Module]


class SingleFileModule(DiffusionModule):
    """A family whose subclass sets `PARTS`, `part_files` (part -> its single file or None) and `model_dir` (the
    Diffusers folder or None)."""

    PARTS: dict[str, Part]
    part_files: dict[str, Optional[str]]

    def part_config(self, part: str) -> Any:
        """A part's config: from its subfolder of the Diffusers folder, else read off its single file's shapes."""
        if self.model_dir is None:
            return self.PARTS[part].file_config(read_shapes(self.part_files[part]))
        return self.PARTS[part].folder_config(self.model_dir / part)

    def load_part(self, part: str) -> torch.nn.Module:
        """A part from its single file when set, else from its subfolder of the Diffusers folder."""
        if self.part_files[part]:
            return self.PARTS[part].load_file(self.part_files[part], self.part_config(part), self.compute_dtype)
        return self.PARTS[part].model_cls.from_pretrained(self.model_dir, subfolder=part, dtype=self.compute_dtype,
                                                          local_files_only=True)

    def weights_source(self, part: str) -> Path:
        """The part's single file, or its subfolder of the Diffusers folder."""
        return Path(self.part_files[part]) if self.part_files[part] else self.model_dir / part


def load_tokenizer(tokenizer_path: str, what: str) -> PreTrainedTokenizerBase:
    """`model.tokenizer_path`'s tokenizer: a folder, or a Hugging Face repo id transformers downloads when online."""
    try:
        return AutoTokenizer.from_pretrained(tokenizer_path)
    except OSError as error:
        raise ConfigError(f"model.tokenizer_path={tokenizer_path}: no {what} tokenizer could be loaded "
                          f"({type(error).__name__}; offline, a repo id cannot be downloaded): set "
                          f"model.tokenizer_path to a folder holding it.") from None


def tokenizer_folders(tokenizer_path: str) -> list[Path]:
    """What a cache fingerprints of `tokenizer_path`: the folder, none for a repo id (its name identifies it)."""
    return [Path(tokenizer_path)] if Path(tokenizer_path).is_dir() else []
