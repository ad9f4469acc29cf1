"""The bucketed, cached LightningDataModule shared by every family.

setup() scans the media folders and their subfolders (reporting bad files once and skipping them; a file verified
on an earlier run and unchanged since is not decoded again, see media.ProbeIndex), assigns every item to its
aspect-ratio bucket at every resolution (and every video clip to its frame bucket, after resampling the video to the
model's framerate), makes sure each item has cached latents and text embeddings (loading the family's encoders only
if something is missing, splitting the work across ranks), then frees the encoders.
Edit datasets: a folder's `control_path` (or `control_paths`) names folders of control images with the targets'
stems; each control is cropped to its target's bucket size and encoded with it (CacheEncoders.encode_images).
Captions: `caption_extension` names the caption files; with `shuffle_tags` each caption is cached as
`cache_shuffle_num` tag orderings (captions.TagShuffle); with `caption_dropout_p` the empty caption is cached once.
Each training step draws a sample's caption among them from (seed, epoch, index), so a resumed run draws the same.
Loss masks: a folder's `mask_path` holds masks with the targets' stems, cropped as their targets, averaged down to
the latent grid and cached in the latents' entry ("loss_mask"); the loss covers the white part only.
Batches come from one (width, height, frames, controls) bucket each, in a reproducible shuffled order, sharded by
rank, resumable mid-epoch; the family collates its text tensors (DiffusionModule.collate_text)."""
import inspect
import logging
import random
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from difftrain.config.validate import ConfigError
from difftrain.modules.base import DiffusionModule

from .buckets import (
    BucketBatchSampler,
    aspect_ratio_buckets,
    assign_buckets,
    clip_starts,
    frame_buckets_with_image,
    video_frame_bucket,
)
from .cache import EmbeddingCache, NonFiniteError
from .captions import CachedText, TagShuffle, TokenLimit, quiet_truncation
from .media import (
    CAPTION_SUFFIX,
    ControlFolders,
    MaskFolder,
    MediaItem,
    ProbeIndex,
    ScanResult,
    SkippedFile,
    crop_geometry,
    load_image,
    load_mask,
    load_video,
    resample_indices,
    scan_directory,
)

log = logging.getLogger(__name__)

PROBE_INDEX_NAME = "media_probes.json"  # in the cache root: see media.ProbeIndex
DIRECTORY_KEYS = ("resolutions", "enable_ar_bucket", "min_ar", "max_ar", "num_ar_buckets", "ar_buckets",
                  "num_repeats", "caption_prefix", "frame_buckets", "video_clip_mode", "recursive",
                  "caption_extension", "shuffle_tags", "keep_tokens", "tag_separator", "cache_shuffle_num",
                  "mask_path")
CONTROL_KEYS = ("control_path", "control_paths")  # a folder inherits both or neither (see _with_defaults)


GEOMETRY_KEYS = ("original_size", "crop_top_left", "target_size")  # see Sample.geometry


class EmptyDatasetError(ConfigError):
    """No usable item in the dataset's folders: the user points the config at the right folder or fixes the files."""


@dataclass(frozen=True)
class Sample:
    """One training example: a media item (or one clip of a video) cropped to one bucket size, with its cache
    files. `texts`: its caption (with shuffle_tags, each shuffled variant); `frames` are the source frame indices
    of a video clip, empty for an image."""

    item: MediaItem
    size: tuple[int, int]
    latent_path: Path
    texts: tuple[CachedText, ...]
    frames: tuple[int, ...] = ()

    @property
    def text_path(self) -> Path:
        """The cache entry of its caption (as written, or its first shuffled variant): what eval trains on."""
        return self.texts[0].path

    @property
    def caption_path(self) -> Path:
        return self.item.caption_path or self.item.path.with_suffix(CAPTION_SUFFIX)

    @property
    def bucket(self) -> tuple[int, int, int, int]:
        """(width, height, frames, number of controls): batches never mix buckets."""
        return (*self.size, len(self.frames) or 1, len(self.item.controls))

    def load_controls(self) -> torch.Tensor:
        """The item's control images [K, 3, h, w] in [-1, 1], each scaled and centre-cropped to the sample's size
        as the target is (K = 0 without controls)."""
        if not self.item.controls:
            return torch.empty(0, 3, *self.size[::-1])
        return torch.stack([load_image(path, self.size) for path in self.item.controls])

    def load_mask(self) -> torch.Tensor:
        """The item's loss mask [h, w] in [0, 1], cropped to the sample's size as the target is (empty without)."""
        if self.item.mask is None:
            return torch.empty(0)
        return load_mask(self.item.mask, (self.item.width, self.item.height), self.size)

    def geometry(self) -> dict[str, torch.Tensor]:
        """(height, width) pairs describing the crop the latents were encoded from: the source media's size,
        the crop's top-left corner in the scaled source, the crop's size (SDXL's micro-conditioning)."""
        _, top_left = crop_geometry((self.item.width, self.item.height), self.size)
        return {"original_size": torch.tensor([self.item.height, self.item.width]),
                "crop_top_left": torch.tensor(top_left), "target_size": torch.tensor(self.size[::-1])}


