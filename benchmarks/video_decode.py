"""Clips per second of video decode + preprocess (PyAV decode, framerate resampling, resize, centre crop) for the
bundled example videos, with 1 vs 2 decoding worker processes (dataset.cache_workers).

The clips are the ones the real datamodule plans for `model=<--model> dataset=videos` (its `_plan`: scan, the
family's framerate, frame bucket, clip mode, at --resolution), repeated --repeat times; each is produced by the
real `MediaToEncode` (`load_video`) through the same DataLoader the cache fill uses, minus the VAE. Runs alternate
the order of the worker counts across trials, after one untimed warm-up. See benchmarks/README.md."""
import argparse
import tempfile
import time
from pathlib import Path

from _common import (add_threads_option, compose_config, default_device, interleaved_trials, limit_cpu_threads, median,
                     print_ratios, print_table, quiet)

from hydra.utils import instantiate
from torch.utils.data import DataLoader

from difftrain.datamodules.cache import EmbeddingCache
from difftrain.datamodules.datamodule import MediaToEncode, Sample
from difftrain.datamodules.media import ProbeIndex


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=16, help="passes over the example clips per run (4 clips each)")
    p.add_argument("--resolution", type=int, default=256, help="bucket side the clips are resized/cropped to")
    p.add_argument("--clip-mode", default="multiple_overlapping", help="dataset.video_clip_mode")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="decoding worker processes to compare")
    p.add_argument("--trials", type=int, default=3, help="runs per worker count; the order alternates")
    p.add_argument("--model", default="wan22_low", help="the family whose framerate and frame rule plan the clips")
    p.add_argument("overrides", nargs="*", help="more config overrides, e.g. for the tiny Cosmos 1.0 (its one "
                   "size and length): dataset.enable_ar_bucket=false dataset.frame_buckets=[9] with --resolution 32")
    add_threads_option(p)
    return p.parse_args()


def planned_clips(args: argparse.Namespace, work_dir: Path) -> list[Sample]:
    """The clips the real datamodule plans for the example videos (no encoder is loaded)."""
    cfg = compose_config(work_dir / "run", f"model={args.model}", "model.tiny=true", "dataset=videos",
                         f"dataset.resolutions=[{args.resolution}]", f"dataset.video_clip_mode={args.clip_mode}",
                         *args.overrides)
    datamodule = instantiate(cfg.dataset, seed=cfg.seed, _convert_="all")
    module = instantiate(cfg.model, adapter=cfg.adapter, optimizer=cfg.optimizer, scheduler=cfg.scheduler,
                         _recursive_=False)
    samples = datamodule._plan(datamodule.directories, EmbeddingCache(work_dir / "cache"),
                               ProbeIndex(work_dir / "probes.json"), "bench", "bench", module, repeat=False)
    return samples * args.repeat


def clips_per_second(samples: list[Sample], workers: int) -> float:
    loader = DataLoader(MediaToEncode(samples), batch_size=None, num_workers=workers)
    start = time.perf_counter()
    frames = sum(pixels.shape[1] for _, pixels, *_ in loader)
    seconds = time.perf_counter() - start
    assert frames == sum(len(s.frames) for s in samples)
    return len(samples) / seconds


def main() -> None:
    args = parse_args()
    quiet()
    limit_cpu_threads(args.threads, default_device())
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        samples = planned_clips(args, Path(tmp))
    clips_per_second(samples[:4], args.workers[0])  # warm-up: imports, codec setup
    speed = interleaved_trials(args.workers, args.trials, lambda workers, _: clips_per_second(samples, workers),
                               "clips/s")
    frames = sum(len(s.frames) for s in samples) / len(samples)
    print_table(f"{args.model}: decoding {len(samples)} clips ({frames:.1f} frames each on average) of the example "
                f"videos at {args.resolution}px", ["workers", "runs", "clips/s (median)"],
                [[w, len(v), median(v)] for w, v in speed.items()])
    print_ratios(speed, "clips/s, workers")


if __name__ == "__main__":
    main()
