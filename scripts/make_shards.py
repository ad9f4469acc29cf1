"""Write webdataset shards (for `dataset=webdataset`) from a dataset folder: each image or video with its caption
(<name>.txt beside it) becomes one sample, key <name>, in name order, at most --maxcount samples per shard.
Each shard is written to a temporary file and renamed when complete, so a shard is whole or absent.

    python scripts/make_shards.py data/examples/images /data/shards/examples --maxcount 1000
"""
import argparse
import sys
from pathlib import Path

from tqdm import tqdm
from webdataset import TarWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory
from difftrain.datamodules.media import CAPTION_SUFFIX, is_image_file, is_video_file  # noqa: E402
from difftrain.utils.atomic import replacing  # noqa: E402

SHARD_NAME = "shard-{}.tar"  # formatted with a 6-digit number or a brace range of them


def folder_samples(folder: Path) -> list[dict[str, Path]]:
    """{"__key__": key, extension: file} for each stem of a media or caption file, in name order: the folder as it
    is, so training reports a missing caption as it would for the folder. Keys have no dots (webdataset splits a
    member's name at its first dot), so dots in names become underscores."""
    samples: dict[str, dict] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if not (is_image_file(path) or is_video_file(path) or path.suffix == CAPTION_SUFFIX):
            continue
        key, extension = path.stem.replace(".", "_"), path.suffix[1:].lower()
        sample = samples.setdefault(key, {"__key__": key})
        if extension in sample:
            raise SystemExit(f"Error: {sample[extension]} and {path} would both be member {key}.{extension}; "
                             f"rename one of them.")
        sample[extension] = path
    return list(samples.values())


def write_shards(samples: list[dict[str, Path]], out_dir: Path, maxcount: int) -> list[Path]:
    shards = [out_dir / SHARD_NAME.format(f"{i:06d}") for i in range((len(samples) + maxcount - 1) // maxcount)]
    with tqdm(total=len(samples), desc="Writing shards", unit="sample") as progress:
        for index, shard in enumerate(shards):
            with replacing(shard) as tmp, TarWriter(str(tmp), encoder=False, mtime=0) as writer:
                for sample in samples[index * maxcount:(index + 1) * maxcount]:
                    writer.write({k: v if k == "__key__" else v.read_bytes() for k, v in sample.items()})
                    progress.update()
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a dataset folder: images or videos with <name>.txt captions")
    parser.add_argument("out_dir", type=Path, help="where the shards go (shard-000000.tar, ...)")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    args = parser.parse_args()
    if not args.folder.is_dir():
        raise SystemExit(f"Error: {args.folder} is not a folder; give a folder of images or videos with captions.")
    if args.maxcount < 1:
        raise SystemExit(f"Error: --maxcount={args.maxcount} must be at least 1.")
    samples = folder_samples(args.folder)
    if not samples:
        raise SystemExit(f"Error: no image, video or caption in {args.folder}.")
    shards = write_shards(samples, args.out_dir, args.maxcount)
    print(f"Wrote {len(samples)} sample(s) into {len(shards)} shard(s). Train on them with:\n"
          f"  python train.py dataset=webdataset 'dataset.shards=\"{shard_pattern(shards)}\"'")


def shard_pattern(shards: list[Path]) -> str:
    """The shards in webdataset's brace notation."""
    if len(shards) == 1:
        return str(shards[0].resolve())
    return str(shards[0].parent.resolve() / SHARD_NAME.format(f"{{000000..{len(shards) - 1:06d}}}"))


if __name__ == "__main__":
    main()
