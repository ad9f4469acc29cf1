"""Previews during training (sample_* keys, src/callbacks/previews.py) and the sample command (scripts/sample.py),
on tiny models: a run with previews trains exactly what a run without does; the sample command, given the exported
LoRA, renders the preview of the same step again."""
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import av
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning import Callback
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from difftrain.callbacks import previews
from difftrain.config.samples import sample_requests
from difftrain.config.validate import ConfigError, validate
from difftrain.training import TrainingRun, run
from scripts.sample import sample
from tests.conftest import ROOT, compose_config

WAN = ("model=wan21_t2v", "model.tiny=true", "model.dtype=float32", "model.max_sequence_length=16",
       "dataset=videos", "dataset.resolutions=[32]", "dataset.frame_buckets=[1,5]")
FAMILIES = {  # a tiny run of the family, and its LoRA file in an export folder
    "flux": (("model=flux_tiny", "dataset.resolutions=[64]"), "pytorch_lora_weights.safetensors"),
    "sdxl": (("model=sdxl_tiny", "dataset.resolutions=[64]"), "lora.safetensors"),
    "wan": (WAN, "adapter_model.safetensors"),
}
TRAINING = ("adapter.rank=4", "optimizer.lr=1e-2", "trainer.max_steps=2", "checkpoint_every_n_steps=null")
PREVIEWS = ("sample_prompts=[a red square]", "sample_every_n_steps=2", "sample_steps=2")
LOGGERS = ("logger=[tensorboard,wandb]", "logger.wandb.offline=true")
RECORDER = f"+callbacks.recorder={{_target_:{__name__}.Recorder}}"


