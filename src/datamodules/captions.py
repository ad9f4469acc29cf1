"""Captions as the text encoders get them: shuffled tags (`TagShuffle`, several variants cached per caption), and
captions longer than the text encoders read. Diffusers' pipelines tokenize a caption whole, several times, and
log the dropped text on every call: megabytes, for minutes, for a huge caption. So caching hands the encoders each
caption cut a little past the tokens they keep (`TokenLimit.fit`, which warns once per caption with its path and
token counts) and silences those per-call warnings (`quiet_truncation`)."""
import logging
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from diffusers import DiffusionPipeline
from transformers import PreTrainedTokenizerBase
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from difftrain.config.errors import ConfigError

log = logging.getLogger(__name__)

# Where diffusers' pipelines and transformers' tokenizers log a caption's truncation, once per call.
TRUNCATION_LOGGERS = ("diffusers.pipelines", "transformers.tokenization_utils_base")
# A caption is cut after this many times the tokens kept: far past them, so the kept tokens stay as they are.
CUT_AFTER_KEPT_TOKENS = 2


@dataclass(frozen=True)
class TokenLimit:
    """The tokenizers of a family's text encoders and how many tokens of a caption each keeps."""

    tokenizers: tuple[PreTrainedTokenizerBase, ...]
    limits: tuple[int, ...]

    @property
    def max_tokens(self) -> int:
        return max(self.limits)

    @classmethod
    def of(cls, encoders: Any) -> Optional["TokenLimit"]:
        """The limit of a family's cache encoders: their tokenizers (attributes, in a tuple, or a pipeline's
        components), each reading up to its model_max_length, or the encoders' max_sequence_length if that is
        less. None without a tokenizer."""
        tokenizers = tuple(_tokenizers(encoders))
        sequence_limit = getattr(encoders, "max_sequence_length", math.inf)
        limits = tuple(min(tokenizer.model_max_length, sequence_limit) for tokenizer in tokenizers)
        return cls(tokenizers, limits) if tokenizers else None

    def fit(self, caption: str, caption_path: Path) -> str:
        """The caption to hand the encoders: itself, or, if it has more tokens than they keep, cut well after those
        (warning once, with its path and token counts)."""
        specials = max(tokenizer.num_special_tokens_to_add() for tokenizer in self.tokenizers)
        # No tokenizer makes more tokens of a text than its UTF-8 bytes (+ 1, SentencePiece's word-start marker).
        if len(caption.encode()) + 1 + specials <= self.max_tokens:
            return caption
        encodings = [tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
                     for tokenizer in self.tokenizers]
        main = self.limits.index(self.max_tokens)  # the tokenizer of the encoder that reads the most
        count = len(encodings[main].input_ids) + self.tokenizers[main].num_special_tokens_to_add()
        if count <= self.max_tokens:
            return caption
        log.warning("Caption %s has %d tokens; the text encoder keeps the first %d (%d dropped).", caption_path,
                    count, self.max_tokens, count - self.max_tokens)
        return caption[:max(self._cut(tokenizer, encoding) for tokenizer, encoding in zip(self.tokenizers, encodings))]

    def _cut(self, tokenizer: PreTrainedTokenizerBase, encoding) -> int:
        """Where a caption may end for `tokenizer` to see the tokens it keeps unchanged: well after the most any
        encoder keeps, and after its own model_max_length (a CLIP tokenizer's, when max_sequence_length is less)."""
        own_limit = tokenizer.model_max_length if tokenizer.model_max_length < VERY_LARGE_INTEGER else 0
        last = min(len(encoding.input_ids), CUT_AFTER_KEPT_TOKENS * max(self.max_tokens, own_limit)) - 1
        return encoding.offset_mapping[last][1]


def _tokenizers(encoders: Any) -> list[PreTrainedTokenizerBase]:
    held = []
    for value in vars(encoders).values():
        if isinstance(value, DiffusionPipeline):
            held += value.components.values()
        else:
            held += value if isinstance(value, (tuple, list)) else [value]
    return [value for value in held if isinstance(value, PreTrainedTokenizerBase)]


@contextmanager
def quiet_truncation() -> Iterator[None]:
    """Silences the libraries' warnings about truncated captions (`TokenLimit.fit` has warned once per caption)."""
    loggers = [logging.getLogger(name) for name in TRUNCATION_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@dataclass(frozen=True)
class CachedText:
    """A caption as the text encoders get it, and its cache entry."""

    caption: str
    path: Path


@dataclass(frozen=True)
class TagShuffle:
    """A folder's `shuffle_tags`: each caption is cached as `variants` (cache_shuffle_num) orderings of its tags
    (split at `separator`), the first `keep_tokens` tags and the caption_prefix staying in front."""

    variants: int
    keep_tokens: int
    separator: str

    @classmethod
    def of(cls, directory: dict) -> Optional["TagShuffle"]:
        """The folder's shuffle, or None when it keeps its captions as written."""
        if not directory["shuffle_tags"]:
            return None
        if directory["cache_shuffle_num"] < 1:
            raise ConfigError(f"shuffle_tags is set for {directory['path']} but cache_shuffle_num is "
                              f"{directory['cache_shuffle_num']}: set dataset.cache_shuffle_num to the number of "
                              f"shuffled variants of each caption to cache (e.g. 4).")
        return cls(directory["cache_shuffle_num"], directory["keep_tokens"], directory["tag_separator"])

    def captions(self, caption: str, prefix: str, seed: int) -> tuple[str, ...]:
        """The caption's distinct shuffled variants (`prefix` + tags), each ordering seeded by `seed`, the
        caption and the variant's number (the same on every run and rank)."""
        split_at = self.separator.strip() or self.separator  # ", " also splits "a,b"
        tags = [tag.strip() for tag in caption.removeprefix(prefix).split(split_at) if tag.strip()]
        kept, shuffled = tags[:self.keep_tokens], tags[self.keep_tokens:]
        variants = [prefix + self.separator.join(kept + random.Random(f"{seed}:{variant}:{caption}").sample(
            shuffled, len(shuffled))) for variant in range(self.variants)]
        return tuple(dict.fromkeys(variants))
