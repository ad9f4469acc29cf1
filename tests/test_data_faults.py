"""Bad input and data order, end to end: epochs reshuffle and resume mid-epoch exactly, no batch repeats an item
it need not, 16-bit PNGs, unusable cache entries, huge captions, and what a folder scan reports."""
import logging
import os
import re
from pathlib import Path

import numpy
import pytest
import torch
from lightning import Callback
from PIL import Image
from safetensors.torch import load_file, save_file

from difftrain.datamodules.buckets import BucketBatchSampler
from difftrain.datamodules.cache import EmbeddingCache, NonFiniteError
from difftrain.datamodules.media import load_image, scan_directory
from difftrain.dry_run import dry_run
from difftrain.modules.flux import FluxEncoders, FluxModule
from difftrain.training import run
from tests.test_dataset_pipeline import EXAMPLES, copy_examples


class SimulatedCrash(RuntimeError):
    pass


class CrashAtStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise SimulatedCrash(f"crash at step {self.step}")


ONE_BUCKET = ("dataset.resolutions=[64]", "dataset.enable_ar_bucket=false")
LORA_FILE = "pytorch_lora_weights.safetensors"


class BatchLog(Callback):
    """Notes each training batch of a run: (epoch, the identity of each item, its latents' bytes)."""

    batches: dict[str, list[tuple[int, tuple[int, ...]]]] = {}

    def __init__(self, run: str):
        self.run = run
        self.batches[run] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        items = tuple(hash(latents.numpy().tobytes()) for latents in batch["latents"])
        self.batches[self.run].append((trainer.current_epoch, items))


def test_epochs_reshuffle_and_a_run_resumed_in_epoch_2_ends_like_the_uninterrupted_one(make_config, tmp_path):
    # 2 items x 2 repeats in batches of 2: 2 batches an epoch; a checkpoint at step 5 (epoch 2, mid-way).
    data = copy_examples(tmp_path / "data", EXAMPLES[:2])
    common = (*ONE_BUCKET, f"dataset.path={data}", "dataset.num_repeats=2", "dataset.batch_size=2",
              "trainer.max_epochs=3", "checkpoint_every_n_steps=5", "save_every_n_epochs=3")

    def train(name: str, *overrides: str):
        log = f"+callbacks.log={{_target_:{__name__}.BatchLog,run:{name}}}"
        return run(make_config(*common, log, *overrides, run_name=name))

    uninterrupted = train("uninterrupted")
    with pytest.raises(SimulatedCrash):
        train("crashed", f"+callbacks.crash={{_target_:{__name__}.CrashAtStep,step:5}}")
    resumed = train("resumed", f"resume={tmp_path / 'crashed'}")

    batches = BatchLog.batches["uninterrupted"]
    orders = [[items for epoch, items in batches if epoch == e] for e in range(3)]
    assert len({tuple(order) for order in orders}) > 1, "every epoch repeats the same batches"
    assert all(len(set(items)) == len(items) for _, items in batches), "a batch holds an item twice"
    assert BatchLog.batches["resumed"] == batches[5:]
    expected = load_file(uninterrupted.final_export / LORA_FILE)
    actual = load_file(resumed.final_export / LORA_FILE)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


def test_batches_repeat_no_item_while_the_bucket_has_enough():
    items = [index // 4 for index in range(8 * 4)]  # 8 items, 4 repeats each, as the datamodule lists them
    for world_size in (1, 2):
        ranks = [BucketBatchSampler(["bucket"] * len(items), 4 // world_size, seed=0, rank=rank,
                                    world_size=world_size, item_keys=items) for rank in range(world_size)]
        for epoch in range(3):
            for sampler in ranks:
                sampler.set_epoch(epoch)
            for global_batch in zip(*ranks):
                indices = [index for batch in global_batch for index in batch]
                assert len({items[index] for index in indices}) == 4


def test_dry_run_reports_the_padding(make_config, tmp_path):
    data = copy_examples(tmp_path / "data", EXAMPLES[:3])
    report = dry_run(make_config(*ONE_BUCKET, f"dataset.path={data}", "dataset.batch_size=2"))
    assert "Padding: 1 sample(s) repeated to fill whole batches of 2" in report
    report = dry_run(make_config(*ONE_BUCKET, f"dataset.path={data}", "dataset.batch_size=4"))
    assert "1 bucket(s) hold fewer than 4 distinct samples" in report


def test_a_16_bit_png_loads_like_the_same_image_in_8_bits(tmp_path):
    gray = numpy.random.default_rng(0).integers(0, 256, (24, 32), dtype=numpy.uint8)
    Image.fromarray(gray).save(tmp_path / "8bit.png")
    Image.fromarray(gray.astype(numpy.uint16) * 257).save(tmp_path / "16bit.png")
    assert Image.open(tmp_path / "16bit.png").mode == "I;16"
    assert torch.equal(load_image(tmp_path / "16bit.png", (32, 24)), load_image(tmp_path / "8bit.png", (32, 24)))


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    """Captioned images in the folder and a subfolder, and entries named like images that are none."""
    folder = tmp_path / "data"
    copy_examples(folder, EXAMPLES[:1])
    copy_examples(folder / "sub", EXAMPLES[1:2])
    for name in ("loop", "dangling", "folder", "scan"):
        (folder / f"{name}.txt").write_text(f"a caption of {name}")
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.symlink(tmp_path / "gone.jpg", folder / "dangling.jpg")
    (folder / "folder.jpg").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "scan.tiff")
    (folder / "orphan.txt").write_text("no image")
    (folder / ".hidden").mkdir()
    copy_examples(folder / ".hidden", EXAMPLES[2:3])
    return folder