class CachedDataset(Dataset):
    """The cached samples. Indexed by (index, epoch) (EpochBatchSampler, training), a sample's caption is drawn:
    the empty caption (`empty_text`) with probability `caption_dropout_p`, else one of its variants; indexed by
    index alone (eval), its first variant."""

    def __init__(self, samples: list[Sample], caption_dropout_p: float = 0.0, empty_text: Optional[Path] = None,
                 seed: int = 0):
        self.samples = samples
        self.caption_dropout_p = caption_dropout_p
        self.empty_text = empty_text
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        sample = self.samples[index]
        media = EmbeddingCache.read(sample.latent_path)
        text_path = sample.text_path if epoch is None else self.draw_text(index, epoch)
        item = {"latents": media.pop("latents"), "text": EmbeddingCache.read(text_path), **sample.geometry()}
        if "loss_mask" in media:
            item["loss_mask"] = media.pop("loss_mask")
        if media:  # conditioning cached beside the latents (e.g. an i2v first frame)
            item["cond"] = media
        return item

    def draw_text(self, index: int, epoch: int) -> Path:
        """The text entry sample `index` trains on in `epoch`: the same on every run with this seed."""
        rng = random.Random(f"{self.seed}:{epoch}:{index}")
        if rng.random() < self.caption_dropout_p:
            return self.empty_text
        return rng.choice(self.samples[index].texts).path


class EpochBatchSampler(BucketBatchSampler):
    """The training batches, each index paired with the epoch (CachedDataset seeds its caption draw with both)."""

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in super().__iter__():
            yield [(index, self.epoch) for index in batch]


class MediaToEncode(Dataset):
    """Decodes and crops media for caching, in worker processes: (index, pixels, controls [K, 3, h, w],
    loss mask [h, w] or empty)."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        sample = self.samples[index]
        if sample.frames:
            pixels = load_video(sample.item.path, sample.size, sample.frames)
        else:
            pixels = load_image(sample.item.path, sample.size)
        return index, pixels, sample.load_controls(), sample.load_mask()


TextCollate = Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]


def collate(batch: list[dict[str, Any]], collate_text: TextCollate = DiffusionModule.collate_text) -> dict[str, Any]:
    """`collate_text`: the family's (text tensors may differ in length; the family pads and masks them)."""
    out = {"latents": torch.stack([b["latents"] for b in batch]),
           "text": collate_text([b["text"] for b in batch]),
           **{k: torch.stack([b[k] for b in batch]) for k in GEOMETRY_KEYS}}
    if "cond" in batch[0]:
        out["cond"] = {k: torch.stack([b["cond"][k] for b in batch]) for k in batch[0]["cond"]}
    if any("loss_mask" in b for b in batch):  # an item of a folder without masks trains everywhere
        out["loss_mask"] = torch.stack([b.get("loss_mask", torch.ones(b["latents"].shape[-2:])) for b in batch])
    return out


class ResumableDataLoader(DataLoader):
    """Saves the data position as the trainer's count of batches done this epoch (exact even when workers
    prefetch), so a resumed run sees exactly the batches an uninterrupted run would."""

    trainer = None

    def state_dict(self) -> dict[str, int]:
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0
        return {"epoch": self.trainer.current_epoch if self.trainer else 0, "batches_yielded": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)


