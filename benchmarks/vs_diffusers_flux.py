"""Steady-state training throughput of our trainer vs diffusers' own `train_dreambooth_lora_flux.py`, on the same
small Flux, images and LoRA: samples/s ours / theirs, with our `model.compile` off (eager) and on (`--compile`:
true, per block, and whole, one graph, by default).

Both trainers run as they are meant to be run, as a whole command in a fresh process: ours `python train.py ...`,
theirs `python <their script> ...` (never edited; its path is `--diffusers-script`, in diffusers' repository
under examples/dreambooth). Nothing is timed inside either: both log every optimizer step to TensorBoard by their
own means (ours `logger=tensorboard`, theirs its default `--report_to=tensorboard`), and each event carries the
wall time it was written at. The steady-state rate of a run is read off those times, after `--warmup` steps (the
compile happens in the first): steps / seconds between the first and the last logged step of the window, and the
median time between two consecutive steps (robust to a stall of the machine). The settings are interleaved in
every trial, in alternating order, so that they see the same machine load; medians over `--trials` are compared.
See benchmarks/README.md."""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import (EXAMPLE_IMAGES, ROOT, TINY_TEXT_WIDTH, compose_config, instantiate_module, median,
                     print_table, small_flux, small_flux_pipeline_folder, verdict)

from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

TARGET_RATIO = 1.25  # ours compiled / theirs
PROMPT = "a photo of sks shape"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers-script", type=Path, required=True,
                   help="diffusers' examples/dreambooth/train_dreambooth_lora_flux.py")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of each run")
    p.add_argument("--warmup", type=int, default=8, help="first steps left out of the rate (the compile is in them)")
    p.add_argument("--trials", type=int, default=3, help="runs per setting")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS / MKL_NUM_THREADS of every run")
    p.add_argument("--compile", nargs="+", choices=("true", "max-autotune", "whole"), default=["true", "whole"],
                   help="model.compile of each compiled setting")
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
def our_command(compile: str, steps: int, out: Path, args, model_dir: Path, images: Path) -> list[str]:
    """Exports and checkpoints only at the end (a step count past the run), as theirs."""
    never = 10 * args.steps
    return [sys.executable, str(ROOT / "train.py"), f"run_dir={out / 'run'}", f"outputs_root={out}",
            f"dataset.cache_dir={out / 'cache'}", "logger=tensorboard", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "model=flux", f"model.diffusers_path={model_dir}",
            "model.dtype=float32", f"model.compile={compile}", f"dataset.path={images}",
            f"dataset.resolutions=[{args.resolution}]", "dataset.enable_ar_bucket=false", "adapter=lora",
            f"adapter.rank={args.rank}", f"trainer.max_steps={steps}", "trainer.max_epochs=-1", "seed=0",
            "save_every_n_epochs=null", f"save_every_n_steps={never}", f"checkpoint_every_n_steps={never}"]


def their_command(steps: int, out: Path, args, model_dir: Path, images: Path, lora_targets: list[str]) -> list[str]:
    """Our settings where theirs differ: LoRA alpha = rank and our layers, guidance 1, our optimizer's learning rate
    (conf/optimizer/adamw.yaml), constant without warmup. It logs to TensorBoard by default."""
    return [sys.executable, str(args.diffusers_script), f"--pretrained_model_name_or_path={model_dir}",
            f"--instance_data_dir={images}", f"--instance_prompt={PROMPT}", f"--output_dir={out}",
            f"--resolution={args.resolution}", "--train_batch_size=1", f"--rank={args.rank}",
            f"--lora_alpha={args.rank}", f"--lora_layers={','.join(lora_targets)}", f"--max_train_steps={steps}",
            "--cache_latents", "--mixed_precision=no", "--guidance_scale=1", "--learning_rate=2e-4",
            "--lr_scheduler=constant", "--lr_warmup_steps=0", "--seed=0",
            f"--checkpointing_steps={10 * args.steps}"]  # LoRA saved at the end only


def run_env(threads: int, work: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "TQDM_DISABLE": "1", "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache")}


