"""Regenerate the bundled example dataset (data/examples/images): small drawings of coloured shapes with
captions, in several aspect ratios. Deterministic; the files are committed, this documents their origin."""
import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (240, 210, 40),
           "purple": (140, 60, 180), "white": (245, 245, 245), "black": (20, 20, 20), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = [(192, 128), (128, 192), (160, 160), (256, 128), (144, 176), (176, 144), (160, 160), (128, 256)]


def draw(shape: str, colour: str, background: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    image = Image.new("RGB", size, COLOURS[background])
    w, h = size
    r = min(w, h) // 3
    cx, cy = w // 2 + rng.randint(-r // 2, r // 2), h // 2 + rng.randint(-r // 2, r // 2)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data/examples/images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    names = list(COLOURS)
    for i, size in enumerate(SIZES):
        shape, colour = SHAPES[i % len(SHAPES)], names[i % len(names)]
        background = names[(i + 3) % len(names)]
        stem = args.out / f"{i:02d}_{colour}_{shape}"
        draw(shape, colour, background, size, rng).save(stem.with_suffix(".jpg"), quality=90)
        stem.with_suffix(".txt").write_text(f"a {colour} {shape} on a {background} background\n")
    print(f"wrote {len(SIZES)} images to {args.out}")


if __name__ == "__main__":
    main()
