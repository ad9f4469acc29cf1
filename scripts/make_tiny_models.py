"""Build the tiny random-weight models used by tests, CI and the demo, and print their folders."""
import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from difftrain.tiny import CACHE_ENV, build_once, builders, tiny_model_dir  # noqa: E402


def parse_args(known: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build tiny random-weight models offline. Each folder holds the diffusers pipeline layout plus "
        "the family's single-file checkpoints. Existing folders are reused; delete one to rebuild it.",
        epilog=f"Cache root: ${CACHE_ENV} if set, else ~/.cache/difftrain/tiny.")
    parser.add_argument("families", nargs="*", metavar="family", help=f"default: all ({', '.join(known)})")
    parser.add_argument("--out", type=Path, help="write to OUT/<family> instead of the cache")
    args = parser.parse_args()
    unknown = sorted(set(args.families) - set(known))
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(known)}")
    return args


def main() -> None:
    models = builders()
    args = parse_args(list(models))
    for name in args.families or list(models):
        build = models[name]
        path = build_once(build, args.out / name) if args.out else tiny_model_dir(name, build)
        print(f"{name}: {path}", flush=True)


if __name__ == "__main__":
    main()