def run_and_read_step_times(command: list[str], env: dict[str, str], out: Path) -> list[float]:
    """Runs the whole command (its output goes to <out>.log, shown if it fails) and returns the wall time at which
    it logged each optimizer step, read from the TensorBoard event files it wrote under `out`."""
    log = out.with_suffix(".log")
    with log.open("w") as f:
        done = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{log.read_text()[-5000:]}")
    first_logged = {}
    for events in sorted(out.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(events)).Load():
            if event.summary.value:
                first_logged.setdefault(event.step, event.wall_time)
    shutil.rmtree(out, ignore_errors=True)  # the run's exports, caches and checkpoints
    return [first_logged[step] for step in sorted(first_logged)]


def steady_rates(step_times: list[float], warmup: int) -> tuple[float, float]:
    """(steps / seconds over the window after `warmup` steps, 1 / the median time between consecutive steps)."""
    window = step_times[warmup:]
    if len(window) < 3:
        sys.exit(f"only {len(step_times)} logged steps: --steps must exceed --warmup by 3 or more")
    gaps = [later - earlier for earlier, later in zip(window, window[1:])]
    return len(gaps) / (window[-1] - window[0]), 1 / median(gaps)


# --- the measurement
class Bench:
    def __init__(self, args, work: Path, model_dir: Path, lora_targets: list[str]):
        self.args, self.work, self.model_dir, self.lora_targets = args, work, model_dir, lora_targets
        self.our_images = write_images(work / "images-captioned", args.resolution, captions=True)
        self.their_images = write_images(work / "images", args.resolution, captions=False)
        self.env = run_env(args.threads, work)
        self.runs = 0

    def rates(self, setting: str) -> tuple[float, float]:
        self.runs += 1
        out = self.work / f"run{self.runs:03d}"
        if setting == "theirs":
            command = their_command(self.args.steps, out, self.args, self.model_dir, self.their_images,
                                    self.lora_targets)
        else:
            command = our_command(our_compile(setting), self.args.steps, out, self.args, self.model_dir,
                                  self.our_images)
        return steady_rates(run_and_read_step_times(command, self.env, out), self.args.warmup)


def settings(compiles: list[str]) -> list[str]:
    return ["ours eager", *(f"ours compile={compile}" for compile in compiles), "theirs"]


def our_compile(setting: str) -> str:
    return "false" if setting == "ours eager" else setting.removeprefix("ours compile=")


def measure(bench: Bench, trials: int) -> dict[str, list[tuple[float, float]]]:
    chosen = settings(bench.args.compile)
    rates = {setting: [] for setting in chosen}
    for trial in range(trials):
        for setting in chosen if trial % 2 == 0 else chosen[::-1]:
            rates[setting].append(bench.rates(setting))
            window, per_step = rates[setting][-1]
            print(f"trial {trial + 1}: {setting}: {window:.3f} samples/s (median step: {per_step:.3f})", flush=True)
    return rates


def report(args, transformer, lora_targets: list[str], rates: dict[str, list[tuple[float, float]]]) -> None:
    params = sum(p.numel() for p in transformer.parameters())
    window = {setting: [r[0] for r in runs] for setting, runs in rates.items()}
    per_step = {setting: [r[1] for r in runs] for setting, runs in rates.items()}
    print_table(f"Steady-state samples/s (median of {args.trials} runs), small Flux ({params:,} transformer params, "
                f"LoRA rank {args.rank} on {len(lora_targets)} Linear layers), {args.resolution} px, float32, "
                f"batch 1, {args.threads} threads, steps {args.warmup + 1}-{args.steps}",
                ["trainer", "samples/s", "min", "max", "1 / median step"],
                [[s, median(window[s]), min(window[s]), max(window[s]), median(per_step[s])] for s in rates])
    for name, figures in (("samples/s", window), ("1 / median step", per_step)):
        eager, theirs = median(figures["ours eager"]), median(figures["theirs"])
        print(f"\n{name}: ours eager / theirs {eager / theirs:.3f}")
        for setting in settings(args.compile)[1:-1]:
            compiled = median(figures[setting])
            print(f"  {setting}: / theirs {compiled / theirs:.3f}  {verdict(compiled / theirs, TARGET_RATIO, False)}, "
                  f"/ ours eager {compiled / eager:.3f}")


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
