"""Edit datasets (targets with control images, dataset.control_path) through real training runs of the tiny Flux:
the controls reach the cache encoders cropped to their target's bucket, their latents reach the training step,
the cache re-encodes exactly the items whose files changed, and a missing control is one reported skip."""
import json
import logging
import os
import shutil
from collections import defaultdict
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image

from difftrain.config.validate import ConfigError
from difftrain.datamodules.datamodule import DiffusionDataModule, control_folders
from difftrain.datamodules.media import load_image
from difftrain.modules.flux import FluxModule
from difftrain.training import run
from tests.conftest import ROOT

EDIT_EXAMPLE = ROOT / "data" / "examples" / "edit"
FAST = ("trainer.max_steps=2", "checkpoint_every_n_steps=null")
RECORD: dict[str, list] = defaultdict(list)  # what the families below received, by kind


class RecordingEncoders:
    """Flux's real cache encoders, noting their inputs; an item's controls are encoded by the same VAE and
    returned as "control_latents" [B, K, C, h, w], as an edit family does."""

    def __init__(self, flux):
        self.flux = flux

    def to(self, device: torch.device) -> "RecordingEncoders":
        self.flux.to(device)
        return self

    def encode_images(self, pixels: torch.Tensor, controls: torch.Tensor = None):
        RECORD["encode_images"].append((pixels, controls))
        latents = self.flux.encode_images(pixels)
        if controls is None:
            return latents
        control_latents = self.flux.encode_images(controls.flatten(0, 1)).unflatten(0, controls.shape[:2])
        return {"latents": latents, "control_latents": control_latents}

    def encode_captions(self, captions: list[str], images=None):
        RECORD["encode_captions"].append((captions, images))
        return self.flux.encode_captions(captions)


class FluxEdit(FluxModule):
    """The tiny Flux with recording control-aware encoders; it notes each training batch's conditioning (the
    denoiser itself ignores it: feeding control latents to the transformer is the Kontext family's part)."""

    def load_cache_encoders(self) -> RecordingEncoders:
        return RecordingEncoders(super().load_cache_encoders())

    def training_step(self, batch, batch_idx):
        RECORD["batches"].append(batch)
        return super().training_step(batch, batch_idx)

    def predict(self, noisy_latents, t, text, cond=None):
        return super().predict(noisy_latents, t, text)


class FluxEditImageText(FluxEdit):
    """A family whose text conditioning sees the control images (as Qwen-Image-Edit's VLM does)."""

    text_depends_on_images = True


@pytest.fixture(autouse=True)
def forget_records():
    RECORD.clear()


def train(make_config, family: type, *overrides: str, name: str = "run"):
    return run(make_config(*FAST, "dataset=edit_example", f"model._target_={__name__}.{family.__name__}",
                           *overrides, run_name=name))


def encoded(training_run) -> tuple[int, int]:
    return training_run.datamodule.encoded_latents, training_run.datamodule.encoded_captions


def copy_edit_example(folder: Path, count: int) -> Path:
    """The first `count` pairs of the bundled example: targets and captions in `folder`, controls in control/."""
    (folder / "control").mkdir(parents=True)
    for target in sorted(EDIT_EXAMPLE.glob("*.jpg"))[:count]:
        shutil.copy(target, folder)
        shutil.copy(target.with_suffix(".txt"), folder)
        shutil.copy(next((EDIT_EXAMPLE / "control").glob(f"{target.stem}.*")), folder / "control")
    return folder


def test_bundled_edit_example_trains_on_controls_cropped_to_each_targets_bucket(make_config):
    result = train(make_config, FluxEdit, "dataset.batch_size=2")
    samples = result.datamodule.train_set.samples
    assert len(samples) == 5 and not result.datamodule.skipped
    assert all(len(s.item.controls) == 1 and s.item.controls[0].parent.name == "control" for s in samples)

    calls = RECORD["encode_images"]
    assert len(calls) == 5
    for sample in samples:
        target = load_image(sample.item.path, sample.size)
        controls = next(controls for pixels, controls in calls if torch.equal(pixels[0], target))
        assert controls.shape == (1, 1, *target.shape)
        assert torch.equal(controls[0, 0], load_image(sample.item.controls[0], sample.size))
    assert all(images is None for _, images in RECORD["encode_captions"])

    for batch in RECORD["batches"]:
        latents, control_latents = batch["latents"], batch["cond"]["control_latents"]
        assert control_latents.shape == (latents.shape[0], 1, *latents.shape[1:])
    assert len(RECORD["batches"]) == 2 and result.final_export.is_dir()


