"""Regenerate the bundled example video dataset (data/examples/videos): a few short clips of moving coloured
shapes with captions, in the containers a dataset may hold (mp4, webm, mov, gif), at several framerates and
aspect ratios. Deterministic; the files are committed, this documents their origin."""
import argparse
from dataclasses import dataclass
from pathlib import Path

import av
import numpy
from make_example_data import COLOURS
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class Clip:
    stem: str
    shape: str
    colour: str
    background: str
    motion: str  # how the shape moves, in the caption
    size: tuple[int, int]
    frames: int
    fps: int
    codec: str
    suffix: str


CLIPS = [
    Clip("00_red_circle", "circle", "red", "blue", "moves from left to right", (64, 64), 33, 24, "libx264", ".mp4"),
    Clip("01_green_square", "square", "green", "black", "grows", (64, 64), 25, 16, "libvpx-vp9", ".webm"),
    Clip("02_yellow_triangle", "triangle", "yellow", "purple", "falls down", (64, 48), 20, 10, "gif", ".gif"),
    Clip("03_orange_circle", "circle", "orange", "white", "moves from right to left", (96, 64), 33, 16, "mpeg4",
         ".mov"),
]


def frame(clip: Clip, t: float) -> numpy.ndarray:
    """The clip's picture at time t in [0, 1]."""
    w, h = clip.size
    image = Image.new("RGB", clip.size, COLOURS[clip.background])
    r = min(w, h) // 5
    cx, cy = w // 2, h // 2
    if clip.motion == "moves from left to right":
        cx = round(r + t * (w - 2 * r))
    elif clip.motion == "moves from right to left":
        cx = round(w - r - t * (w - 2 * r))
    elif clip.motion == "falls down":
        cy = round(r + t * (h - 2 * r))
    elif clip.motion == "grows":
        r = round(r * (0.5 + 1.5 * t))
    pen = ImageDraw.Draw(image)
    box = (cx - r, cy - r, cx + r, cy + r)
    if clip.shape == "circle":
        pen.ellipse(box, fill=COLOURS[clip.colour])
    elif clip.shape == "square":
        pen.rectangle(box, fill=COLOURS[clip.colour])
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[clip.colour])
    return numpy.asarray(image)


def write_video(path: Path, frames: list[numpy.ndarray], fps: int, codec: str) -> None:
    """Encode RGB frames with PyAV (gif: palette frames; others: yuv420p)."""
    # bitexact: no encoder version strings or random (Matroska) ids, so a rerun writes identical bytes.
    with av.open(str(path), "w", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=fps, options={"threads": "1", "flags": "+bitexact"})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data/examples/videos")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for clip in CLIPS:
        frames = [frame(clip, i / (clip.frames - 1)) for i in range(clip.frames)]
        write_video(args.out / f"{clip.stem}{clip.suffix}", frames, clip.fps, clip.codec)
        caption = f"a {clip.colour} {clip.shape} {clip.motion} on a {clip.background} background\n"
        (args.out / f"{clip.stem}.txt").write_text(caption)
    print(f"wrote {len(CLIPS)} videos to {args.out}")


if __name__ == "__main__":
    main()
