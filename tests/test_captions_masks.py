"""Caption options (caption_extension, tag shuffling with cached variants, caption dropout) and the masked loss
(mask_path), through one real training run of the tiny Flux on generated images."""
import logging

import pytest
import torch
from PIL import Image

from difftrain.config.errors import ConfigError
from difftrain.datamodules.cache import EmbeddingCache
from difftrain.datamodules.datamodule import CachedDataset, collate, latent_grid_mask
from difftrain.datamodules.media import load_image, scan_directory
from difftrain.training import run
from tests.conftest import compose_config
from tests.test_video_data import write_indexed_video
from tests.test_wan_video import FAST as WAN_FAST

TAGS = {"half": "red, circle, big, shiny, on grass", "black": "blue, square, small, matte, in water",
        "wide": "green, triangle, wide, glowing, at night"}
KEEP = 2  # keep_tokens
VARIANTS = 3  # cache_shuffle_num
DROPOUT = 0.5


def gradient_image(width: int, height: int, seed: int) -> Image.Image:
    """Grey levels rising left to right, with noise: any shifted crop of it differs."""
    noise = torch.randint(0, 40, (height, width), generator=torch.Generator().manual_seed(seed))
    ramp = torch.linspace(0, 215, width).expand(height, width)
    return Image.fromarray((ramp + noise).to(torch.uint8).numpy(), "L")


def half_white(width: int, height: int) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    return mask


@pytest.fixture(scope="module")
def trained(tmp_path_factory, caplog_module):
    """Three images with tag captions in .caption files and masks (left half white, all black, the wide image's
    own grey levels), one image with only a .txt caption; 2 steps with shuffling, keep_tokens and dropout."""
    root = tmp_path_factory.mktemp("captions_masks")
    data, masks = root / "data", root / "masks"
    data.mkdir()
    masks.mkdir()
    images = {"half": gradient_image(64, 64, 0), "black": gradient_image(64, 64, 1), "wide": gradient_image(120, 50, 2)}
    for stem, image in images.items():
        image.convert("RGB").save(data / f"{stem}.png")
        (data / f"{stem}.caption").write_text(TAGS[stem])
    half_white(64, 64).save(masks / "half.png")
    Image.new("L", (64, 64), 0).save(masks / "black.jpg")
    images["wide"].save(masks / "wide.webp", lossless=True)
    images["half"].convert("RGB").save(data / "plain.png")
    (data / "plain.txt").write_text("a caption in the other extension")
    config = compose_config(root / "run", "dataset.resolutions=[64]", "trainer.max_steps=2",
                            "checkpoint_every_n_steps=null", f"dataset.path={data}", f"dataset.mask_path={masks}",
                            "dataset.caption_extension=.caption", "dataset.shuffle_tags=true",
                            f"dataset.keep_tokens={KEEP}", f"dataset.cache_shuffle_num={VARIANTS}",
                            f"dataset.caption_dropout_p={DROPOUT}")
    return run(config), data, caplog_module


