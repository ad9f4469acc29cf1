"""Regenerate the bundled edit example dataset (data/examples/edit) from the example images: each control
(control/<stem>, the source image) is an example image as it is, and the target (<stem>.jpg) an edited version
of it, captioned with the edit. One control is a PNG: controls match their targets by stem, any image extension.
Deterministic; the files are committed, this documents their origin."""
import argparse
import shutil
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

ROOT = Path(__file__).resolve().parents[1]


def swap_red_and_blue(image: Image.Image) -> Image.Image:
    red, green, blue = image.split()
    return Image.merge("RGB", (blue, green, red))


def add_border(image: Image.Image) -> Image.Image:
    border = min(image.size) // 8
    return ImageOps.expand(ImageOps.crop(image, border), border, fill="black")


def add_square(image: Image.Image) -> Image.Image:
    edited = image.copy()
    side = min(image.size) // 4
    ImageDraw.Draw(edited).rectangle((side // 4, side // 4, side // 4 + side, side // 4 + side), fill="white")
    return edited


EDITS = {  # source stem: (edit, caption)
    "00_red_circle": (swap_red_and_blue, "make the circle blue and the background light blue"),
    "01_green_square": (ImageOps.invert, "invert the colours"),
    "02_blue_triangle": (lambda image: ImageOps.grayscale(image).convert("RGB"), "make the picture black and white"),
    "03_yellow_circle": (add_square, "add a small white square in the top left corner"),
    "04_purple_square": (add_border, "add a thick black border"),
}
PNG_CONTROLS = ("04_purple_square",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=ROOT / "data/examples/images")
    parser.add_argument("--out", type=Path, default=ROOT / "data/examples/edit")
    args = parser.parse_args()
    controls = args.out / "control"
    controls.mkdir(parents=True, exist_ok=True)
    for stem, (edit, caption) in EDITS.items():
        source = args.source / f"{stem}.jpg"
        with Image.open(source) as image:
            edit(image.convert("RGB")).save(args.out / f"{stem}.jpg", quality=90)
            if stem in PNG_CONTROLS:
                image.save(controls / f"{stem}.png")
            else:
                shutil.copy(source, controls)
        (args.out / f"{stem}.txt").write_text(caption + "\n")
    print(f"wrote {len(EDITS)} target/control pairs to {args.out}")


if __name__ == "__main__":
    main()