def test_a_control_of_another_shape_is_cropped_to_its_targets_bucket(make_config, tmp_path):
    data = copy_edit_example(tmp_path / "data", 1)
    target = next(data.glob("*.jpg"))
    control = next((data / "control").iterdir())
    control.unlink()
    portrait = Image.new("RGB", (60, 150), "navy")
    portrait.paste("orange", (0, 50, 60, 100))  # a band in the middle: what a centre crop of a wide bucket keeps
    portrait.save(control.with_suffix(".png"))

    result = train(make_config, FluxEdit, f"dataset.path={data}", f"dataset.control_path={data / 'control'}")
    (sample,) = result.datamodule.train_set.samples
    assert sample.size[0] > sample.size[1], "the target is wide, so its bucket is"
    ((pixels, controls),) = RECORD["encode_images"]
    assert torch.equal(pixels[0], load_image(target, sample.size))
    assert torch.equal(controls[0, 0], load_image(control.with_suffix(".png"), sample.size))
    orange = torch.tensor([255, 165, 0]) / 127.5 - 1
    assert (controls[0, 0] - orange[:, None, None]).abs().mean() < 0.1, "not the middle band of the control"


def garble_keeping_size_and_mtime(path: Path) -> None:
    stat = path.stat()
    path.write_bytes(numpy.random.default_rng(1).bytes(stat.st_size))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("family", [FluxEdit, FluxEditImageText], ids=["text_alone", "text_sees_controls"])
def test_cache_reencodes_exactly_the_items_whose_target_or_controls_changed(make_config, tmp_path, caplog, family):
    data = copy_edit_example(tmp_path / "data", 3)
    controls_dir = data / "control"
    Image.new("RGB", (64, 64), "teal").save(controls_dir / "no_such_target.png")  # ignored, never reported
    stems = sorted(p.stem for p in data.glob("*.jpg"))
    control = {p.stem: p for p in controls_dir.iterdir()}
    sees_controls = family.text_depends_on_images

    def step(name: str, *overrides: str):
        RECORD.clear()
        caplog.clear()
        return train(make_config, family, f"dataset.path={data}", f"dataset.control_path={controls_dir}",
                     *overrides, name=name)

    first = step("first")
    assert encoded(first) == (3, 3) and not first.datamodule.skipped
    for captions, images in RECORD["encode_captions"]:
        if sees_controls:
            assert [image.shape[0] for image in images] == [1] * len(captions)
        else:
            assert images is None
    probes = json.loads((tmp_path / "cache" / "media_probes.json").read_text())["files"]
    assert all("digest" in probes[str(path.absolute())] for path in control.values() if path.stem in stems)

    # A control garbled behind the same size and mtime: its remembered verdict and digest, the file is not read.
    garble_keeping_size_and_mtime(control[stems[0]])
    assert encoded(step("unchanged")) == (0, 0)

    Image.new("RGB", (64, 64), "plum").save(control[stems[1]])
    assert encoded(step("control_edited")) == (1, 1 if sees_controls else 0)
    assert len(RECORD["encode_images"]) == 1 and RECORD["encode_images"][0][1] is not None

    control[stems[2]].unlink()
    missing = step("control_missing")
    assert encoded(missing) == (0, 0)
    target = data / f"{stems[2]}.jpg"
    (skip,) = missing.datamodule.skipped
    assert skip.path == target and str(controls_dir) in skip.reason
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum(str(target) in w for w in warnings) == 1
    assert not any("no_such_target" in w for w in warnings)
    assert {s.item.path.stem for s in missing.datamodule.train_set.samples} == set(stems[:2])


def test_a_family_without_controls_refuses_an_edit_dataset_by_name(make_config):
    with pytest.raises(ConfigError, match="control images .* FluxModule .* does not train with control images"):
        run(make_config(*FAST, "dataset=edit_example"))


def test_control_folder_errors_name_the_folder_or_the_keys(make_config, tmp_path):
    with pytest.raises(ConfigError, match=f"Control folder.* not found: {tmp_path / 'nowhere'}"):
        train(make_config, FluxEdit, f"dataset.control_path={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="control_path=.* and control_paths=.* are both set"):
        train(make_config, FluxEdit, f"dataset.control_paths=[{EDIT_EXAMPLE / 'control'}]")


def test_several_control_folders_give_each_target_one_control_from_each(make_config, tmp_path):
    data = copy_edit_example(tmp_path / "data", 2)
    second = tmp_path / "second_reference"
    second.mkdir()
    for target in data.glob("*.jpg"):
        Image.new("RGB", (48, 48), "gold").save(second / f"{target.stem}.webp")
    result = train(make_config, FluxEdit, f"dataset.path={data}", "dataset.control_path=null",
                   f"dataset.control_paths=[{data / 'control'},{second}]")
    for sample in result.datamodule.train_set.samples:
        assert [p.parent for p in sample.item.controls] == [data / "control", second]
    assert all(controls.shape[:2] == (1, 2) for _, controls in RECORD["encode_images"])
    for batch in RECORD["batches"]:
        assert batch["cond"]["control_latents"].shape[1] == 2


def test_a_folders_own_control_keys_replace_the_datasets(tmp_path):
    own, inherits = str(tmp_path / "own"), str(tmp_path / "inherits")
    datamodule = DiffusionDataModule(directories=[{"path": own, "control_path": f"{own}/control"},
                                                  {"path": inherits}],
                                     control_paths=[f"{tmp_path}/a", f"{tmp_path}/b"])
    folders = {d["path"]: control_folders(d) for d in datamodule.directories}
    assert folders == {own: (f"{own}/control",), inherits: (f"{tmp_path}/a", f"{tmp_path}/b")}