class DiffusionDataModule(LightningDataModule):
    def __init__(self, path: Optional[str] = None, directories: list[dict] = (), resolutions: list = (512,),
                 enable_ar_bucket: bool = True, min_ar: float = 0.5, max_ar: float = 2.0, num_ar_buckets: int = 7,
                 ar_buckets: Optional[list] = None, num_repeats: int = 1, caption_prefix: str = "",
                 frame_buckets: list = (1,), video_clip_mode: str = "single_beginning",
                 control_path: Optional[str] = None, control_paths: Optional[list[str]] = None, batch_size: int = 1,
                 num_workers: int = 0, cache_dir: Optional[str] = None, cache_workers: int = 1,
                 eval_datasets: list[dict] = (), seed: int = 42, recursive: bool = True,
                 caption_extension: str = CAPTION_SUFFIX, shuffle_tags: bool = False, keep_tokens: int = 0,
                 tag_separator: str = ", ", cache_shuffle_num: int = 0, mask_path: Optional[str] = None,
                 caption_dropout_p: float = 0.0):
        super().__init__()
        defaults = dict(resolutions=resolutions, enable_ar_bucket=enable_ar_bucket, min_ar=min_ar, max_ar=max_ar,
                        num_ar_buckets=num_ar_buckets, ar_buckets=ar_buckets, num_repeats=num_repeats,
                        caption_prefix=caption_prefix, frame_buckets=list(frame_buckets),
                        video_clip_mode=video_clip_mode, control_path=control_path, control_paths=control_paths,
                        recursive=recursive, caption_extension=caption_extension, shuffle_tags=shuffle_tags,
                        keep_tokens=keep_tokens, tag_separator=tag_separator, cache_shuffle_num=cache_shuffle_num,
                        mask_path=mask_path)
        self.directories = [_with_defaults({"path": path}, defaults)] if path else []
        self.directories += [_with_defaults(d, defaults) for d in directories]
        eval_defaults = {**defaults, "mask_path": None}  # the training masks name no held-out image
        self.eval_directories = {d["name"]: _with_defaults(d, eval_defaults) for d in eval_datasets}
        self.batch_size = batch_size
        self.num_workers = num_workers
        first = Path((self.directories or list(self.eval_directories.values()))[0]["path"])
        self.cache_root = Path(cache_dir) if cache_dir else first / ".difftrain_cache"
        self.cache_workers = cache_workers
        self.seed = seed
        self.caption_dropout_p = caption_dropout_p
        self.skipped: list[SkippedFile] = []
        self.encoded_latents = 0  # by this rank in the last setup(); 0 and 0: the encoders were not even loaded
        self.encoded_captions = 0
        self.train_set: Optional[CachedDataset] = None
        self.eval_sets: dict[str, CachedDataset] = {}

    @property
    def eval_names(self) -> tuple[str, ...]:
        return tuple(self.eval_directories)

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        module = self.trainer.lightning_module
        fingerprints = module.cache_fingerprints()
        train, evals = self.plan(module, fingerprints)
        empty_text = self._empty_text(module, fingerprints[1])
        self._fill_cache([s for samples in (train, *evals.values()) for s in samples], module, empty_text)
        train, evals = self._cached(train), {name: self._cached(samples) for name, samples in evals.items()}
        if not train:
            raise EmptyDatasetError(self._empty_dataset_message())
        self.train_set = CachedDataset(train, self.caption_dropout_p, empty_text and empty_text.path, self.seed)
        self.eval_sets = {name: CachedDataset(samples) for name, samples in evals.items()}

    def plan(self, module, fingerprints: tuple[str, str], save_probes: bool = True
             ) -> tuple[list[Sample], dict[str, list[Sample]]]:
        """Scans and buckets: the training samples (repeats included) and each eval set's, with the cache files
        they need under the family's (latent, text) `fingerprints`. Skipped files land in `self.skipped`.
        `save_probes`: remember the media verified (false for a dry run, which writes nothing)."""
        cache = EmbeddingCache(self.cache_root / module.cache_name)
        latent_fp, text_fp = fingerprints
        probes = ProbeIndex(self.cache_root / PROBE_INDEX_NAME)
        plan = lambda dirs, repeat: self._plan(dirs, cache, probes, latent_fp, text_fp, module, repeat)  # noqa: E731
        train = plan(self.directories, True)
        evals = {name: plan([d], False) for name, d in self.eval_directories.items()}
        if save_probes:
            probes.save()  # with the digests _plan computed
        if not train:
            raise EmptyDatasetError(self._empty_dataset_message())
        return train, evals

    def _empty_text(self, module, text_fingerprint: str) -> Optional[CachedText]:
        """The empty caption that caption dropout trains on (one cache entry per family), if it is on."""
        if not self.caption_dropout_p:
            return None
        return CachedText("", EmbeddingCache(self.cache_root / module.cache_name).text_path("", text_fingerprint))

    def _configured_folders(self) -> list[str]:
        """Every dataset, eval, control and mask folder: a recursive scan leaves out those nested in the one it
        scans."""
        directories = [*self.directories, *self.eval_directories.values()]
        return [folder for d in directories
                for folder in (d["path"], *control_folders(d), *filter(None, [d.get("mask_path")]))]

    def _empty_dataset_message(self) -> str:
        folders = ", ".join(str(d["path"]) for d in self.directories)
        skipped = f" {len(self.skipped)} file(s) were skipped (reasons logged above)." if self.skipped else ""
        return (f"The dataset is empty: no usable image with a caption in {folders}.{skipped} Each image (or video) "
                f"needs a <name>.txt caption beside it; point dataset.path (or dataset.directories) at such a folder.")

    def _plan(self, directories: list[dict], cache: EmbeddingCache, probes: ProbeIndex, latent_fp: str, text_fp: str,
              module, repeat: bool) -> list[Sample]:
        samples = []
        for directory in directories:
            ars = aspect_ratio_buckets(directory["enable_ar_bucket"], directory["min_ar"], directory["max_ar"],
                                       directory["num_ar_buckets"], directory["ar_buckets"])
            shuffle = TagShuffle.of(directory)
            for item, item_clips in self._scan(directory, probes, module).items():
                digest = probes.digest(item.path)
                controls = tuple(probes.digest(path) for path in item.controls)
                mask = probes.digest(item.mask) if item.mask else ""
                text_controls = controls if module.text_depends_on_images else ()
                captions = shuffle.captions(item.caption, directory["caption_prefix"], self.seed) if shuffle else (
                    item.caption,)
                for size in assign_buckets(item.width, item.height, directory["resolutions"], ars,
                                           module.pixels_round_to_multiple):
                    check_allowed_size(size, module, item.path)
                    texts = tuple(CachedText(caption, cache.text_path(caption, text_fp, text_controls, size))
                                  for caption in captions)
                    for frames in item_clips:
                        latent_path = cache.latent_path(digest, size, latent_fp, frames, controls, mask)
                        sample = Sample(item, size, latent_path, texts, frames)
                        samples += [sample] * (directory["num_repeats"] if repeat else 1)
        return samples

    def _scan(self, directory: dict, probes: ProbeIndex, module) -> dict[MediaItem, list[tuple[int, ...]]]:
        """The folder's usable items (with their controls) and the clips each contributes; reports the rest."""
        scan = self.scan_media(directory, probes)
        controls = ControlFolders(control_folders(directory), probes)
        masks = MaskFolder(directory.get("mask_path"), probes)
        items = [masks.attach(item) for item in scan.items]
        items = [controls.attach(item) if isinstance(item, MediaItem) else item for item in items]
        clips = {item: self._clips(item, directory, module) for item in items if isinstance(item, MediaItem)}
        skipped = scan.skipped + [s for s in [*items, *clips.values()] if isinstance(s, SkippedFile)]
        self._report(skipped)
        return {item: item_clips for item, item_clips in clips.items() if not isinstance(item_clips, SkippedFile)}

    def _report(self, skipped: list[SkippedFile]) -> None:
        for skip in sorted(skipped, key=lambda s: s.path):
            log.warning("Skipping %s: %s", skip.path, skip.reason)
            self.skipped.append(skip)

    def scan_media(self, directory: dict, probes: ProbeIndex) -> ScanResult:
        """The captioned media of the directory's `path` and what cannot be used (webdataset.py reads shards)."""
        return scan_directory(directory["path"], directory["caption_prefix"], probes, directory["recursive"],
                              exclude=self._configured_folders(), caption_extension=directory["caption_extension"])

    @staticmethod
    def _clips(item: MediaItem, directory: dict, module) -> list[tuple[int, ...]] | SkippedFile:
        """The clips (source frame indices) a video contributes, [()] for an image, or why the item is skipped."""
        check_media_kind(item, module)
        if not item.is_video:
            return [()]
        if not module.framerate:
            return SkippedFile(item.path, f"{type(module).__name__} trains on images only; use a video model "
                                          f"(e.g. model=wan21_t2v) to train on videos")
        buckets = frame_buckets_with_image(directory["frame_buckets"])
        check_frame_buckets(buckets, module.frames_multiple, directory)
        check_allowed_frames(buckets, module, directory)
        timeline = resample_indices(item.num_frames, item.fps, module.framerate)
        length = video_frame_bucket(len(timeline), buckets)
        if length is None:
            return SkippedFile(item.path, f"too short: {len(timeline)} frame(s) at {module.framerate} fps "
                                          f"({item.num_frames} at {float(item.fps):g} fps in the file), shorter than "
                                          f"the smallest video frame bucket ({buckets[1:] or 'none set'}); add a "
                                          f"smaller one to dataset.frame_buckets")
        starts = clip_starts(len(timeline), length, directory["video_clip_mode"])
        return [tuple(timeline[start:start + length]) for start in starts]

    def _fill_cache(self, samples: list[Sample], module, empty_text: Optional[CachedText] = None) -> None:
        """Encodes what the cache lacks (or holds unusable), `empty_text` included. Rank r encodes every
        world_size-th missing item once all ranks have checked the cache; all ranks then wait."""
        strategy = self.trainer.strategy
        rank, world = self.trainer.global_rank, self.trainer.world_size
        missing_latents = [s for s in _unique(samples) if _needs_encoding(s.latent_path, s.item.path)]
        texts = _unique_texts(samples) + ([(empty_text, None)] if empty_text else [])
        missing_text = [(text, s) for text, s in texts
                        if _needs_encoding(text.path, s.caption_path if s else "the empty caption")]
        strategy.barrier("cache checked")
        mine_latents, mine_text = missing_latents[rank::world], missing_text[rank::world]
        if mine_latents or mine_text:
            encoders = module.load_cache_encoders().to(strategy.root_device)
            check_accepts_controls(mine_latents, encoders, module)
            self._encode_latents(mine_latents, encoders)
            self._encode_captions(mine_text, encoders, module.text_depends_on_images)
            del encoders
            log.info("Cache: encoded %d latent(s) and %d caption(s) into %s.", len(mine_latents), len(mine_text),
                     self.cache_root)
        else:
            log.info("Cache: nothing for this process to encode in %s; encoders not loaded.", self.cache_root)
        self.encoded_latents, self.encoded_captions = len(mine_latents), len(mine_text)
        strategy.barrier("cache")

    def _encode_latents(self, samples: list[Sample], encoders) -> None:
        loader = DataLoader(MediaToEncode(samples), batch_size=None, num_workers=self.cache_workers)
        for index, pixels, controls, mask in tqdm(loader, total=len(samples), desc="Caching latents", unit="item"):
            with_controls = {"controls": controls.unsqueeze(0)} if len(controls) else {}
            encoded = encoders.encode_images(pixels.unsqueeze(0), **with_controls)
            tensors = {k: v[0] for k, v in encoded.items()} if isinstance(encoded, dict) else {"latents": encoded[0]}
            if mask.numel():
                tensors["loss_mask"] = latent_grid_mask(mask, tensors["latents"])
            _write_if_finite(samples[index].latent_path, tensors)

    def _encode_captions(self, texts: list[tuple[CachedText, Optional[Sample]]], encoders, with_images: bool,
                         batch_size: int = 16) -> None:
        """`texts`: each caption with its sample (None: the empty caption). `with_images`: the text encoders also
        see each item's controls (None for an item without)."""
        limit = TokenLimit.of(encoders)
        for start in tqdm(range(0, len(texts), batch_size), desc="Caching text", unit="batch"):
            chunk = texts[start:start + batch_size]
            images = {"images": [s.load_controls() if s and s.item.controls else None for _, s in chunk]
                      } if with_images else {}
            captions = [limit.fit(text.caption, s.caption_path) if limit and s else text.caption
                        for text, s in chunk]
            with quiet_truncation():
                encoded = encoders.encode_captions(captions, **images)
            for (text, _), tensors in zip(chunk, encoded):
                _write_if_finite(text.path, tensors)

    def _cached(self, samples: list[Sample]) -> list[Sample]:
        """The samples whose latents and text are cached; the others' came out of the encoders with NaN or infinite
        values (so they were not written) and are reported."""
        uncached = {s for s in set(samples) if not (EmbeddingCache.has(s.latent_path)
                                                     and all(EmbeddingCache.has(text.path) for text in s.texts))}
        self._report([SkippedFile(path, "encoding it (or its caption) gave NaN or infinite values, so nothing was "
                                        "cached") for path in {s.item.path for s in uncached}])
        return [s for s in samples if s not in uncached]

    def trained_sizes(self) -> list[str]:
        """The sizes the training buckets hold, most used first (see size_labels)."""
        return size_labels(self.train_set.samples) if self.train_set else []

    @property
    def num_items(self) -> int:
        """Media files trained on: repeats and the several buckets of one file count once."""
        return len({s.item.path for s in self.train_set.samples}) if self.train_set else 0

    def train_dataloader(self) -> ResumableDataLoader:
        loader = ResumableDataLoader(self.train_set, batch_sampler=self._batch_sampler(self.train_set, shuffle=True),
                                     collate_fn=self._collate(), num_workers=self.num_workers)
        loader.trainer = self.trainer
        return loader

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(dataset, batch_sampler=self._batch_sampler(dataset, shuffle=False),
                           collate_fn=self._collate()) for dataset in self.eval_sets.values()]

    def _batch_sampler(self, dataset: CachedDataset, shuffle: bool) -> BucketBatchSampler:
        """Batches of one bucket each; repeats of a sample (same latents) count as one item. Training batches
        (`shuffle`) carry the epoch for the caption draws."""
        sampler = EpochBatchSampler if shuffle else BucketBatchSampler
        return sampler([s.bucket for s in dataset.samples], self.batch_size, self.seed, rank=self.trainer.global_rank,
                       world_size=self.trainer.world_size, shuffle=shuffle,
                       item_keys=[s.latent_path for s in dataset.samples])

    def _collate(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return partial(collate, collate_text=self.trainer.lightning_module.collate_text)


def size_labels(samples: list[Sample]) -> list[str]:
    """'WxH' per training size ('WxHxF' for video clips of F frames), the most used first, then the largest."""
    counts = Counter(s.bucket[:3] for s in samples)
    ordered = sorted(counts, key=lambda b: (-counts[b], -b[0] * b[1] * b[2]))
    return [f"{w}x{h}" + (f"x{frames}" if frames > 1 else "") for w, h, frames in ordered]


def check_media_kind(item: MediaItem, module) -> None:
    """Image-to-video models learn to continue a first frame: an image cannot train them."""
    if module.requires_video and not item.is_video:
        raise ConfigError(f"{item.path} is an image, but {type(module).__name__} ({module.cache_name}) trains "
                          f"image-to-video and needs videos only (the first frame conditions the rest). Remove the "
                          f"images from the dataset, or use a text-to-video model such as model=wan21_t2v.")


def check_accepts_controls(samples: list[Sample], encoders, module) -> None:
    """Controls go to encode_images(pixels, controls=...): a family without that argument cannot train on them."""
    if not any(s.item.controls for s in samples):
        return
    parameters = inspect.signature(encoders.encode_images).parameters
    if "controls" not in parameters and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        raise ConfigError(f"The dataset has control images (dataset.control_path / control_paths, e.g. "
                          f"{samples[0].item.controls[0]}), but {type(module).__name__} ({module.cache_name}) does "
                          f"not train with control images. Use a model that does (an edit model such as "
                          f"model=flux_kontext), or remove control_path from the dataset.")


def check_frame_buckets(buckets: list[int], multiple: int, directory: dict) -> None:
    bad = [f for f in buckets if f < 1 or (f - 1) % multiple]
    if bad:
        raise ConfigError(f"dataset.frame_buckets={directory['frame_buckets']} (for {directory['path']}): {bad} "
                          f"cannot be encoded; frame counts must be of the form {multiple}k+1 "
                          f"(1, {multiple + 1}, {2 * multiple + 1}, ...) for this model's VAE.")


def check_allowed_size(size: tuple[int, int], module, path: Path) -> None:
    """A family that trains at a fixed set of sizes (`allowed_sizes`) refuses any other bucket."""
    allowed = module.allowed_sizes
    if allowed is not None and tuple(size) not in allowed:
        listed = ", ".join(f"{w}x{h}" for w, h in allowed)
        width, height = allowed[0]
        raise ConfigError(f"{path} falls in a {size[0]}x{size[1]} bucket, but {type(module).__name__} trains only at "
                          f"{listed} (width x height). Set dataset.resolutions=[[{width},{height}]] "
                          f"dataset.ar_buckets=[[{width},{height}]] (one entry per allowed size).")


def check_allowed_frames(buckets: list[int], module, directory: dict) -> None:
    """A family that trains on a fixed set of video lengths (`allowed_frames`) refuses other frame buckets."""
    allowed = module.allowed_frames
    bad = [f for f in buckets if f > 1 and f not in allowed] if allowed is not None else []
    if bad:
        raise ConfigError(f"dataset.frame_buckets={directory['frame_buckets']} (for {directory['path']}): {bad} "
                          f"frames, but {type(module).__name__} trains videos of {list(allowed)} frames only. Set "
                          f"dataset.frame_buckets={list(allowed)}.")


def _with_defaults(directory: dict, defaults: dict) -> dict:
    merged = {**defaults, **{k: v for k, v in directory.items() if v is not None}}
    if any(directory.get(k) is not None for k in CONTROL_KEYS):  # its own control folders replace the dataset's
        merged.update({k: directory.get(k) for k in CONTROL_KEYS})
    return {k: merged[k] for k in ("path", "name", *DIRECTORY_KEYS, *CONTROL_KEYS) if k in merged}


def control_folders(directory: dict) -> tuple[str, ...]:
    """The folder's control folders: `control_paths`, or `control_path` as the one."""
    single, several = directory.get("control_path"), directory.get("control_paths")
    if single is not None and several is not None:
        raise ConfigError(f"control_path={single} and control_paths={list(several)} are both set for "
                          f"{directory['path']}; list every control folder in control_paths.")
    if several is not None:
        return tuple(map(str, several))
    return () if single is None else (str(single),)


def _needs_encoding(entry: Path, source: Path) -> bool:
    """Whether the cache entry of `source` (a media or caption file) is missing or unusable (then said, once)."""
    problem = EmbeddingCache.problem(entry)
    if problem not in (None, "missing"):
        log.warning("The cache entry of %s (%s) %s: encoding it again.", source, entry, problem)
    return problem is not None


def _write_if_finite(entry: Path, tensors: dict[str, torch.Tensor]) -> None:
    try:
        EmbeddingCache.write(entry, tensors)
    except NonFiniteError:
        pass  # nothing written: the item is reported and left out once caching is done (see _cached)


def _unique(samples) -> list[Sample]:
    return list({s.latent_path: s for s in samples}.values())


def _unique_texts(samples: list[Sample]) -> list[tuple[CachedText, Sample]]:
    """Each caption variant once, with a sample it belongs to."""
    return list({text.path: (text, s) for s in samples for text in s.texts}.values())


def latent_grid_mask(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """A [h, w] pixel mask averaged down to the latents' grid (their last two dims)."""
    return F.interpolate(mask[None, None], size=latents.shape[-2:], mode="area")[0, 0]
