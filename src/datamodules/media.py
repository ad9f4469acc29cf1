"""Media-folder scanning and loading: one image or video per item, its caption in `<stem>.txt` beside it (or
another `caption_extension`), and optionally control / reference images or a loss mask with the same stem in
other folders (`ControlFolders`).

Videos are decoded with PyAV. A video item records its decoded frame count and framerate; `resample_indices`
maps it onto a model's framerate and `load_video` decodes the chosen frames as one clip.
Scanning decodes every file to catch corrupt ones; a `ProbeIndex` remembers each verdict so an unchanged file is
decoded only once."""

import errno
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from stat import S_ISDIR, S_ISREG
from typing import Optional

import av
import torch
from PIL import ExifTags, Image, ImageOps
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from difftrain.config.validate import ConfigError
from difftrain.utils.atomic import write_text

from .cache import file_digest

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".gif", ".mkv"})
CAPTION_SUFFIX = ".txt"
_IMAGE_TYPES = " ".join(sorted(extension[1:] for extension in IMAGE_EXTENSIONS))
_VIDEO_TYPES = " ".join(sorted(extension[1:] for extension in VIDEO_EXTENSIONS))
# EXIF orientations 5-8 include a 90-degree rotation, so width and height swap.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_WHITE = (255, 255, 255, 255)
# How PIL opens 16-bit grayscale (PNG); 16-bit RGB(A) it opens as 8-bit RGB(A) itself.
_16_BIT_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
PROBE_INDEX_VERSION = 1
Probe = tuple[int, int, int, Optional[Fraction]]  # (width, height, frames, fps); fps None for an image


@dataclass(frozen=True)
class MediaItem:
    path: Path
    caption: str
    width: int  # after EXIF transpose
    height: int
    num_frames: int = 1  # decoded frames of a video; 1 for an image
    fps: Optional[Fraction] = None  # a video's average framerate; None for an image
    controls: tuple[Path, ...] = ()  # control / reference images, one per control folder
    mask: Optional[Path] = None  # loss mask: white trains, black is ignored
    caption_path: Optional[Path] = field(default=None, compare=False)  # its caption's file, for messages

    @property
    def is_video(self) -> bool:
        return self.fps is not None


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass
class ScanResult:
    items: list[MediaItem] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def scan_directory(path: str | Path, caption_prefix: str = "", probe_index: Optional["ProbeIndex"] = None,
                   recursive: bool = True, exclude: Sequence[str | Path] = (),
                   caption_extension: str = CAPTION_SUFFIX) -> ScanResult:
    """Collect images and videos captioned in `<stem><caption_extension>` in `path` and, if `recursive`, its
    subfolders (not hidden ones, nor those in `exclude`, such as control folders), and report every file that
    cannot be used, each with its reason.
    With a `probe_index`, files it has already verified unchanged are not decoded again; it is saved afterwards."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"Dataset directory not found: {directory}")
    if not caption_extension.startswith(".") or len(caption_extension) < 2:
        raise ConfigError(f"dataset.caption_extension={caption_extension!r} (for {directory}) is not a file "
                          f"extension: start it with a dot, e.g. .caption")
    result = ScanResult()
    for entries in _folders(directory, recursive, {Path(folder).resolve() for folder in exclude}):
        _scan_folder(entries, caption_prefix, probe_index, recursive, result, caption_extension)
    result.skipped.sort(key=lambda skipped: skipped.path)
    if probe_index is not None:
        probe_index.save()
    return result


def _folders(directory: Path, recursive: bool, excluded: set[Path]) -> Iterator[list[Path]]:
    """The visible entries (names not starting with ".") of `directory`, then of each subfolder if `recursive`,
    symlinked ones included; each real folder once, none of the `excluded` (real paths)."""
    excluded.add(directory.resolve())
    entries = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
    yield entries
    for entry in entries if recursive else ():
        if entry.is_dir() and entry.resolve() not in excluded:
            yield from _folders(entry, recursive, excluded)


def _scan_folder(entries: list[Path], caption_prefix: str, probe_index: Optional["ProbeIndex"], recursive: bool,
                 result: ScanResult, caption_extension: str) -> None:
    """One folder's items and skipped entries: its media, then captions left over."""
    media = [p for p in entries if is_image_file(p) or is_video_file(p)]
    for media_path in media:
        item_or_skip = _scan_media(media_path, caption_prefix, probe_index, recursive, caption_extension)
        (result.items if isinstance(item_or_skip, MediaItem) else result.skipped).append(item_or_skip)
    media_stems = {p.stem for p in media}
    for caption in (p for p in entries if p.suffix == caption_extension and p.stem not in media_stems):
        unsupported = [p for p in entries if p.stem == caption.stem and p.suffix not in ("", caption_extension)
                       and not p.is_dir()]
        result.skipped.extend(SkippedFile(p, f"unsupported file type {p.suffix!r} (images: {_IMAGE_TYPES}; videos: "
                                             f"{_VIDEO_TYPES}); its caption {caption.name} is not used")
                              for p in unsupported)
        if not unsupported:
            result.skipped.append(SkippedFile(caption, "caption file without a matching image or video"))


