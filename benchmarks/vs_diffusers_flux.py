"""Steady-state training throughput of our trainer vs diffusers' own `train_dreambooth_lora_flux.py`, on the same
small Flux, images and LoRA: samples/s ours / theirs, with our `model.compile` off (eager) and on (`--compile`:
true, per block, and whole, one graph, by default).

Both trainers run as they are meant to be run, as a whole command in a fresh process: ours `python train.py ...`,
theirs `python <their script> ...` (never edited; its path is `--diffusers-script`, in diffusers' repository
under examples/dreambooth). Nothing is timed inside either: both log every optimizer step to TensorBoard by their
own means (ours `logger=tensorboard`, theirs its default `--report_to=tensorboard`), and each event carries the
wall time it was written at. In a trial every setting's run starts at once and they take turns of
`--turn-seconds`, the others paused (SIGSTOP to the process group), so that all of them see the same machine
load, however it drifts. The steady-state rate of a run is read off its logged times after `--warmup` steps (the
compile happens in the first), from the steps that began and ended within one turn: steps / their seconds, and
1 / their median time. The ratios are taken within each trial; their medians over `--trials` are compared.
See benchmarks/README.md."""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

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
    p.add_argument("--steps", type=int, default=100,
                   help="optimizer steps of each run (with 40, the trials' ratios spread wider)")
    p.add_argument("--warmup", type=int, default=8, help="first steps left out of the rate (the compile is in them)")
    p.add_argument("--trials", type=int, default=3, help="runs per setting")
    p.add_argument("--turn-seconds", type=float, default=4.0,
                   help="how long each run goes on before the next one's turn (all of a trial's runs take turns)")
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
    """One compile thread: inductor's pool of compile workers would run on while its trainer is paused."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "TQDM_DISABLE": "1", "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache"),
            "TORCHINDUCTOR_COMPILE_THREADS": "1"}


class Run(NamedTuple):
    setting: str
    command: list[str]
    process: subprocess.Popen
    out: Path


def start_paused(setting: str, command: list[str], env: dict[str, str], out: Path) -> Run:
    """Starts the whole command in a process group of its own (its output goes to <out>.log) and pauses it."""
    with out.with_suffix(".log").open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   start_new_session=True)
    os.killpg(process.pid, signal.SIGSTOP)
    return Run(setting, command, process, out)


def take_turns(runs: list[Run], turn_seconds: float) -> dict[str, list[tuple[float, float]]]:
    """Lets the runs go one at a time, `turn_seconds` each in turn, until all have ended; returns each setting's
    turns as (wall time resumed, wall time paused or ended). Every run gets the whole machine in its turns, and
    a change of load over minutes falls on all of them alike. If this is interrupted, the runs still going are
    killed rather than left paused."""
    turns = {run.setting: [] for run in runs}
    running = list(runs)
    try:
        while running:
            for run in list(running):
                os.killpg(run.process.pid, signal.SIGCONT)
                resumed = time.time()
                try:
                    run.process.wait(turn_seconds)
                    running.remove(run)
                except subprocess.TimeoutExpired:
                    os.killpg(run.process.pid, signal.SIGSTOP)
                turns[run.setting].append((resumed, time.time()))
    finally:
        for run in running:
            os.killpg(run.process.pid, signal.SIGKILL)
    return turns


def logged_step_times(run: Run) -> list[float]:
    """The wall time at which the run logged each optimizer step, read from the TensorBoard event files it wrote
    under its folder (then removed: the run's exports, caches and checkpoints)."""
    log = run.out.with_suffix(".log")
    if run.process.returncode:
        sys.exit(f"failed ({run.process.returncode}): {' '.join(run.command)}\n{log.read_text()[-5000:]}")
    first_logged = {}
    for events in sorted(run.out.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(events)).Load():
            if event.summary.value:
                first_logged.setdefault(event.step, event.wall_time)
    shutil.rmtree(run.out, ignore_errors=True)
    return [first_logged[step] for step in sorted(first_logged)]


class Rates(NamedTuple):
    samples_per_s: float  # steps / their seconds
    per_median_step: float  # 1 / their median time
    steps: int  # how many steps counted


def steady_rates(step_times: list[float], turns: list[tuple[float, float]], warmup: int) -> Rates:
    """The rates of the steps after `warmup` that began and ended within one turn (a step the pause cut in two is
    left out)."""
    gaps = [later - earlier for earlier, later in zip(step_times[warmup:], step_times[warmup + 1:])
            if any(resumed <= earlier and later <= paused for resumed, paused in turns)]
    if len(gaps) < 3:
        sys.exit(f"only {len(gaps)} steps within one turn: raise --steps or --turn-seconds")
    return Rates(len(gaps) / sum(gaps), 1 / median(gaps), len(gaps))


# --- the measurement
class Bench:
    def __init__(self, args, work: Path, model_dir: Path, lora_targets: list[str]):
        self.args, self.work, self.model_dir, self.lora_targets = args, work, model_dir, lora_targets
        self.our_images = write_images(work / "images-captioned", args.resolution, captions=True)
        self.their_images = write_images(work / "images", args.resolution, captions=False)
        self.env = run_env(args.threads, work)
        self.runs = 0

    def command(self, setting: str, out: Path) -> list[str]:
        if setting == "theirs":
            return their_command(self.args.steps, out, self.args, self.model_dir, self.their_images,
                                 self.lora_targets)
        return our_command(our_compile(setting), self.args.steps, out, self.args, self.model_dir, self.our_images)

    def trial(self, order: list[str]) -> dict[str, Rates]:
        """Every setting's run at once, taking turns in `order`: {setting: steady rates}."""
        runs = []
        for setting in order:
            self.runs += 1
            out = self.work / f"run{self.runs:03d}"
            runs.append(start_paused(setting, self.command(setting, out), self.env, out))
        turns = take_turns(runs, self.args.turn_seconds)
        return {run.setting: steady_rates(logged_step_times(run), turns[run.setting], self.args.warmup)
                for run in runs}


def settings(compiles: list[str]) -> list[str]:
    return ["ours eager", *(f"ours compile={compile}" for compile in compiles), "theirs"]


def our_compile(setting: str) -> str:
    return "false" if setting == "ours eager" else setting.removeprefix("ours compile=")


def measure(bench: Bench, trials: int) -> list[dict[str, Rates]]:
    chosen = settings(bench.args.compile)
    results = []
    for trial in range(trials):
        results.append(bench.trial(chosen if trial % 2 == 0 else chosen[::-1]))
        print(f"trial {trial + 1}: " + " | ".join(
            f"{setting}: {rates.samples_per_s:.3f} samples/s (median step: {rates.per_median_step:.3f}, "
            f"{rates.steps} steps)" for setting, rates in results[-1].items()), flush=True)
    return results


def report(args, transformer, lora_targets: list[str], trials: list[dict[str, Rates]]) -> None:
    params = sum(p.numel() for p in transformer.parameters())
    chosen = settings(args.compile)
    window = {setting: [trial[setting].samples_per_s for trial in trials] for setting in chosen}
    per_step = {setting: [trial[setting].per_median_step for trial in trials] for setting in chosen}
    print_table(f"Steady-state samples/s (median of {args.trials} trials), small Flux ({params:,} transformer params, "
                f"LoRA rank {args.rank} on {len(lora_targets)} Linear layers), {args.resolution} px, float32, "
                f"batch 1, {args.threads} threads, steps {args.warmup + 1}-{args.steps}",
                ["trainer", "samples/s", "min", "max", "1 / median step"],
                [[s, median(window[s]), min(window[s]), max(window[s]), median(per_step[s])] for s in chosen])
    for name, figures in (("samples/s", window), ("1 / median step", per_step)):
        print(f"\n{name}: ours eager / theirs {paired_ratios(figures, 'ours eager', 'theirs')}")
        for setting in chosen[1:-1]:
            to_theirs = paired_ratios(figures, setting, "theirs")
            print(f"  {setting}: / theirs {to_theirs}  {verdict(to_theirs.median, TARGET_RATIO, False)}, "
                  f"/ ours eager {paired_ratios(figures, setting, 'ours eager')}")


class Ratios(NamedTuple):
    """A setting's rate over another's in each trial (the two ran side by side), and their median."""
    median: float
    per_trial: list[float]

    def __str__(self) -> str:
        return f"{self.median:.3f} (trials: {', '.join(f'{r:.2f}' for r in self.per_trial)})"


def paired_ratios(figures: dict[str, list[float]], setting: str, other: str) -> Ratios:
    per_trial = [mine / theirs for mine, theirs in zip(figures[setting], figures[other])]
    return Ratios(median(per_trial), per_trial)


def main() -> None:
    args = parse_args()
    if not args.diffusers_script.is_file():
        sys.exit(f"--diffusers-script: no such file {args.diffusers_script}")
    with tempfile.TemporaryDirectory(prefix="bench-vs-diffusers-") as tmp:
        work = Path(tmp)
        transformer = small_flux(args.layers, args.single_layers, args.heads, text_width=TINY_TEXT_WIDTH)
        model_dir = small_flux_pipeline_folder(transformer, work / "small-flux")
        lora_targets = our_lora_targets(work, model_dir, transformer)
        trials = measure(Bench(args, work, model_dir, lora_targets), args.trials)
    report(args, transformer, lora_targets, trials)


if __name__ == "__main__":
    main()