def test_scan_reports_each_unusable_entry_with_its_own_reason_and_reads_subfolders(odd_folder: Path):
    scan = scan_directory(odd_folder)
    assert [item.path for item in scan.items] == [odd_folder / EXAMPLES[0].name, odd_folder / "sub" / EXAMPLES[1].name]
    reasons = {skip.path.name: skip.reason for skip in scan.skipped}
    assert sorted(reasons) == ["dangling.jpg", "folder.jpg", "loop.jpg", "orphan.txt", "scan.tiff"]
    assert "symbolic link loop" in reasons["loop.jpg"]
    assert "broken symbolic link" in reasons["dangling.jpg"] and "gone.jpg" in reasons["dangling.jpg"]
    assert "a folder" in reasons["folder.jpg"]
    assert "unsupported file type '.tiff'" in reasons["scan.tiff"]
    assert "without a matching image" in reasons["orphan.txt"]
    flat = scan_directory(odd_folder, recursive=False)
    assert [item.path for item in flat.items] == [odd_folder / EXAMPLES[0].name]


def test_recursive_false_is_a_dataset_key(make_config, odd_folder: Path):
    assert "Dataset: 2 items" in dry_run(make_config("dataset.resolutions=[64]", f"dataset.path={odd_folder}"))
    flat = make_config("dataset.resolutions=[64]", f"dataset.path={odd_folder}", "dataset.recursive=false")
    assert "Dataset: 1 items" in dry_run(flat)


def test_a_cache_entry_with_nan_is_neither_written_nor_read(tmp_path):
    entry = tmp_path / "entry.safetensors"
    with pytest.raises(NonFiniteError, match="latents"):
        EmbeddingCache.write(entry, {"latents": torch.tensor([1.0, float("nan")])})
    assert not entry.exists()
    save_file({"latents": torch.tensor([float("inf")])}, entry)
    with pytest.raises(NonFiniteError, match=re.escape(str(entry))):
        EmbeddingCache.read(entry)


class NaNLatentsOfWhiteImages(FluxEncoders):
    """Flux's real cache encoders, but an all-white image's latents come out NaN (as an overflowing VAE's would)."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = super().encode_images(pixels)
        return torch.full_like(latents, float("nan")) if pixels.min() > 0.99 else latents


class FluxWithNaNLatentsOfWhiteImages(FluxModule):
    def load_cache_encoders(self) -> NaNLatentsOfWhiteImages:
        encoders = super().load_cache_encoders()
        return NaNLatentsOfWhiteImages(encoders.pipe, encoders.max_sequence_length)


def test_huge_caption_is_warned_once_and_bad_cache_entries_are_encoded_again_or_skipped(make_config, tmp_path,
                                                                                        caplog, capfd):
    data = copy_examples(tmp_path / "data", EXAMPLES[:2])
    caption_file = data / EXAMPLES[1].with_suffix(".txt").name
    caption = "a photo of the cat and the dog " * 2000 + "the very end"
    caption_file.write_text(caption)
    overrides = (*ONE_BUCKET, f"dataset.path={data}", "trainer.max_steps=1", "checkpoint_every_n_steps=null")

    first = run(make_config(*overrides, run_name="first"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    (message,) = [m for m in warnings if str(caption_file) in m]
    total, kept, dropped = map(int, re.search(r"has (\d+) tokens.* first (\d+) \((\d+) dropped\)", message).groups())
    assert kept < total and dropped == total - kept
    assert "the very end" not in capfd.readouterr().err, "the dropped text was printed"
    (long_text,) = {s.text_path for s in first.datamodule.train_set.samples if s.item.caption == caption}
    encoders = first.module.load_cache_encoders()
    expected = encoders.encode_captions([caption])[0]
    assert all(torch.equal(EmbeddingCache.read(long_text)[k], expected[k]) for k in expected)

    sample = first.datamodule.train_set.samples[0]
    good = load_file(sample.latent_path)
    save_file({k: torch.full_like(v, float("nan")) for k, v in good.items()}, sample.latent_path)
    Image.new("RGB", (64, 64), "white").save(data / "white.png")
    (data / "white.txt").write_text("a white square")
    caplog.clear()
    second = run(make_config(*overrides, f"model._target_={__name__}.FluxWithNaNLatentsOfWhiteImages",
                             run_name="second"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum(str(sample.latent_path) in m and "NaN" in m for m in warnings) == 1
    assert torch.equal(EmbeddingCache.read(sample.latent_path)["latents"], good["latents"])
    (skip,) = second.datamodule.skipped
    assert skip.path == data / "white.png" and "NaN" in skip.reason
    assert {s.item.path.name for s in second.datamodule.train_set.samples} == {p.name for p in EXAMPLES[:2]}
    assert second.final_export.is_dir()
