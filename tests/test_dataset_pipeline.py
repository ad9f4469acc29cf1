"""The dataset pipeline through real training runs: the incremental latent / text cache, bad media, empty
datasets (what train.py then prints is in test_config.py), and the dataset keys (num_repeats, caption_prefix,
per-directory overrides, one bucket per batch)."""
import gc
import logging
import shutil
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from difftrain.datamodules.cache import EmbeddingCache, is_complete_safetensors
from difftrain.datamodules.datamodule import EmptyDatasetError
from difftrain.modules.base import DiffusionModule
from difftrain.modules.flux import FluxModule
from difftrain.training import run
from tests.conftest import EXAMPLE_IMAGES

FAST = ("dataset.resolutions=[64]", "trainer.max_steps=1", "checkpoint_every_n_steps=null")
EXAMPLES = sorted(EXAMPLE_IMAGES.glob("*.jpg"))


def copy_examples(folder: Path, images: list[Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        shutil.copy(image, folder)
        shutil.copy(image.with_suffix(".txt"), folder)
    return folder


def encoded(training_run) -> tuple[int, int]:
    """(latents, captions) encoded by this run."""
    return training_run.datamodule.encoded_latents, training_run.datamodule.encoded_captions


@pytest.fixture
def cache_log(caplog):
    caplog.set_level(logging.INFO, logger="difftrain.datamodules.datamodule")
    return caplog


def test_cache_next_to_the_dataset_reencodes_exactly_what_changed(make_config, tmp_path, cache_log):
    data = copy_examples(tmp_path / "data", EXAMPLES[:3])

    def train(name: str, *overrides: str):
        return run(make_config(*FAST, f"dataset.path={data}", "dataset.cache_dir=null", *overrides, run_name=name))

    assert encoded(train("first")) == (3, 3)
    cache = data / ".difftrain_cache" / "flux"
    assert len(list(cache.rglob("*.safetensors"))) == 6
    assert not list(cache.rglob("*.tmp")), "a temporary file of an atomic write was left behind"
    assert (data / ".difftrain_cache" / "media_probes.json").is_file()  # the next run decodes no unchanged file

    cache_log.clear()
    assert encoded(train("unchanged")) == (0, 0)
    assert "encoders not loaded" in cache_log.text

    Image.new("RGB", (96, 64), "teal").save(data / "added.png")
    (data / "added.txt").write_text("a teal rectangle")
    assert encoded(train("image_added")) == (1, 1)

    Image.new("RGB", (64, 96), "navy").save(data / EXAMPLES[0].name)
    assert encoded(train("image_edited")) == (1, 0)

    (data / EXAMPLES[1].with_suffix(".txt").name).write_text("a new caption")
    assert encoded(train("caption_edited")) == (0, 1)

    assert encoded(train("resolution_changed", "dataset.resolutions=[128]")) == (4, 0)
    assert encoded(train("text_encoder_changed", "model.max_sequence_length=16")) == (0, 4)


def test_truncated_cache_file_is_reencoded_not_trained_on(make_config, tmp_path):
    data = copy_examples(tmp_path / "data", EXAMPLES[:2])
    run(make_config(*FAST, f"dataset.path={data}", run_name="first"))
    latent_file = next((tmp_path / "cache").rglob("latents/**/*.safetensors"))
    latent_file.write_bytes(latent_file.read_bytes()[: latent_file.stat().st_size // 2])
    assert not is_complete_safetensors(latent_file)

    second = run(make_config(*FAST, f"dataset.path={data}", run_name="second"))
    assert encoded(second) == (1, 0)
    assert is_complete_safetensors(latent_file)
    assert second.final_export.is_dir()


def test_failed_cache_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "item.safetensors"
    EmbeddingCache.write(path, {"latents": torch.ones(2)})
    shared = torch.zeros(4)
    with pytest.raises(RuntimeError, match="share memory"):
        EmbeddingCache.write(path, {"latents": shared, "view": shared[:2]})
    assert torch.equal(EmbeddingCache.read(path)["latents"], torch.ones(2))
    assert list(tmp_path.iterdir()) == [path]


def add_bad_media(folder: Path) -> list[Path]:
    """A zero-byte image, a corrupt image, an image without caption and a caption without image."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = [folder / "zero_bytes.jpg", folder / "corrupt.png", folder / "uncaptioned.jpg", folder / "orphan.txt"]
    bad[0].touch()
    bad[1].write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    shutil.copy(EXAMPLES[0], bad[2])
    bad[3].write_text("a caption whose image is missing")
    for image in bad[:2]:
        image.with_suffix(".txt").write_text("a caption")
    return bad


def test_bad_media_is_reported_once_each_and_training_goes_on(make_config, tmp_path, caplog):
    data = copy_examples(tmp_path / "data", EXAMPLES[:2])
    bad = add_bad_media(data)
    result = run(make_config(*FAST, f"dataset.path={data}"))

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for path in bad:
        assert sum(str(path) in message for message in warnings) == 1, path
    assert "4 file(s) were skipped (reasons logged above)." in warnings
    assert {s.item.path.name for s in result.datamodule.train_set.samples} == {p.name for p in EXAMPLES[:2]}
    assert result.final_export.is_dir()


@pytest.mark.parametrize("contents", ["empty folder", "only bad files"])
def test_empty_dataset_is_one_error_naming_the_folder(make_config, tmp_path, contents):
    data = tmp_path / "data"
    data.mkdir()
    if contents == "only bad files":
        add_bad_media(data)
    with pytest.raises(EmptyDatasetError, match=f"no usable image with a caption in {data}"):
        run(make_config(*FAST, f"dataset.path={data}"))


def test_directories_repeats_prefixes_and_one_bucket_per_batch(make_config, tmp_path):
    styled = copy_examples(tmp_path / "styled", EXAMPLES[:2])
    large = copy_examples(tmp_path / "large", EXAMPLES[2:4])
    directories = (f"dataset.directories=[{{path: '{styled}', num_repeats: 3, caption_prefix: 'style, '}},"
                   f" {{path: '{large}', resolutions: [128]}}]")
    result = run(make_config(*FAST, "dataset.path=null", "dataset.caption_prefix='plain, '", "dataset.batch_size=2",
                             directories))
    samples = result.datamodule.train_set.samples

    appearances = Counter(s.item.path.parent.name for s in samples)
    assert appearances == {"styled": 2 * 3, "large": 2}
    for sample in samples:
        prefix, area = ("style, ", 64 * 64) if sample.item.path.parent == styled else ("plain, ", 128 * 128)
        assert sample.item.caption.startswith(prefix)
        assert sample.item.caption.removeprefix(prefix) == sample.item.path.with_suffix(".txt").read_text().strip()
        assert sample.size[0] * sample.size[1] == pytest.approx(area, rel=0.25)

    loader = result.datamodule.train_dataloader()
    batches = [[index for index, _ in batch] for batch in loader.batch_sampler]  # (index, epoch) pairs
    assert set().union(*batches) == set(range(len(samples)))
    for batch in batches:
        assert len({samples[i].size for i in batch}) == 1, "a batch mixes buckets"


class FluxKeepingWatch(FluxModule):
    """The real Flux module, noting (weakly) the encoders it hands out for caching."""

    handed_out = []

    def load_cache_encoders(self):
        encoders = super().load_cache_encoders()
        self.handed_out.append(weakref.ref(encoders.pipe))
        return encoders


def test_encoders_are_freed_after_caching(make_config):
    run(make_config(*FAST, f"model._target_={__name__}.FluxKeepingWatch"))
    gc.collect()
    assert FluxKeepingWatch.handed_out and all(ref() is None for ref in FluxKeepingWatch.handed_out)


class UnpaddedT5Encoders:
    """Flux's real cache encoders, but each caption's T5 embeddings cut to its own token count (a family that
    caches unpadded text); notes every caption's length."""

    lengths: dict[str, int] = {}

    def __init__(self, flux):
        self.flux = flux

    def to(self, device: torch.device) -> "UnpaddedT5Encoders":
        self.flux.to(device)
        return self

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.flux.encode_images(pixels)

    def encode_captions(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        tokens = self.flux.pipe.tokenizer_2(captions).input_ids
        self.lengths.update({caption: len(ids) for caption, ids in zip(captions, tokens)})
        return [{**text, "prompt_embeds": text["prompt_embeds"][:len(ids)]}
                for text, ids in zip(self.flux.encode_captions(captions), tokens)]


class FluxUnpaddedText(FluxModule):
    batches = []

    def load_cache_encoders(self) -> UnpaddedT5Encoders:
        return UnpaddedT5Encoders(super().load_cache_encoders())

    def training_step(self, batch, batch_idx):
        self.batches.append(batch)
        return super().training_step(batch, batch_idx)


def test_text_of_different_lengths_is_padded_per_batch_with_a_mask(make_config, tmp_path):
    square = [image for image in EXAMPLES if Image.open(image).size == (160, 160)]
    data = copy_examples(tmp_path / "data", square)
    (data / square[0].with_suffix(".txt").name).write_text("a circle")
    (data / square[1].with_suffix(".txt").name).write_text("a black triangle drawn on a green background, centred")
    result = run(make_config(*FAST, f"dataset.path={data}", "dataset.batch_size=2",
                             f"model._target_={__name__}.FluxUnpaddedText"))

    (batch,) = FluxUnpaddedText.batches
    lengths = [UnpaddedT5Encoders.lengths[s.item.caption] for s in result.datamodule.train_set.samples]
    assert len(set(lengths)) == 2
    embeds, mask = batch["text"]["prompt_embeds"], batch["text"]["prompt_embeds_mask"]
    assert mask.dtype == torch.bool and mask.shape == embeds.shape[:2] == (2, max(lengths))
    assert sorted(mask.sum(1).tolist()) == sorted(lengths)
    assert torch.all(embeds[~mask] == 0) and mask[:, 0].all() and (mask[:, :-1] >= mask[:, 1:]).all()
    assert "pooled_prompt_embeds_mask" not in batch["text"]  # equal shapes: stacked as before


def test_fixed_length_text_is_stacked_without_a_mask():
    texts = [{"prompt_embeds": torch.randn(5, 3), "pooled": torch.randn(4)} for _ in range(2)]
    batch = DiffusionModule.collate_text(texts)
    assert batch.keys() == {"prompt_embeds", "pooled"}
    assert torch.equal(batch["prompt_embeds"], torch.stack([t["prompt_embeds"] for t in texts]))
