"""Image-folder scanning and loading: one image per item, its caption in `<stem>.txt` beside it."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import ExifTags, Image, ImageOps
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
CAPTION_SUFFIX = ".txt"
# EXIF orientations 5-8 include a 90-degree rotation, so width and height swap.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_WHITE = (255, 255, 255, 255)


@dataclass(frozen=True)
class MediaItem:
    path: Path
    caption: str
    width: int  # after EXIF transpose
    height: int


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


def scan_directory(path: str | Path, caption_prefix: str = "") -> ScanResult:
    """Collect captioned images in `path` (not recursive) and report every file that cannot be used."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"Dataset directory not found: {directory}")
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if is_image_file(p)]
    result = ScanResult()
    for image_path in images:
        item_or_skip = _scan_image(image_path, caption_prefix)
        if isinstance(item_or_skip, MediaItem):
            result.items.append(item_or_skip)
        else:
            result.skipped.append(item_or_skip)
    image_stems = {p.stem for p in images}
    result.skipped.extend(
        SkippedFile(p, "caption file without a matching image")
        for p in files
        if p.suffix == CAPTION_SUFFIX and p.stem not in image_stems
    )
    result.skipped.sort(key=lambda skipped: skipped.path)
    return result


def _scan_image(image_path: Path, caption_prefix: str) -> MediaItem | SkippedFile:
    if image_path.stat().st_size == 0:
        return SkippedFile(image_path, "empty image file (0 bytes)")
    try:
        width, height = read_verified_size(image_path)
    # PIL decoders raise many exception types on malformed data (OSError, SyntaxError, struct.error, ...).
    except Exception as exc:
        return SkippedFile(image_path, f"unreadable image: {exc}")
    caption_path = image_path.with_suffix(CAPTION_SUFFIX)
    if not caption_path.is_file():
        return SkippedFile(image_path, f"no caption file: expected {caption_path}")
    try:
        # utf-8-sig also accepts the byte-order mark some Windows editors write.
        caption = caption_path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        return SkippedFile(image_path, f"caption file {caption_path} is not valid UTF-8: {exc}")
    return MediaItem(image_path, caption_prefix + caption, width, height)


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


def load_image(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """Float32 [3, h, w] in [-1, 1]: EXIF-transposed, alpha on white, scaled to cover `size`, centre-cropped."""
    width, height = size
    with Image.open(path) as img:
        pixels = F.pil_to_tensor(_to_rgb(ImageOps.exif_transpose(img)))
    source_height, source_width = pixels.shape[-2:]
    scale = max(width / source_width, height / source_height)
    # max() guards against float rounding leaving the cover one pixel short of the target.
    cover = [max(height, round(source_height * scale)), max(width, round(source_width * scale))]
    pixels = F.resize(pixels, cover, interpolation=InterpolationMode.BICUBIC, antialias=True)
    pixels = F.center_crop(pixels, [height, width])
    return F.to_dtype(pixels, torch.float32, scale=True) * 2 - 1


def _to_rgb(img: Image.Image) -> Image.Image:
    if not img.has_transparency_data:
        return img.convert("RGB")
    background = Image.new("RGBA", img.size, _WHITE)
    return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
