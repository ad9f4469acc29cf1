"""Webdataset shards as a dataset (`dataset=webdataset`): tar files holding each image or video with its caption
under one key (`000017.jpg` + `000017.txt`), at local paths or any URL webdataset opens (https://, pipe:, ...),
brace patterns and '::'-separated lists included (`scripts/make_shards.py` writes them from a folder).

setup() reads every shard once, on every rank (each needs the whole sample list to build the same buckets). Each
captioned media member is unpacked into the cache folder under its content digest, so it is written once however
often the shards are read, and from there it is probed, bucketed, cached (the cache keys are the folders': a
member's latents are those of the same file in a folder) and trained on exactly as a file of a dataset folder
(DiffusionDataModule). What cannot be used is reported as <shard>/<member> and skipped."""
import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import webdataset as wds

from difftrain.utils.atomic import replacing

from .datamodule import DiffusionDataModule
from .media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MediaItem, ProbeIndex, ScanResult, SkippedFile, _probe_file
from .shards import default_cache_dir, shard_urls

MEMBERS_FOLDER = "shard_members"  # in the cache root: the unpacked media members, by content digest
CAPTION = "txt"  # the caption member's extension


class WebDataModule(DiffusionDataModule):
    """The folder datamodule reading tar shards: `shards`, and the `path` of any `directories` or `eval_datasets`
    entry, name shards (webdataset notation; shards.check_shards has checked them). Every other key means what it
    means for folders."""

    def __init__(self, shards: str, path: None = None, cache_dir: Optional[str] = None, **kwargs):
        """`path`: null here (the folders' key, inherited from images.yaml)."""
        super().__init__(path=shards, cache_dir=cache_dir or default_cache_dir(shards), **kwargs)
        self.members_root = self.cache_root / MEMBERS_FOLDER

    def plan(self, module, fingerprints: tuple[str, str], save_probes: bool = True):
        """A dry run (`save_probes` false) writes nothing: it unpacks the members into a temporary folder."""
        if save_probes:
            return super().plan(module, fingerprints, save_probes)
        with tempfile.TemporaryDirectory() as members:
            self.members_root = Path(members)
            return super().plan(module, fingerprints, save_probes)

    def scan_media(self, directory: dict, probes: ProbeIndex) -> ScanResult:
        return scan_shards(directory["path"], directory["caption_prefix"], probes, self.members_root)

    def _empty_dataset_message(self) -> str:
        shards = ", ".join(d["path"] for d in self.directories)
        skipped = f" {len(self.skipped)} member(s) were skipped (reasons logged above)." if self.skipped else ""
        return (f"The dataset is empty: no usable image with a caption in the shards {shards}.{skipped} Each image "
                f"(or video) member needs a caption member with its key (<key>.jpg + <key>.txt); point "
                f"dataset.shards at such shards (scripts/make_shards.py writes them from a folder).")


def scan_shards(shards: str, caption_prefix: str, probes: ProbeIndex, members_root: Path) -> ScanResult:
    """The captioned media members of the shards, in shard order, unpacked under `members_root`; the members
    (and shards) that cannot be used are in `skipped`."""
    result = ScanResult()
    for url in shard_urls(shards):
        for sample in _samples(url, result.skipped):
            for item in _sample_items(sample, caption_prefix, probes, members_root):
                (result.items if isinstance(item, MediaItem) else result.skipped).append(item)
    return result


def _samples(url: str, skipped: list[SkippedFile]) -> Iterator[dict]:
    """The shard's samples ({"__key__": key, "__url__": url, extension: bytes, ...}); a shard that cannot be read
    to its end (missing, truncated, unreachable) is reported and the rest of it skipped."""
    try:
        yield from wds.tarfile_samples([{"url": url}])
    # tarfile, gzip, the URL's opener (curl, a pipe) and webdataset's grouping raise many exception types.
    except Exception as exc:
        reason = exc.args[0] if exc.args else repr(exc)  # webdataset appends the stream and URL to the args
        skipped.append(SkippedFile(Path(url), f"unreadable shard, members after the damage are skipped: {reason}"))


def _sample_items(sample: dict, caption_prefix: str, probes: ProbeIndex, members_root: Path
                  ) -> Iterator[MediaItem | SkippedFile]:
    """Each media member of the sample with the sample's caption, or why it cannot be used."""
    media = [extension for extension in sample if f".{extension}" in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS]
    if not media and CAPTION in sample:
        yield SkippedFile(_member(sample, CAPTION), "caption without an image or video member of the same key")
    for extension in media:
        member = _member(sample, extension)
        caption = _caption(sample, member)
        if isinstance(caption, SkippedFile):
            yield caption
            continue
        path = unpack(sample[extension], member.name, members_root)
        probe = _probe_file(path, probes)
        yield SkippedFile(member, probe) if isinstance(probe, str) else MediaItem(path, caption_prefix + caption, *probe)


def _member(sample: dict, extension: str) -> Path:
    """The member as reported: the shard's path or URL, then the member's name."""
    return Path(sample["__url__"]) / f"{sample['__key__']}.{extension}"


def _caption(sample: dict, member: Path) -> str | SkippedFile:
    """The caption of the sample's media `member`, or why it has none."""
    caption_name = f"{sample['__key__']}.{CAPTION}"
    if CAPTION not in sample:
        return SkippedFile(member, f"no caption: expected a member {caption_name} beside it in the shard")
    try:
        # utf-8-sig also accepts the byte-order mark some Windows editors write.
        return sample[CAPTION].decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        return SkippedFile(member, f"its caption {caption_name} is not valid UTF-8: {exc}")


def unpack(data: bytes, name: str, root: Path) -> Path:
    """A file holding `data` under `root`, named by its digest and `name` (for its extension, and for whoever
    reads a path in a message); written the first time these bytes are seen."""
    digest = hashlib.sha256(data).hexdigest()
    path = root / digest[:2] / f"{digest[:16]}-{name}"
    if not path.is_file():
        with replacing(path) as tmp:
            tmp.write_bytes(data)
    return path
