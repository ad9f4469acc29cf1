"""Images per second of filling the latent cache with the tiny Flux VAE, dataset.cache_workers=1 vs 2; with
--family, clips per second of a video family's tiny VAE on the bundled example videos.

Each run is a real `trainer.fit(max_steps=0)` of the composed config: DiffusionDataModule.setup scans the folder,
loads the cache encoders and encodes everything into a fresh, empty cache; the fit then stops before any step.
The example images are copied --repeat times (each copy re-saved with its own JPEG comment, so its bytes, and so
its cache key, differ while its pixels do not). After one untimed warm-up run, runs alternate the order of the
worker counts across trials, to spread the drift of a shared machine. See benchmarks/README.md."""
import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _common import (EXAMPLE_IMAGES, ROOT, add_threads_option, bench_trainer, compose_config, default_device,
                     instantiate_module, limit_cpu_threads, median, print_table, quiet)

import torch
from hydra.utils import instantiate
from PIL import Image

from difftrain.datamodules.datamodule import DiffusionDataModule
from difftrain.datamodules.media import is_image_file

EXAMPLE_VIDEOS = ROOT / "data" / "examples" / "videos"
VIDEOS = ("model.tiny=true", "dataset=videos", "dataset.video_clip_mode=multiple_overlapping")
FAMILIES = {"flux": ("model=flux_tiny",), "ltx_video": ("model=ltx_video", *VIDEOS)}  # video families: clips/s


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=FAMILIES, default="flux",
                   help="whose tiny VAE encodes: flux (the example images) or a video family (the example videos)")
    p.add_argument("--repeat", type=int, default=8, help="copies of the 8 example images (8 -> 64 images)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="cache_workers values to compare")
    p.add_argument("--trials", type=int, default=2, help="runs per worker count; the order alternates")
    add_threads_option(p)
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed first run (it pays one-off costs: kernel selection, lazy imports)")
    return p.parse_args()


class TimedDataModule(DiffusionDataModule):
    """The real datamodule, clocking its whole setup and its latent-encoding loop (where cache_workers acts)."""

    def setup(self, stage: str) -> None:
        start = time.perf_counter()
        super().setup(stage)
        self.setup_seconds = time.perf_counter() - start

    def _encode_latents(self, samples, encoders) -> None:
        start = time.perf_counter()
        super()._encode_latents(samples, encoders)
        self.latent_seconds = time.perf_counter() - start
        self.latents_timed = len(samples)


def copy_distinct(source: Path, target: Path, repeat: int) -> int:
    """Copies of every captioned image, re-saved alike but each with its own JPEG comment: the copies of one image
    decode to the same pixels yet have different bytes, so none is deduplicated by the content-hashed cache."""
    target.mkdir(parents=True)
    images = sorted(p for p in source.iterdir() if is_image_file(p))
    for k in range(repeat):
        for image in images:
            stem = f"{k:03d}_{image.stem}"
            with Image.open(image) as img:
                img.save(target / f"{stem}.jpg", quality=95, comment=f"copy {k}".encode())
            shutil.copyfile(image.with_suffix(".txt"), target / f"{stem}.txt")
    return repeat * len(images)


def cache_once(dataset_dir: Path, run_dir: Path, workers: int, args: argparse.Namespace) -> TimedDataModule:
    """One fresh cache (under run_dir) filled by the real fit-time setup."""
    resolution = args.resolution
    cfg = compose_config(run_dir, *FAMILIES[args.family], f"dataset.path={dataset_dir}",
                         f"dataset.resolutions=[{resolution}]", f"dataset.cache_workers={workers}",
                         f"dataset.cache_dir={run_dir / 'cache'}")
    datamodule = instantiate(cfg.dataset, _target_=f"{__name__}.{TimedDataModule.__name__}", seed=cfg.seed,
                             _convert_="all")
    bench_trainer(cfg, max_steps=0).fit(instantiate_module(cfg), datamodule=datamodule)
    return datamodule


def run_order(workers: list[int], trials: int) -> list[int]:
    """1 2 | 2 1 | 1 2 ...: each worker count goes first as often as last."""
    return [w for t in range(trials) for w in (workers if t % 2 == 0 else workers[::-1])]


def time_runs(dataset_dir: Path, work_dir: Path, args: argparse.Namespace) -> dict[int, list[TimedDataModule]]:
    if not args.no_warmup:
        cache_once(dataset_dir, work_dir / "run-warmup", args.workers[0], args)
    runs = {w: [] for w in args.workers}
    for i, workers in enumerate(run_order(args.workers, args.trials)):
        datamodule = cache_once(dataset_dir, work_dir / f"run-{i}", workers, args)
        runs[workers].append(datamodule)
        print(f"run {i + 1}: cache_workers={workers}  {datamodule.latents_timed} latents in "
              f"{datamodule.latent_seconds:.2f}s", flush=True)
    return runs


def report(runs: dict[int, list[TimedDataModule]], images: int, args: argparse.Namespace) -> None:
    rows, speed = [], {}
    unit = "img/s" if args.family == "flux" else "clips/s"
    for workers, datamodules in runs.items():
        latents = datamodules[0].latents_timed
        speed[workers] = median([latents / d.latent_seconds for d in datamodules])
        rows.append([workers, len(datamodules), latents, speed[workers],
                     median([latents / d.setup_seconds for d in datamodules])])
    print_table(f"Caching {images} {'images' if args.family == 'flux' else 'clips'} at {args.resolution}px with the "
                f"tiny {args.family} VAE "
                f"({torch.get_num_threads()} torch threads in the main process)",
                ["cache_workers", "runs", "latents/run", f"{unit} latent loop (median)", f"{unit} whole setup (median)"],
                rows)
    base = args.workers[0]
    for workers in args.workers[1:]:
        print(f"\nratio {unit} cache_workers={workers} / cache_workers={base}: {speed[workers] / speed[base]:.3f}")


def main() -> None:
    args = parse_args()
    quiet()
    limit_cpu_threads(args.threads, default_device())
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        if args.family == "flux":
            images = copy_distinct(EXAMPLE_IMAGES, Path(tmp) / "images", args.repeat)
            runs = time_runs(Path(tmp) / "images", Path(tmp), args)
        else:  # every run fills a fresh cache: the videos need no distinct copies
            runs = time_runs(EXAMPLE_VIDEOS, Path(tmp), args)
            images = next(iter(runs.values()))[0].latents_timed
    report(runs, images, args)


if __name__ == "__main__":
    main()