def _scan_media(media_path: Path, caption_prefix: str, probe_index: Optional["ProbeIndex"], recursive: bool,
                caption_extension: str) -> MediaItem | SkippedFile:
    unreadable = _not_a_file(media_path)
    if unreadable:
        scanned = " (its contents are scanned as a subfolder)" if recursive and media_path.is_dir() else ""
        return SkippedFile(media_path, f"is {unreadable}, not a readable {_media_kind(media_path)} file{scanned}")
    probe = _probe_file(media_path, probe_index)
    if isinstance(probe, str):
        return SkippedFile(media_path, probe)
    caption_path = media_path.with_suffix(caption_extension)
    caption = _read_caption(media_path, caption_path)
    if isinstance(caption, SkippedFile):
        return caption
    return MediaItem(media_path, caption_prefix + caption, *probe, caption_path=caption_path)


def _not_a_file(path: Path) -> Optional[str]:
    """What `path` is when no file can be read there ("a folder", "missing", ...), or None: it is a file (or a
    symbolic link to one)."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "a symbolic link loop"
        if path.is_symlink():
            return f"a broken symbolic link (its target {os.readlink(path)} does not exist)"
        return "missing"
    if S_ISREG(mode):
        return None
    return "a folder" if S_ISDIR(mode) else "a special file (FIFO, socket or device)"


def _probe_file(path: Path, probe_index: Optional["ProbeIndex"]) -> Probe | str:
    """`probe_media`'s verdict, remembered in `probe_index` if given; an empty file is refused unread."""
    stat = path.stat()
    if stat.st_size == 0:
        return f"empty {_media_kind(path)} file (0 bytes)"
    return probe_index.probe(path, stat) if probe_index is not None else probe_media(path)


class ControlFolders:
    """The control / reference images of a dataset folder's targets (edit datasets): in each control folder,
    the image with the target's stem, any image extension. Images there without a target are ignored.
    `kind`, `folder_kind` and `keys` name the images, their folders and the config keys in messages (MaskFolder:
    the loss masks)."""

    kind, folder_kind, keys = "control image", "Control", "dataset.control_path (or control_paths)"

    def __init__(self, folders: Sequence[str | Path], probe_index: Optional["ProbeIndex"] = None):
        self.folders = [Path(folder) for folder in folders]
        missing = [str(folder) for folder in self.folders if not folder.is_dir()]
        if missing:
            raise ConfigError(f"{self.folder_kind} folder(s) not found: {', '.join(missing)}. {self.keys} "
                              f"should name folders of {self.kind}s named like their targets.")
        self.images = [_images_by_stem(folder) for folder in self.folders]
        self.probe_index = probe_index

    def attach(self, item: MediaItem) -> MediaItem | SkippedFile:
        """The item with its controls (one from each folder), or why it cannot be used."""
        found = self.find(item)
        return found if isinstance(found, SkippedFile) else replace(item, controls=found)

    def find(self, item: MediaItem) -> tuple[Path, ...] | SkippedFile:
        """The item's image in each folder, or why it cannot be used."""
        images = []
        for folder, by_stem in zip(self.folders, self.images):
            image = by_stem.get(item.path.stem)
            if image is None:
                return SkippedFile(item.path, f"no {self.kind} for it in {folder} (expected {item.path.stem} "
                                              f"with an image extension: {', '.join(sorted(IMAGE_EXTENSIONS))})")
            verdict = _probe_file(image, self.probe_index)
            if isinstance(verdict, str):
                return SkippedFile(item.path, f"its {self.kind} {image} cannot be used: {verdict}")
            images.append(image)
        return tuple(images)


