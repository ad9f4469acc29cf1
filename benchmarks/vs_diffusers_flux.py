"""Steady-state training throughput of our trainer vs diffusers' own `train_dreambooth_lora_flux.py`, on the same
small Flux, images and LoRA: samples/s ours / theirs, with our `model.compile` off (eager) and on (compiled).

Both trainers run as they are meant to be run, as a whole command in a fresh process: ours `python train.py ...`,
theirs `python <their script> ...` (never edited; its path is `--diffusers-script`, in diffusers' repository
under examples/dreambooth). Each setting runs twice, for `--short-steps` S and `--long-steps` S + M optimizer
steps; everything a run does once (imports, model loading, caching, compiling, saving) takes the same time in
both, so M / (T_long - T_short) is its steady-state training rate (samples/s at batch 1), with no timer inside
either trainer. The settings are interleaved in every trial, in alternating order, so that they see the same
machine load, and the medians over `--trials` are compared. One untimed short compiled run first fills the
inductor cache (a folder of this run's), so every timed compiled run pays the same warm-cache compile.
See benchmarks/README.md."""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (EXAMPLE_IMAGES, ROOT, TINY_TEXT_WIDTH, compose_config, instantiate_module, median,
                     print_table, small_flux, small_flux_pipeline_folder, verdict)

from PIL import Image

SETTINGS = ("ours eager", "ours compiled", "theirs")
TARGET_RATIO = 1.25  # ours compiled / theirs
PROMPT = "a photo of sks shape"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers-script", type=Path, required=True,
                   help="diffusers' examples/dreambooth/train_dreambooth_lora_flux.py")
    p.add_argument("--short-steps", type=int, default=5, help="S: optimizer steps of the short run")
    p.add_argument("--long-steps", type=int, default=35, help="S + M: optimizer steps of the long run")
    p.add_argument("--trials", type=int, default=2, help="(short, long) pairs per setting")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS / MKL_NUM_THREADS of every run")
    p.add_argument("--compile", choices=("true", "max-autotune"), default="max-autotune",
                   help="model.compile of the compiled setting")
    p.add_argument("--resolution", type=int, default=512, help="square image side in px")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--layers", type=int, default=2, help="double-stream blocks")
    p.add_argument("--single-layers", type=int, default=4, help="single-stream blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads of dim 64")
    return p.parse_args()


# --- the shared inputs: model folder, images, LoRA targets
def write_images(folder: Path, side: int, captions: bool) -> Path:
    """The bundled example images (8) resized to side x side (no crop left to do), captioned PROMPT if `captions`
    (theirs reads every file in its folder as an image and takes the caption from --instance_prompt)."""
    folder.mkdir(parents=True)
    for i, source in enumerate(sorted(EXAMPLE_IMAGES.glob("*.jpg"))):
        Image.open(source).convert("RGB").resize((side, side), Image.BICUBIC).save(folder / f"{i:03d}.png")
        if captions:
            (folder / f"{i:03d}.txt").write_text(PROMPT)
    return folder


def our_lora_targets(work: Path, model_dir: Path, transformer) -> list[str]:
    """The Linear layers our FluxModule puts LoRA on (every Linear of every block), so theirs trains the same."""
    module = instantiate_module(compose_config(work / "targets", "model=flux", f"model.diffusers_path={model_dir}"))
    return module.lora_target_modules(transformer)


# --- the two commands
def our_command(compiled: bool, steps: int, out: Path, args, model_dir: Path, images: Path) -> list[str]:
    """Exports and checkpoints only at the end (a step count past the run), as theirs."""
    never = 10 * args.long_steps
    return [sys.executable, str(ROOT / "train.py"), f"run_dir={out / 'run'}", f"outputs_root={out}",
            f"dataset.cache_dir={out / 'cache'}", "logger=none", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "model=flux", f"model.diffusers_path={model_dir}",
            "model.dtype=float32", f"model.compile={args.compile if compiled else 'false'}", f"dataset.path={images}",
            f"dataset.resolutions=[{args.resolution}]", "dataset.enable_ar_bucket=false", "adapter=lora",
            f"adapter.rank={args.rank}", f"trainer.max_steps={steps}", "trainer.max_epochs=-1", "seed=0",
            "save_every_n_epochs=null", f"save_every_n_steps={never}", f"checkpoint_every_n_steps={never}"]