class Recorder(Callback):
    """After every step (and the previews of that step): the loss and what a preview must leave as it was."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.steps.append(dict(
            loss=outputs["loss"].item(), modes=[m.training for m in module.modules()],
            requires_grad=[p.requires_grad for p in module.parameters()],
            devices=[p.device for p in module.parameters()], torch_rng=torch.get_rng_state(),
            numpy_rng=np.random.get_state()[1].copy(), python_rng=random.getstate()))


def recorded(result) -> list[dict]:
    return next(c for c in result.trainer.callbacks if isinstance(c, Recorder)).steps


class PreviewRun(NamedTuple):
    result: TrainingRun
    rendered: list[np.ndarray]  # what its previews rendered (rendered_media)


@contextmanager
def rendered_media() -> Iterator[list[np.ndarray]]:
    """The images and videos previews and the sample command render, as 8-bit arrays before they are written: an
    MP4 is lossy, and one level in one pixel can move a decoded block by 50 levels."""
    media, save_media = [], previews.save_media

    def record(item: np.ndarray, path: Path, fps: int) -> None:
        media.append(previews.to_uint8(item))
        save_media(item, path, fps)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(previews, "save_media", record)
        yield media


@pytest.fixture(scope="module")
def preview_run(tmp_path_factory):
    """One run with previews per family (step 2, TensorBoard on), shared by the tests that inspect it."""
    runs = {}

    def get(name: str) -> PreviewRun:
        if name not in runs:
            overrides, _ = FAMILIES[name]
            folder = tmp_path_factory.mktemp(name)
            with rendered_media() as rendered:
                result = run(compose_config(folder / "run", *overrides, *TRAINING, *PREVIEWS, *LOGGERS))
            runs[name] = PreviewRun(result, rendered)
        return runs[name]
    return get


def sample_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("sample", overrides=list(overrides))


def read_video(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def read_media(path: Path) -> np.ndarray:
    return read_video(path) if path.suffix == ".mp4" else np.asarray(Image.open(path))


def test_previews_leave_training_unchanged(tmp_path):
    """Previews before the first step and after each (eval mode, no_grad, their own RNG use): the same losses,
    train modes, requires_grad, devices and RNG states after every step, and the same final LoRA."""
    overrides, lora_file = FAMILIES["flux"]
    # separate caches: encoding draws from the global RNG, a cache hit does not
    with_previews = run(compose_config(tmp_path / "with" / "run", *overrides, *TRAINING, *PREVIEWS, RECORDER,
                                       "sample_every_n_steps=1", "sample_before_first_step=true",
                                       "sample_prompts=[a red square,{prompt:a cat,seed:3,width:32,height:48}]"))
    without = run(compose_config(tmp_path / "without" / "run", *overrides, *TRAINING, RECORDER))
    samples = tmp_path / "with" / "run" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["0", "1", "2"]
    assert np.asarray(Image.open(samples / "2" / "1.png")).shape == (48, 32, 3)
    ours, theirs = recorded(with_previews), recorded(without)
    assert len(ours) == len(theirs) == 2
    for step_with, step_without in zip(ours, theirs):
        for key, value in step_without.items():
            equal = torch.equal if key == "torch_rng" else np.array_equal if key == "numpy_rng" else (lambda a, b: a == b)
            assert equal(step_with[key], value), key
    lora_with, lora_without = (load_file(r.final_export / lora_file) for r in (with_previews, without))
    assert all(torch.equal(lora_with[k], lora_without[k]) for k in lora_without)


@pytest.mark.parametrize("name", FAMILIES)
def test_preview_goes_to_the_run_folder_tensorboard_and_wandb(name, preview_run):
    result = preview_run(name).result
    run_dir = result.final_export.parents[1]
    files = list((run_dir / "samples" / "2").iterdir())
    assert [f.name for f in files] == ["0.mp4" if name == "wan" else "0.png"]
    media = read_media(files[0])
    assert media.shape[-3:] == ((32, 32, 3) if name == "wan" else (64, 64, 3)) and media.std() > 0
    if name == "wan":
        assert media.shape[0] == 5  # the largest frame bucket
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("samples/0")] == [2]  # videos as animated GIFs
    kind = "videos" if name == "wan" else "images"
    assert len(list(run_dir.glob(f"wandb/offline-run-*/files/media/{kind}/samples/0_*"))) == 1


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_command_renders_the_preview_again_from_the_exported_lora(name, preview_run, tmp_path):
    result, (preview,) = preview_run(name)
    overrides, lora_file = FAMILIES[name]
    model = [o for o in overrides if o.startswith("model")]
    size = 32 if name == "wan" else 64
    common = (*model, "prompt=a red square", "seed=42", "steps=2", f"width={size}", f"height={size}", "frames=5")
    with rendered_media() as rendered:
        sampled_file = sample(sample_config(*common, f"lora={result.final_export / lora_file}",
                                            f"out={tmp_path}/lora.png"))[0]
        sample(sample_config(*common, f"out={tmp_path}/base.png"))
    with_lora, base = rendered
    preview_file = result.final_export.parents[1] / "samples" / "2" / ("0.mp4" if name == "wan" else "0.png")
    assert sampled_file.suffix == preview_file.suffix
    assert read_media(sampled_file).shape == read_media(preview_file).shape
    assert np.abs(with_lora.astype(int) - preview).max() <= 1, "the sample command does not render the preview"
    assert np.abs(base.astype(int) - preview).max() > 1, "the LoRA changed nothing"


def test_sample_keys_are_checked_before_anything_loads(make_config, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n\n  a blue circle  \n")
    cfg = make_config("sample_every_n_epochs=1", f"sample_prompts={prompts}", "dataset.resolutions=[[96,64]]")
    validate(cfg)
    requests = sample_requests(cfg)
    assert [(r.prompt, r.width, r.height, r.seed, r.frames) for r in requests] == [
        ("a red square", 96, 64, 42, None), ("a blue circle", 96, 64, 42, None)]
    for overrides, message in [
        (("sample_every_n_steps=5", f"sample_prompts={tmp_path / 'missing.txt'}"), "missing.txt is not a file"),
        (("sample_every_n_steps=5",), "sample_prompts is empty"),
        (("sample_prompts=[a cat]",), "no preview is scheduled"),
        (("sample_every_n_steps=5", "sample_prompts=[{prompt:a cat,sed:1}]"), r"sample_prompts\[0\].sed"),
        (("sample_every_n_steps=5", "sample_prompts=[{prompt:a cat,image:/nowhere.png}]"), "/nowhere.png does not"),
        (("sample_every_n_steps=5", "sample_prompts=[a cat]", "sample_size=[64]"), "sample_size=\\[64\\]"),
        (("+sample_every=5",), "Did you mean 'sample_every_n_steps'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(make_config(*overrides))