class MaskFolder(ControlFolders):
    """A dataset folder's loss masks (`mask_path`): the image with the target's stem, any image extension."""

    kind, folder_kind, keys = "mask", "Mask", "dataset.mask_path"

    def __init__(self, folder: Optional[str | Path], probe_index: Optional["ProbeIndex"] = None):
        super().__init__([] if folder is None else [folder], probe_index)

    def attach(self, item: MediaItem) -> MediaItem | SkippedFile:
        """The item with its mask (if the folder has masks), or why it cannot be used."""
        found = self.find(item)
        return found if isinstance(found, SkippedFile) else replace(item, mask=next(iter(found), None))


def _images_by_stem(folder: Path) -> dict[str, Path]:
    """Each stem's image in `folder` (of several with one stem, the first by name)."""
    images = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and is_image_file(path) and not path.name.startswith("."):
            images.setdefault(path.stem, path)
    return images


def _media_kind(path: Path) -> str:
    return "video" if is_video_file(path) else "image"


def probe_media(path: Path) -> Probe | str:
    """(width, height, frames, fps) of an image or video, or why it is unreadable; decodes the whole file."""
    try:
        if is_video_file(path):
            return probe_video(path)
        return (*read_verified_size(path), 1, None)
    # PIL and FFmpeg decoders raise many exception types on malformed data (OSError, SyntaxError, av errors, ...).
    except Exception as exc:
        return f"unreadable {_media_kind(path)}: {exc}"


class ProbeIndex:
    """Each media file's probe verdict (`probe_media`'s result or skip reason) and content digest in a JSON file,
    keyed by absolute path, size and mtime_ns: an unchanged file is neither decoded nor read again, a new or
    changed one is probed and hashed as usual.
    A missing, corrupt or other-version index file, or a malformed entry, is ignored and rewritten."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries = self._load()
        self.changed = False

    def _load(self) -> dict:
        try:
            index = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(index, dict) or index.get("version") != PROBE_INDEX_VERSION:
            return {}
        files = index.get("files")
        return files if isinstance(files, dict) else {}

    def probe(self, media_path: Path, stat: os.stat_result) -> Probe | str:
        entry = self._entry(media_path, stat)
        remembered = _decode_verdict(entry.get("verdict"))
        if remembered is not None:
            return remembered
        verdict = probe_media(media_path)
        entry["verdict"] = _encode_verdict(verdict)
        self.changed = True
        return verdict

    def digest(self, media_path: Path) -> str:
        """The file's content digest (the cache key), computed once per version of the file."""
        entry = self._entry(media_path, media_path.stat())
        if not isinstance(entry.get("digest"), str):
            entry["digest"] = file_digest(media_path)
            self.changed = True
        return entry["digest"]

    def _entry(self, media_path: Path, stat: os.stat_result) -> dict:
        """The file's entry, emptied if the file changed since it was written."""
        key = str(media_path.absolute())
        stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        entry = self.entries.get(key)
        if not isinstance(entry, dict) or entry.get("stamp") != stamp:
            entry = self.entries[key] = {"stamp": stamp}
            self.changed = True
        return entry

    def save(self) -> None:
        if self.changed:
            write_text(self.path, json.dumps({"version": PROBE_INDEX_VERSION, "files": self.entries}))
            self.changed = False


def _encode_verdict(verdict: Probe | str) -> dict:
    if isinstance(verdict, str):
        return {"skip": verdict}
    width, height, num_frames, fps = verdict
    return {"width": width, "height": height, "num_frames": num_frames, "fps": None if fps is None else str(fps)}


def _decode_verdict(verdict) -> Probe | str | None:
    """The verdict `_encode_verdict` stored, or None if it is malformed."""
    try:
        if "skip" in verdict:
            return verdict["skip"] if isinstance(verdict["skip"], str) else None
        fps = None if verdict["fps"] is None else Fraction(verdict["fps"])
        return int(verdict["width"]), int(verdict["height"]), int(verdict["num_frames"]), fps
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _read_caption(media_path: Path, caption_path: Path) -> str | SkippedFile:
    unreadable = _not_a_file(caption_path)
    if unreadable == "missing":
        return SkippedFile(media_path, f"no caption file: expected {caption_path} (dataset.caption_extension: "
                                       f"{caption_path.suffix})")
    if unreadable:
        return SkippedFile(media_path, f"its caption {caption_path} is {unreadable}, not a file")
    try:
        # utf-8-sig also accepts the byte-order mark some Windows editors write.
        return caption_path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        return SkippedFile(media_path, f"caption file {caption_path} is not valid UTF-8: {exc}")