@pytest.fixture(scope="module")
def caplog_module():
    """The warnings of the module's run (caplog is per test)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("difftrain.datamodules.datamodule")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def samples_by_stem(result) -> dict[str, object]:
    return {s.item.path.stem: s for s in result.datamodule.train_set.samples}


def test_caption_extension_reads_the_configured_files_and_names_the_missing_one(trained):
    result, data, records = trained
    samples = samples_by_stem(result)
    assert set(samples) == set(TAGS)
    assert all(s.caption_path == data / f"{stem}.caption" for stem, s in samples.items())
    (message,) = [r.getMessage() for r in records if "plain.png" in r.getMessage()]
    assert str(data / "plain.caption") in message and "\n" not in message


def test_shuffled_variants_are_cached_keep_the_first_tags_and_are_all_drawn(trained):
    result, _, _ = trained
    train_set = result.datamodule.train_set
    for stem, sample in samples_by_stem(result).items():
        tags = TAGS[stem].split(", ")
        variants = [text.caption.split(", ") for text in sample.texts]
        assert len(variants) == VARIANTS and len({tuple(v) for v in variants}) == VARIANTS
        assert all(v[:KEEP] == tags[:KEEP] and sorted(v) == sorted(tags) for v in variants)
        embeddings = [EmbeddingCache.read(text.path)["prompt_embeds"] for text in sample.texts]
        assert not torch.equal(embeddings[0], embeddings[1]), "the variants were not encoded each"

    index = next(i for i, s in enumerate(train_set.samples) if s.item.path.stem == "half")
    drawn = {train_set.draw_text(index, epoch) for epoch in range(200)}
    assert drawn == {text.path for text in train_set.samples[index].texts} | {train_set.empty_text}


def test_caption_dropout_draws_the_empty_caption_cached_once_reproducibly(trained):
    result, _, _ = trained
    train_set = result.datamodule.train_set
    text_entries = set((result.datamodule.cache_root / result.module.cache_name / "text").rglob("*.safetensors"))
    variants = {text.path for s in train_set.samples for text in s.texts}
    assert text_entries == variants | {train_set.empty_text}  # one empty caption for the family, not one per item

    draws = [(index, epoch) for index in range(len(train_set)) for epoch in range(100)]
    dropped = sum(train_set.draw_text(*draw) == train_set.empty_text for draw in draws)
    assert dropped / len(draws) == pytest.approx(DROPOUT, abs=0.1)
    same_seed = CachedDataset(train_set.samples, DROPOUT, train_set.empty_text, train_set.seed)
    assert [same_seed.draw_text(*draw) for draw in draws] == [train_set.draw_text(*draw) for draw in draws]

    # A resumed run's loader hands out the (index, epoch) keys an uninterrupted one does after the same batches.
    loader = result.datamodule.train_dataloader()
    loader.batch_sampler.set_epoch(1)
    uninterrupted = list(loader.batch_sampler)
    resumed = result.datamodule.train_dataloader()
    resumed.load_state_dict({"epoch": 1, "batches_yielded": 1})
    assert list(resumed.batch_sampler) == uninterrupted[1:]
    assert all(epoch == 1 for batch in uninterrupted for _, epoch in batch)
    for keys, batch in zip(uninterrupted, loader):  # what the training batches carry is the draw
        drawn = EmbeddingCache.read(train_set.draw_text(*keys[0]))
        assert torch.equal(batch["text"]["prompt_embeds"][0], drawn["prompt_embeds"])


def test_a_masks_crop_is_its_images_crop(trained):
    result, data, _ = trained
    wide = samples_by_stem(result)["wide"]
    assert wide.size[0] != wide.size[1]
    image_crop = (load_image(data / "wide.png", wide.size)[0] + 1) / 2
    torch.testing.assert_close(wide.load_mask(), image_crop, atol=1e-6, rtol=0)
    cached = EmbeddingCache.read(wide.latent_path)
    torch.testing.assert_close(cached["loss_mask"], latent_grid_mask(image_crop, cached["latents"]))


def one_batch(result, stem: str) -> dict:
    train_set = result.datamodule.train_set
    index = next(i for i, s in enumerate(train_set.samples) if s.item.path.stem == stem)
    return collate([train_set[index]], result.module.collate_text)


def gradients(module, batch: dict) -> list[torch.Tensor]:
    module.zero_grad()
    module.forward_loss(batch, torch.tensor([0.5]), torch.randn(batch["latents"].shape)).backward()
    return [torch.zeros(()) if p.grad is None else p.grad for p in module.trainable_parameters()]


def test_an_all_black_mask_gives_no_gradient(trained):
    result, _, _ = trained
    black = one_batch(result, "black")
    assert black["loss_mask"].max() == 0
    assert not any(grad.any() for grad in gradients(result.module, black))
    assert any(grad.any() for grad in gradients(result.module, one_batch(result, "half")))


def assert_loss_is_the_left_halfs(module, batch: dict) -> None:
    """The batch's mask is white on the left half of the latent grid: its loss is the family's MSE there."""
    width = batch["latents"].shape[-1]
    assert batch["loss_mask"].shape == (1, *batch["latents"].shape[-2:])
    assert batch["loss_mask"][..., :width // 2].min() == 1 and batch["loss_mask"][..., width // 2:].max() == 0
    t, noise = torch.tensor([0.4]), torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = module.forward_loss(batch, t, noise)
        prediction, target = module.denoise(batch, t, noise)
    by_hand = ((prediction.float() - target.float())[..., :width // 2] ** 2).mean()
    torch.testing.assert_close(loss, by_hand)


def test_a_half_mask_averages_the_loss_over_that_half(trained):
    result, _, _ = trained
    assert_loss_is_the_left_halfs(result.module, one_batch(result, "half"))


def test_a_video_mask_covers_every_frame(make_config, tmp_path):
    videos, masks = tmp_path / "videos", tmp_path / "masks"
    videos.mkdir()
    masks.mkdir()
    write_indexed_video(videos / "clip.mp4", num_frames=36, fps=24, size=(32, 32))
    half_white(32, 32).save(masks / "clip.png")
    result = run(make_config("model=wan21_t2v", *WAN_FAST, f"dataset.path={videos}", f"dataset.mask_path={masks}"))
    batch = one_batch(result, "clip")
    assert batch["latents"].ndim == 5 and batch["latents"].shape[2] > 1  # [B, C, frames, h, w]
    assert_loss_is_the_left_halfs(result.module, batch)


def test_caption_key_mistakes_are_one_line_naming_the_key(make_config, tmp_path):
    with pytest.raises(ConfigError, match=r"^[^\n]*cache_shuffle_num[^\n]*$"):
        run(make_config("dataset.resolutions=[64]", "dataset.shuffle_tags=true", "trainer.max_steps=1"))
    with pytest.raises(ConfigError, match=r"^dataset.caption_extension='caption' [^\n]*\.caption$"):
        scan_directory(tmp_path, caption_extension="caption")
