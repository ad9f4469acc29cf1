"""Build the tiny random-weight models used by tests, CI and the demo, and print their folders."""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from src.tiny import BUILDERS, CACHE_ENV, FACTORY_VERSION, build_once, tiny_model_dir  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=f"Build tiny random-weight models offline (factory v{FACTORY_VERSION}). Each folder holds "
        "the diffusers pipeline layout plus the family's single-file checkpoints. Existing folders are "
        "reused; delete one to rebuild it.",
        epilog=f"Cache root: ${CACHE_ENV} if set, else ~/.cache/difftrain/tiny.")
    parser.add_argument("families", nargs="*", metavar="family", help=f"default: all ({', '.join(BUILDERS)})")
    parser.add_argument("--out", type=Path, help="write to OUT/<family> instead of the cache")
    args = parser.parse_args()
    unknown = sorted(set(args.families) - set(BUILDERS))
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(BUILDERS)}")
    return args


def main() -> None:
    args = parse_args()
    for family in args.families or list(BUILDERS):
        path = build_once(family, args.out / family) if args.out else tiny_model_dir(family)
        print(f"{family}: {path}", flush=True)


if __name__ == "__main__":
    main()