def read_verified_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF transpose; decodes the whole file so truncated images raise."""
    with Image.open(path) as img:
        width, height = img.size
        if img.getexif().get(ExifTags.Base.Orientation) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        # JPEG can decode at 1/8 scale: much faster, still reads every byte, so truncation is still caught.
        img.draft("RGB", (1, 1))
        img.load()
    return width, height


def probe_video(path: Path) -> tuple[int, int, int, Fraction]:
    """(width, height, frames, average fps); decodes every frame, so a truncated or corrupt file raises."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        fps = stream.average_rate or stream.guessed_rate
        num_frames = sum(1 for _ in container.decode(stream))
        width, height = stream.codec_context.width, stream.codec_context.height
    if num_frames == 0 or not fps:
        raise ValueError(f"no decodable frames or no framerate ({num_frames} frames, {fps} fps)")
    return width, height, num_frames, Fraction(fps)


def resample_indices(num_frames: int, fps: Fraction, target_fps: int) -> list[int]:
    """Source frame shown at each tick of a `target_fps` clock over the video's duration (num_frames / fps):
    frame k of the resampled video is source frame floor(k * fps / target_fps). Slower sources repeat frames,
    faster ones drop them; exact (rational) arithmetic, so 32 fps -> 16 fps takes every second frame."""
    step = Fraction(fps) / target_fps
    return [math.floor(k * step) for k in range(math.ceil(num_frames / step))]


def load_video(path: str | Path, size: tuple[int, int], frame_indices: Sequence[int]) -> torch.Tensor:
    """Float32 [3, F, h, w] in [-1, 1]: the decoded frames at `frame_indices` (source indices, repeats allowed),
    each scaled to cover `size` and centre-cropped like an image."""
    wanted, last = set(frame_indices), max(frame_indices)
    frames = {}
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                frames[index] = torch.from_numpy(frame.to_ndarray(format="rgb24"))
            if index >= last:
                break
    if len(frames) < len(wanted):
        raise ValueError(f"{path}: decoded {len(frames)} of the {len(wanted)} frames wanted (up to index {last}); "
                         f"the file changed or is damaged since it was scanned")
    pixels = torch.stack([frames[i] for i in frame_indices]).permute(0, 3, 1, 2)  # [F, 3, H, W]
    return _cover_crop(pixels, size).permute(1, 0, 2, 3)


def load_image(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """Float32 [3, h, w] in [-1, 1]: EXIF-transposed, alpha on white, scaled to cover `size`, centre-cropped."""
    with Image.open(path) as img:
        pixels = F.pil_to_tensor(_to_rgb(ImageOps.exif_transpose(img)))
    return _cover_crop(pixels, size)


def load_mask(path: str | Path, source_size: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Float32 [h, w] in [0, 1] (1: white, trains): the grayscale mask scaled to its target's (w, h) `source_size`,
    then cropped to `size` exactly as the target is."""
    with Image.open(path) as img:
        mask = F.pil_to_tensor(ImageOps.exif_transpose(img).convert("L"))
    mask = F.resize(mask, list(source_size[::-1]), interpolation=InterpolationMode.NEAREST)
    return ((_cover_crop(mask, size)[0] + 1) / 2).clamp(0, 1)


def _cover_crop(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [..., C, H, W] -> float32 in [-1, 1], scaled to cover `size` = (w, h) and centre-cropped to it."""
    width, height = size
    source_height, source_width = pixels.shape[-2:]
    cover, (top, left) = crop_geometry((source_width, source_height), size)
    pixels = F.resize(pixels, list(cover), interpolation=InterpolationMode.BICUBIC, antialias=True)
    pixels = F.crop(pixels, top, left, height, width)
    return F.to_dtype(pixels, torch.float32, scale=True) * 2 - 1


def crop_geometry(source_size: tuple[int, int], size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where `_cover_crop` takes a (w, h) `size` crop from a (w, h) `source_size` image: ((cover_h, cover_w), the
    scaled size covering `size`; (top, left), the crop's corner in it). SDXL conditions on these."""
    width, height = size
    source_width, source_height = source_size
    scale = max(width / source_width, height / source_height)
    # max() guards against float rounding leaving the cover one pixel short of the target.
    cover = (max(height, round(source_height * scale)), max(width, round(source_width * scale)))
    return cover, (int(round((cover[0] - height) / 2.0)), int(round((cover[1] - width) / 2.0)))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _16_BIT_GRAY_MODES:  # PIL's own conversion clips these at 255 (white) instead of scaling
        img = img.convert("I").point(lambda value: value / 257 + 0.5, "L")
    if not img.has_transparency_data:
        return img.convert("RGB")
    background = Image.new("RGBA", img.size, _WHITE)
    return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