def their_command(steps: int, out: Path, args, model_dir: Path, images: Path, lora_targets: list[str]) -> list[str]:
    """Our settings where theirs differ: LoRA alpha = rank and our layers, guidance 1, our optimizer's learning rate
    (conf/optimizer/adamw.yaml), constant without warmup."""
    return [sys.executable, str(args.diffusers_script), f"--pretrained_model_name_or_path={model_dir}",
            f"--instance_data_dir={images}", f"--instance_prompt={PROMPT}", f"--output_dir={out}",
            f"--resolution={args.resolution}", "--train_batch_size=1", f"--rank={args.rank}",
            f"--lora_alpha={args.rank}", f"--lora_layers={','.join(lora_targets)}", f"--max_train_steps={steps}",
            "--cache_latents", "--mixed_precision=no", "--guidance_scale=1", "--learning_rate=2e-4",
            "--lr_scheduler=constant", "--lr_warmup_steps=0", "--seed=0",
            f"--checkpointing_steps={10 * args.long_steps}"]  # LoRA saved at the end only


def run_env(threads: int, work: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "TQDM_DISABLE": "1", "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache")}


def timed_run(command: list[str], env: dict[str, str], out: Path) -> float:
    """Wall time of the whole command; its output goes to <out>.log, shown if it fails."""
    log = out.with_suffix(".log")
    start = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{log.read_text()[-5000:]}")
    shutil.rmtree(out, ignore_errors=True)  # the run's exports, caches and checkpoints
    return seconds


# --- the measurement
class Bench:
    def __init__(self, args, work: Path, model_dir: Path, lora_targets: list[str]):
        self.args, self.work, self.model_dir, self.lora_targets = args, work, model_dir, lora_targets
        self.our_images = write_images(work / "images-captioned", args.resolution, captions=True)
        self.their_images = write_images(work / "images", args.resolution, captions=False)
        self.env = run_env(args.threads, work)
        self.runs = 0

    def seconds(self, setting: str, steps: int) -> float:
        self.runs += 1
        out = self.work / f"run{self.runs:03d}"
        if setting == "theirs":
            command = their_command(steps, out, self.args, self.model_dir, self.their_images, self.lora_targets)
        else:
            command = our_command(setting == "ours compiled", steps, out, self.args, self.model_dir,
                                  self.our_images)
        return timed_run(command, self.env, out)

    def samples_per_second(self, setting: str) -> float:
        """M / (T_long - T_short) at batch 1."""
        short = self.seconds(setting, self.args.short_steps)
        long = self.seconds(setting, self.args.long_steps)
        if long <= short:
            print(f"{setting}: the long run took no longer than the short one ({long:.0f} s, {short:.0f} s): the "
                  "machine's load changed between them; its rate is meaningless", flush=True)
        return (self.args.long_steps - self.args.short_steps) / (long - short)


def measure(bench: Bench, trials: int) -> dict[str, list[float]]:
    bench.seconds("ours compiled", bench.args.short_steps)  # untimed: fills the inductor cache
    rates = {setting: [] for setting in SETTINGS}
    for trial in range(trials):
        for setting in SETTINGS if trial % 2 == 0 else SETTINGS[::-1]:
            rates[setting].append(bench.samples_per_second(setting))
            print(f"trial {trial + 1}: {setting}: {rates[setting][-1]:.3f} samples/s", flush=True)
    return rates


def report(args, transformer, lora_targets: list[str], rates: dict[str, list[float]]) -> None:
    params = sum(p.numel() for p in transformer.parameters())
    steps = args.long_steps - args.short_steps
    print_table(f"Steady-state samples/s (median of {args.trials}), small Flux ({params:,} transformer params, "
                f"LoRA rank {args.rank} on {len(lora_targets)} Linear layers), {args.resolution} px, float32, "
                f"batch 1, {args.threads} threads, model.compile={args.compile}, {steps} steps ({args.long_steps} - {args.short_steps})",
                ["trainer", "samples/s", "min", "max"],
                [[setting, median(r), min(r), max(r)] for setting, r in rates.items()])
    eager, compiled, theirs = (median(rates[s]) for s in SETTINGS)
    print(f"\nratio ours eager / theirs:    {eager / theirs:.3f}")
    print(f"ratio ours compiled / theirs: {compiled / theirs:.3f}  {verdict(compiled / theirs, TARGET_RATIO, False)}")
    print(f"ratio compiled / eager:       {compiled / eager:.3f}")


def main() -> None:
    args = parse_args()
    if not args.diffusers_script.is_file():
        sys.exit(f"--diffusers-script: no such file {args.diffusers_script}")
    with tempfile.TemporaryDirectory(prefix="bench-vs-diffusers-") as tmp:
        work = Path(tmp)
        transformer = small_flux(args.layers, args.single_layers, args.heads, text_width=TINY_TEXT_WIDTH)
        model_dir = small_flux_pipeline_folder(transformer, work / "small-flux")
        lora_targets = our_lora_targets(work, model_dir, transformer)
        rates = measure(Bench(args, work, model_dir, lora_targets), args.trials)
    report(args, transformer, lora_targets, rates)


if __name__ == "__main__":
    main()
