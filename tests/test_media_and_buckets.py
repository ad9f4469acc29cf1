import io
import math
from collections import Counter
from pathlib import Path

import numpy
import pytest
import torch
from PIL import ExifTags, Image

from difftrain.config.validate import ConfigError
from difftrain.datamodules.buckets import (
    BucketBatchSampler,
    aspect_ratio_buckets,
    assign_buckets,
    bucket_size,
    resolution_area,
)
from difftrain.datamodules.media import ControlFolders, MediaItem, SkippedFile, load_image, scan_directory

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def noisy_jpeg_bytes(size=(64, 64)) -> bytes:
    # Noise keeps the entropy-coded data large, so cutting the file in half lands inside the pixel data.
    pixels = numpy.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=numpy.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def left_right_image(size, left, right) -> Image.Image:
    img = Image.new("RGB", size, right)
    img.paste(left, (0, 0, size[0] // 2, size[1]))
    return img


def save_with_orientation(img: Image.Image, path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    img.save(path, exif=exif)


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    Image.new("RGB", (40, 30), RED).save(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("  a red photo \n", encoding="utf-8")
    save_with_orientation(Image.new("RGB", (40, 20), GREEN), tmp_path / "b_rotated.jpg", orientation=6)
    (tmp_path / "b_rotated.txt").write_text("rotated", encoding="utf-8")
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "c_alpha.PNG")
    (tmp_path / "c_alpha.txt").write_text("", encoding="utf-8")
    (tmp_path / "d_empty.png").write_bytes(b"")
    (tmp_path / "d_empty.txt").write_text("empty", encoding="utf-8")
    jpeg = noisy_jpeg_bytes()
    (tmp_path / "e_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "e_truncated.txt").write_text("truncated", encoding="utf-8")
    (tmp_path / "f_garbage.png").write_bytes(numpy.random.default_rng(1).bytes(500))
    (tmp_path / "f_garbage.txt").write_text("garbage", encoding="utf-8")
    Image.new("RGB", (8, 8), BLUE).save(tmp_path / "g_uncaptioned.webp")
    (tmp_path / "h_orphan.txt").write_text("no image", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden.jpg").write_bytes(b"")
    (tmp_path / ".cache").mkdir()  # hidden folders are not scanned
    Image.new("RGB", (8, 8), BLUE).save(tmp_path / ".cache" / "nested.jpg")
    return tmp_path


def test_scan_directory_items(dataset_dir: Path):
    result = scan_directory(dataset_dir, caption_prefix="sks ")
    assert result.items == [
        MediaItem(dataset_dir / "a.jpg", "sks a red photo", 40, 30),
        MediaItem(dataset_dir / "b_rotated.jpg", "sks rotated", 20, 40),
        MediaItem(dataset_dir / "c_alpha.PNG", "sks ", 16, 16),
    ]


def test_scan_directory_reports_every_unusable_file(dataset_dir: Path):
    skipped = {s.path.name: s.reason for s in scan_directory(dataset_dir).skipped}
    assert sorted(skipped) == ["d_empty.png", "e_truncated.jpg", "f_garbage.png", "g_uncaptioned.webp", "h_orphan.txt"]
    assert "0 bytes" in skipped["d_empty.png"]
    assert "truncated" in skipped["e_truncated.jpg"]
    assert skipped["f_garbage.png"].startswith("unreadable image")
    assert str(dataset_dir / "g_uncaptioned.txt") in skipped["g_uncaptioned.webp"]
    assert "without a matching image" in skipped["h_orphan.txt"]


def test_scan_directory_catches_truncated_png(tmp_path: Path):
    buffer = io.BytesIO()
    Image.fromarray(numpy.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=numpy.uint8)).save(buffer, "PNG")
    png = buffer.getvalue()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "cut.txt").write_text("cut", encoding="utf-8")
    result = scan_directory(tmp_path)
    assert result.items == []
    assert [s.path for s in result.skipped] == [tmp_path / "cut.png"]


def test_scan_directory_missing(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        scan_directory(tmp_path / "does_not_exist")


def test_load_image_shape_and_range(dataset_dir: Path):
    image = load_image(dataset_dir / "a.jpg", (32, 24))
    assert image.shape == (3, 24, 32)
    assert image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    assert torch.allclose(image.mean(dim=(1, 2)), torch.tensor([1.0, -1.0, -1.0]), atol=0.05)


def test_load_image_centre_crop_keeps_middle_third(tmp_path: Path):
    img = Image.new("RGB", (600, 200), GREEN)
    img.paste(RED, (0, 0, 200, 200))
    img.paste(BLUE, (400, 0, 600, 200))
    img.save(tmp_path / "thirds.png")
    image = load_image(tmp_path / "thirds.png", (100, 100))
    assert image.shape == (3, 100, 100)
    # Columns at the very edge may bleed from the neighbouring thirds through the resize filter.
    inner = image[:, :, 3:-3]
    assert torch.allclose(inner, torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand_as(inner), atol=0.05)


def test_load_image_applies_exif_rotation(tmp_path: Path):
    # Orientation 6 = rotate 90 degrees clockwise for display: the stored left half ends up on top.
    save_with_orientation(left_right_image((80, 40), RED, BLUE), tmp_path / "rot.png", orientation=6)
    image = load_image(tmp_path / "rot.png", (40, 80))
    assert image.shape == (3, 80, 40)
    assert image[0, :35].mean() > 0.9 and image[2, :35].mean() < -0.9
    assert image[2, 45:].mean() > 0.9 and image[0, 45:].mean() < -0.9


def test_load_image_composites_alpha_on_white(dataset_dir: Path):
    image = load_image(dataset_dir / "c_alpha.PNG", (8, 8))
    assert torch.allclose(image, torch.ones(3, 8, 8))


def test_aspect_ratio_buckets():
    assert aspect_ratio_buckets(False, 0.5, 2.0, 3, None) == [1.0]
    assert aspect_ratio_buckets(True, 0.5, 2.0, 3, None) == pytest.approx([0.5, 1.0, 2.0])
    assert aspect_ratio_buckets(True, 0.25, 4.0, 5, None) == pytest.approx([0.25, 0.5, 1.0, 2.0, 4.0])
    assert aspect_ratio_buckets(True, 0.5, 2.0, 3, [1.0, [16, 9], [3, 4]]) == pytest.approx([1.0, 16 / 9, 0.75])
    assert aspect_ratio_buckets(False, 0.5, 2.0, 3, [1.5]) == [1.0]


def test_resolution_area():
    assert resolution_area(512) == 512 * 512
    assert resolution_area([768, 512]) == 768 * 512


@pytest.mark.parametrize(
    "area, ratio, multiple", [(512 * 512, 1.0, 16), (1024 * 1024, 16 / 9, 16), (512 * 512, 0.3, 64)]
)
def test_bucket_size_rounds_to_multiple_and_keeps_area(area, ratio, multiple):
    width, height = bucket_size(area, ratio, multiple)
    assert width % multiple == 0 and height % multiple == 0
    # Each side moves by at most multiple/2: |dA| <= (multiple/2)(w + h) + multiple^2/4.
    exact_width, exact_height = math.sqrt(area * ratio), math.sqrt(area / ratio)
    bound = multiple / 2 * (exact_width + exact_height) + multiple**2 / 4
    assert abs(width * height - area) <= bound


def test_bucket_size_exact_cases():
    assert bucket_size(512 * 512, 1.0, 16) == (512, 512)
    assert bucket_size(512 * 512, 2.0, 16) == (720, 368)  # sqrt(2)*512 = 724.1, 512/sqrt(2) = 362.0
    assert bucket_size(100, 100.0, 16) == (96, 16)  # the short side never rounds below one multiple


def test_assign_buckets_uses_log_space():
    ratios = [1.0, 2.0]
    # 1.45 is nearer 1.0 linearly but nearer 2.0 in log space (log 1.45 = 0.37 > log 2 / 2 = 0.35).
    assert assign_buckets(145, 100, [512], ratios, 16) == [bucket_size(512 * 512, 2.0, 16)]
    assert assign_buckets(200, 100, [512], ratios, 16) == [bucket_size(512 * 512, 2.0, 16)]
    assert assign_buckets(135, 100, [512], ratios, 16) == [(512, 512)]


def test_assign_buckets_one_size_per_resolution():
    assert assign_buckets(100, 100, [256, [512, 512], 1024], [1.0], 16) == [(256, 256), (512, 512), (1024, 1024)]


BUCKET_KEYS = ["a"] * 7 + ["b"] * 5 + ["c"] * 1 + ["a"] * 3  # bucket "a" is not contiguous


def epoch_batches(sampler: BucketBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_batches_are_single_bucket_and_cover_every_item():
    sampler = BucketBatchSampler(BUCKET_KEYS, batch_size=4, seed=0)
    batches = epoch_batches(sampler, 0)
    assert len(batches) == len(sampler) == 3 + 2 + 1
    assert all(len(batch) == 4 for batch in batches)
    assert all(len({BUCKET_KEYS[i] for i in batch}) == 1 for batch in batches)
    assert {i for batch in batches for i in batch} == set(range(len(BUCKET_KEYS)))


def test_sampler_pads_only_with_items_of_the_same_bucket():
    sampler = BucketBatchSampler(["x"] * 5 + ["y"] * 3, batch_size=4, seed=3)
    counts = Counter(i for batch in epoch_batches(sampler, 0) for i in batch)
    assert sum(counts[i] for i in range(5)) == 8
    assert sum(counts[i] for i in range(5, 8)) == 4


def test_sampler_handles_repeated_items():
    items = ["a", "a", "b"]
    repeats = 3
    keys = [key for _ in range(repeats) for key in items]  # dataset index i -> item i % 3
    batches = epoch_batches(BucketBatchSampler(keys, batch_size=2, seed=0), 0)
    counts = Counter(i % len(items) for batch in batches for i in batch)
    assert counts[0] >= repeats and counts[1] >= repeats and counts[2] >= repeats
    assert all(len({keys[i] for i in batch}) == 1 for batch in batches)


def test_sampler_ranks_split_the_same_global_batches():
    single = epoch_batches(BucketBatchSampler(BUCKET_KEYS, batch_size=4, seed=5), 2)
    ranks = [BucketBatchSampler(BUCKET_KEYS, batch_size=2, seed=5, rank=r, world_size=2) for r in range(2)]
    rank0, rank1 = (epoch_batches(s, 2) for s in ranks)
    assert len(rank0) == len(rank1) == len(ranks[0]) == len(ranks[1]) == len(single)
    assert [a + b for a, b in zip(rank0, rank1)] == single
    for a, b in zip(rank0, rank1):
        assert len({BUCKET_KEYS[i] for i in a + b}) == 1


def test_sampler_ranks_are_disjoint_when_no_padding_needed():
    keys = ["a"] * 8 + ["b"] * 4
    rank0, rank1 = (
        epoch_batches(BucketBatchSampler(keys, batch_size=2, seed=1, rank=r, world_size=2), 0) for r in range(2)
    )
    seen0 = [i for batch in rank0 for i in batch]
    seen1 = [i for batch in rank1 for i in batch]
    assert not set(seen0) & set(seen1)
    assert sorted(seen0 + seen1) == list(range(12))


def test_sampler_is_deterministic_per_seed_and_epoch():
    def run(seed, epoch):
        return epoch_batches(BucketBatchSampler(BUCKET_KEYS, batch_size=2, seed=seed), epoch)

    assert run(0, 0) == run(0, 0)
    assert run(0, 1) == run(0, 1)
    assert run(0, 0) != run(0, 1)
    assert run(0, 0) != run(1, 0)


def test_sampler_without_shuffle_keeps_order():
    batches = epoch_batches(BucketBatchSampler(["a", "a", "b", "b"], batch_size=2, seed=0, shuffle=False), 7)
    assert batches == [[0, 1], [2, 3]]


def test_sampler_resumes_mid_epoch():
    uninterrupted = BucketBatchSampler(BUCKET_KEYS, batch_size=2, seed=9)
    expected = epoch_batches(uninterrupted, 4)
    next_epoch = epoch_batches(uninterrupted, 5)

    interrupted = BucketBatchSampler(BUCKET_KEYS, batch_size=2, seed=9)
    interrupted.set_epoch(4)
    iterator = iter(interrupted)
    first = [next(iterator) for _ in range(3)]
    state = interrupted.state_dict()
    assert state == {"epoch": 4, "batches_yielded": 3}

    resumed = BucketBatchSampler(BUCKET_KEYS, batch_size=2, seed=9)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # what the trainer does at epoch start must not undo the restore
    assert resumed.state_dict() == state
    assert first + list(resumed) == expected
    assert resumed.state_dict() == {"epoch": 4, "batches_yielded": len(expected)}
    assert epoch_batches(resumed, 5) == next_epoch


def test_sampler_rejects_state_beyond_epoch():
    sampler = BucketBatchSampler(BUCKET_KEYS, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="dataset or batch size"):
        sampler.load_state_dict({"epoch": 0, "batches_yielded": len(sampler) + 1})


def test_controls_match_targets_by_stem_with_any_extension_and_unusable_ones_skip_the_target(tmp_path: Path):
    targets, controls = tmp_path / "targets", tmp_path / "controls"
    targets.mkdir()
    controls.mkdir()
    for stem in ("good", "corrupt", "missing"):
        Image.new("RGB", (32, 16), RED).save(targets / f"{stem}.jpg")
        (targets / f"{stem}.txt").write_text(stem, encoding="utf-8")
    Image.new("RGB", (8, 8), GREEN).save(controls / "good.webp")
    (controls / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    Image.new("RGB", (8, 8), BLUE).save(controls / "no_target.png")
    (controls / "missing.txt").write_text("a caption is not a control image", encoding="utf-8")

    folders = ControlFolders([controls])
    attached = {item.path.stem: folders.attach(item) for item in scan_directory(targets).items}
    assert attached["good"].controls == (controls / "good.webp",)
    assert attached["corrupt"] == SkippedFile(targets / "corrupt.jpg", attached["corrupt"].reason)
    assert str(controls / "corrupt.png") in attached["corrupt"].reason and "unreadable image" in attached["corrupt"].reason
    assert attached["missing"].path == targets / "missing.jpg" and str(controls) in attached["missing"].reason


def test_a_missing_control_folder_is_a_config_error_naming_it(tmp_path: Path):
    with pytest.raises(ConfigError, match=f"Control folder.* not found: {tmp_path / 'absent'}"):
        ControlFolders([tmp_path / "absent"])
