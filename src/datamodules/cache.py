"""On-disk cache of latents and text embeddings, one safetensors file per item.

A latent's key hashes the media file's bytes (and those of its control images and loss mask), the crop size, a
video clip's frames and the VAE's fingerprint; a text embedding's key hashes the caption and the text encoders'
fingerprint (and, for text encoders that see the control images, their bytes and crop size). So a change of family, encoder,
resolution or file content misses exactly the affected items, and an unchanged item is never encoded twice.
Files are written atomically; a truncated file fails the size check and is re-encoded, never trained on. Tensors
with NaN or infinite values are neither written nor read (`NonFiniteError`)."""
import hashlib
import json
import struct
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from difftrain.utils.atomic import save_safetensors

SAMPLE = 1 << 20


def fingerprint_files(*paths: Path, extra: str = "") -> str:
    """Identifies encoders by their files on disk without loading (or fully reading) them: each file's name,
    size and three 1 MiB samples (start, middle, end)."""
    h = hashlib.sha256(extra.encode())
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            size = file.stat().st_size
            h.update(f"{file.name}:{size}".encode())
            with open(file, "rb") as f:
                for offset in sorted({0, max(0, size // 2 - SAMPLE // 2), max(0, size - SAMPLE)}):
                    f.seek(offset)
                    h.update(f.read(SAMPLE))
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_complete_safetensors(path: Path) -> bool:
    """True if the header parses and the file holds every byte the header announces."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error):
        return False
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return size == 8 + header_len + end


class NonFiniteError(ValueError):
    """A cache entry's tensors hold NaN or infinite values."""


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The tensors, if every value is finite; else NonFiniteError naming the entry's file and tensors."""
    bad = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if bad:
        raise NonFiniteError(f"cache entry {path}: {', '.join(bad)} hold(s) NaN or infinite values")
    return tensors


class EmbeddingCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def latent_path(self, content_digest: str, size: tuple[int, int], encoder_fingerprint: str,
                    frames: tuple[int, ...] = (), control_digests: tuple[str, ...] = (), mask_digest: str = "") -> Path:
        """`frames`: the source frame indices of a video clip (an image's key has none); `control_digests`: the
        content digests of the item's control images (none: the key of an item without controls); `mask_digest`:
        its loss mask's (cached in the entry), if it has one."""
        clip = f":frames={','.join(map(str, frames))}" if frames else ""
        mask = f":mask={mask_digest}" if mask_digest else ""
        key = hashlib.sha256(f"{content_digest}:{size[0]}x{size[1]}:{encoder_fingerprint}{clip}"
                             f"{_controls_key(control_digests)}{mask}".encode()).hexdigest()
        return self.root / "latents" / key[:2] / f"{key}.safetensors"

    def text_path(self, caption: str, encoder_fingerprint: str, control_digests: tuple[str, ...] = (),
                  size: tuple[int, int] = (0, 0)) -> Path:
        """`control_digests` and `size` only for text encoders that see the controls (cropped to `size`)."""
        images = f"{_controls_key(control_digests)}@{size[0]}x{size[1]}" if control_digests else ""
        key = hashlib.sha256(f"{caption}\0{encoder_fingerprint}{images}".encode()).hexdigest()
        return self.root / "text" / key[:2] / f"{key}.safetensors"

    @staticmethod
    def has(path: Path) -> bool:
        """Whether the entry is there and complete (its header and size only: no tensor is read)."""
        return is_complete_safetensors(path)

    @staticmethod
    def problem(path: Path) -> Optional[str]:
        """Why the entry cannot be trained on ("missing", ...), or None; reads its tensors to check every value."""
        if not path.exists():
            return "missing"
        if not is_complete_safetensors(path):
            return "is incomplete (its write was cut short)"
        try:
            EmbeddingCache.read(path)
        except NonFiniteError:
            return "holds NaN or infinite values"
        return None

    @staticmethod
    def write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        """Writes the entry atomically; NonFiniteError (and nothing written) if a value is NaN or infinite."""
        save_safetensors(check_finite({k: v.detach().cpu() for k, v in tensors.items()}, path), path)

    @staticmethod
    def read(path: Path) -> dict[str, torch.Tensor]:
        return check_finite(load_file(path), path)


def _controls_key(control_digests: tuple[str, ...]) -> str:
    return f":controls={','.join(control_digests)}" if control_digests else ""
