"""Aspect-ratio / resolution buckets, and a batch sampler whose every global batch comes from one bucket."""

import math
import random
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence

import numpy
from torch.utils.data import Sampler

from difftrain.config.schema import VIDEO_CLIP_MODES

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
    number of batches. `item_keys` tell which indices hold the same item (repeats): a global batch holds an item
    twice only when its bucket has too few distinct items (see `_batches_of_distinct_items`).
    `state_dict` / `load_state_dict` resume mid-epoch after the batches already handed out.
    """

    def __init__(
        self,
        bucket_keys: Sequence[Hashable],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        item_keys: Sequence[Hashable] | None = None,
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
        item_of = (lambda index: index) if item_keys is None else item_keys.__getitem__
        buckets = _grouped(range(len(bucket_keys)), bucket_keys.__getitem__)
        self._buckets = [_grouped(bucket, item_of) for bucket in buckets]  # per bucket, per item: its indices
        self._batches_yielded = 0
        self._batches_to_skip = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def sampler(self) -> "BucketBatchSampler":
        """Lightning calls `set_epoch` at each epoch start on `batch_sampler.sampler` (never on the batch sampler
        itself); this batch sampler shuffles by itself, so it is its own sampler."""
        return self

    def __len__(self) -> int:
        return sum(math.ceil(_num_samples(items) / self.global_batch_size) for items in self._buckets)

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
        rng = random.Random(f"{self.seed}:{self.epoch}") if self.shuffle else None
        batches = [batch for items in self._buckets
                   for batch in _batches_of_distinct_items(items, self.global_batch_size, rng)]
        if rng:
            rng.shuffle(batches)
        return batches


def padding(num_samples: int, global_batch_size: int) -> int:
    """How many samples repeat to fill a bucket of `num_samples` up to whole global batches."""
    return -num_samples % global_batch_size


def _grouped(indices: Iterable[int], key: Callable[[int], Hashable]) -> list[list[int]]:
    """Indices grouped by key, groups in order of first appearance (deterministic)."""
    groups: dict[Hashable, list[int]] = {}
    for index in indices:
        groups.setdefault(key(index), []).append(index)
    return list(groups.values())


def _num_samples(items: list[list[int]]) -> int:
    return sum(map(len, items))


def _batches_of_distinct_items(items: list[list[int]], size: int, rng: random.Random | None) -> list[list[int]]:
    """One bucket's samples (`items`: each item's indices) in batches of exactly `size`.

    Each batch takes the items with the most copies left, ties broken at random (`rng`; None: in order). That puts
    an item twice in a batch only when it cannot be avoided: the bucket has fewer than `size` items, or an item
    has more copies than there are batches.
    """
    copies = [list(indices) for indices in items]
    _pad_fewest(copies, size, rng)
    by_count = _items_by_count(copies, reversed(range(len(copies))), {})  # taken from the end: in order without rng
    batches = []
    while by_count:
        chosen = _most_copies_left(by_count, size, rng)
        batch = [copies[item].pop() for item in chosen]
        while len(batch) < size:  # fewer items left than a batch holds: some come twice
            batch.append(copies[max(chosen, key=lambda item: len(copies[item]))].pop())
        batches.append(batch)
        by_count = _items_by_count(copies, chosen, by_count)
    return batches


def _pad_fewest(copies: list[list[int]], size: int, rng: random.Random | None) -> None:
    """Fills up to whole batches, each added copy (an item's first index) going to an item with the fewest."""
    tie_break = [rng.random() if rng else item for item in range(len(copies))]
    for _ in range(padding(_num_samples(copies), size)):
        item = min(range(len(copies)), key=lambda item: (len(copies[item]), tie_break[item]))
        copies[item].append(copies[item][0])


def _most_copies_left(by_count: dict[int, list[int]], size: int, rng: random.Random | None) -> list[int]:
    """Up to `size` distinct items taken out of `by_count`, those with the most copies left first."""
    chosen = []
    for count in sorted(by_count, reverse=True):
        level = by_count[count]
        while level and len(chosen) < size:
            index = rng.randrange(len(level)) if rng else len(level) - 1
            level[index], level[-1] = level[-1], level[index]
            chosen.append(level.pop())
    return chosen


def _items_by_count(copies: list[list[int]], items: Iterable[int], by_count: dict[int, list[int]]
                    ) -> dict[int, list[int]]:
    """`by_count` (items by their number of copies left) without its emptied lists, `items` put back in."""
    by_count = {count: level for count, level in by_count.items() if level}
    for item in items:
        if copies[item]:
            by_count.setdefault(len(copies[item]), []).append(item)
    return by_count


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
