"""Aspect-ratio / resolution buckets, and a batch sampler whose every global batch comes from one bucket."""

import itertools
import math
import random
from collections.abc import Hashable, Iterator, Sequence

import numpy
from torch.utils.data import Sampler

from src.config.schema import VIDEO_CLIP_MODES

Size = tuple[int, int]


def aspect_ratio_buckets(
    enable_ar_bucket: bool,
    min_ar: float,
    max_ar: float,
    num_ar_buckets: int,
    ar_buckets: Sequence[float | Sequence[int]] | None = None,
) -> list[float]:
    """Bucket aspect ratios (width / height). Explicit `ar_buckets` (ratios or [w, h] pairs) win over the range."""
    if not enable_ar_bucket:
        return [1.0]
    if ar_buckets:
        ratios = [_aspect_ratio(bucket) for bucket in ar_buckets]
    else:
        ratios = numpy.geomspace(min_ar, max_ar, num_ar_buckets).tolist()
    if not ratios or min(ratios) <= 0:
        raise ValueError(f"Aspect-ratio buckets must be a non-empty list of positive ratios, got {ratios}")
    return ratios


def _aspect_ratio(bucket: float | Sequence[int]) -> float:
    if isinstance(bucket, int | float):
        return float(bucket)
    width, height = bucket
    return width / height


def resolution_area(resolution: int | Sequence[int]) -> int:
    """Pixel area of a resolution given as a side length or as a [w, h] pair."""
    if isinstance(resolution, int):
        return resolution * resolution
    width, height = resolution
    return width * height


def bucket_size(area: int, aspect_ratio: float, multiple: int) -> Size:
    """(w, h) with about `area` pixels and w / h about `aspect_ratio`, each a multiple of `multiple`."""
    width = math.sqrt(area * aspect_ratio)
    height = area / width
    return _round_to_multiple(width, multiple), _round_to_multiple(height, multiple)


def _round_to_multiple(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def assign_buckets(
    width: int,
    height: int,
    resolutions: Sequence[int | Sequence[int]],
    aspect_ratios: Sequence[float],
    multiple: int,
) -> list[Size]:
    """One bucket size per resolution, at the bucket aspect ratio closest (in log space) to the item's."""
    log_ratio = math.log(width / height)
    closest = min(aspect_ratios, key=lambda ratio: abs(math.log(ratio) - log_ratio))
    return [bucket_size(resolution_area(resolution), closest, multiple) for resolution in resolutions]


class BucketBatchSampler(Sampler[list[int]]):
    """Yields this rank's slice of global batches (`batch_size * world_size` indices) drawn from one bucket each.

    Shuffling within buckets and of the batch order depends only on (seed, epoch). A bucket whose size is not a
    multiple of the global batch is padded with its own items, so nothing is dropped and all ranks get the same
    number of batches. `state_dict` / `load_state_dict` resume mid-epoch after the batches already handed out.
    """

    def __init__(
        self,
        bucket_keys: Sequence[Hashable],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self._buckets = _indices_by_key(bucket_keys)
        self._batches_yielded = 0
        self._batches_to_skip = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        return sum(math.ceil(len(indices) / self.global_batch_size) for indices in self._buckets)

    def set_epoch(self, epoch: int) -> None:
        # A position restored by load_state_dict belongs to its own epoch only.
        if epoch != self.epoch:
            self.epoch = epoch
            self._batches_yielded = 0
            self._batches_to_skip = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_yielded": self._batches_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["batches_yielded"] > len(self):
            raise ValueError(
                f"Cannot resume after {state['batches_yielded']} batches: an epoch has only {len(self)} "
                "(did the dataset or batch size change?)"
            )
        self.epoch = state["epoch"]
        self._batches_yielded = self._batches_to_skip = state["batches_yielded"]

    def __iter__(self) -> Iterator[list[int]]:
        start = self._batches_to_skip
        self._batches_to_skip = 0
        self._batches_yielded = start
        rank_slice = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for global_batch in self._global_batches()[start:]:
            self._batches_yielded += 1
            yield global_batch[rank_slice]

    def _global_batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        batches = []
        for indices in self._buckets:
            order = list(indices)
            if self.shuffle:
                rng.shuffle(order)
            batches.extend(_chunks_wrapping_around(order, self.global_batch_size))
        if self.shuffle:
            rng.shuffle(batches)
        return batches


def _indices_by_key(bucket_keys: Sequence[Hashable]) -> list[list[int]]:
    """Dataset indices grouped by bucket, buckets in order of first appearance (deterministic)."""
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(bucket_keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def _chunks_wrapping_around(items: list[int], size: int) -> list[list[int]]:
    """Chunks of exactly `size`; the last one is filled by cycling back to the start (more than once if needed)."""
    num_chunks = math.ceil(len(items) / size)
    padded = list(itertools.islice(itertools.cycle(items), num_chunks * size))
    return [padded[start : start + size] for start in range(0, len(padded), size)]


# --- frame buckets (videos)

CLIP_MODES = VIDEO_CLIP_MODES


def frame_buckets_with_image(frame_buckets: Sequence[int]) -> list[int]:
    """The frame buckets, ascending, with the 1-frame (image) bucket always present."""
    return sorted({1, *frame_buckets})


def video_frame_bucket(num_frames: int, frame_buckets: Sequence[int]) -> int | None:
    """The largest video bucket (> 1 frame) not longer than the video; None when it is shorter than all of them."""
    fitting = [bucket for bucket in frame_buckets if 1 < bucket <= num_frames]
    return max(fitting) if fitting else None


def clip_starts(num_frames: int, clip_length: int, mode: str) -> list[int]:
    """First frame of each clip of `clip_length` taken from a video of `num_frames` frames.

    single_beginning: one clip from the first frame. single_middle: one clip centred in the video.
    multiple_overlapping: the fewest clips that cover every frame, spread evenly from the first frame to the last
    (so consecutive clips overlap by as little as possible, and by the same amount give or take a frame).
    """
    if clip_length > num_frames:
        raise ValueError(f"a clip of {clip_length} frames does not fit in {num_frames} frames")
    slack = num_frames - clip_length
    if mode == "single_beginning":
        return [0]
    if mode == "single_middle":
        return [slack // 2]
    if mode == "multiple_overlapping":
        count = math.ceil(num_frames / clip_length)
        return [0] if count == 1 else [round(i * slack / (count - 1)) for i in range(count)]
    raise ValueError(f"unknown video_clip_mode {mode!r}; choose one of {', '.join(CLIP_MODES)}")
