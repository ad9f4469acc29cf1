"""Video training data for Wan through the real datamodule and trainer: framerate resampling, frame buckets and
clip modes on synthetic videos whose frames show their own index; too-short and corrupt videos; image-to-video
conditioning (first frame, mask, CLIP features for 2.1) and its video-only rule; the A14B T2V and I2V timestep ranges
under shift."""
import logging
import shutil
from fractions import Fraction

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from difftrain.config.validate import ConfigError
from difftrain.datamodules.buckets import clip_starts
from difftrain.datamodules.cache import EmbeddingCache
from difftrain.datamodules.datamodule import MediaToEncode
from difftrain.datamodules.media import resample_indices
from difftrain.training import run
from tests.conftest import ROOT
from tests.test_video_data import shown_indices, write_indexed_video

FAST = ("model.tiny=true", "model.dtype=float32", "model.max_sequence_length=16", "trainer.max_steps=1",
        "checkpoint_every_n_steps=null", "dataset.resolutions=[32]", "dataset.frame_buckets=[1,17]")


@pytest.fixture
def video_folder(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    write_indexed_video(folder / "long.mp4", num_frames=36, fps=24)  # 24 frames at 16 fps
    write_indexed_video(folder / "short.webm", num_frames=12, fps=16)  # shorter than the 17-frame bucket
    (folder / "corrupt.mov").write_bytes(b"\x00\x00\x00\x18ftypqt  " + bytes(500))
    (folder / "corrupt.txt").write_text("broken")
    return folder


def samples_by_name(datamodule) -> dict[str, list]:
    found = {}
    for sample in datamodule.train_set.samples:
        found.setdefault(sample.item.path.name, []).append(sample)
    return found


@pytest.mark.parametrize("mode", ["single_beginning", "single_middle", "multiple_overlapping"])
def test_clips_are_cut_from_the_resampled_video_as_the_mode_says(make_config, video_folder, caplog, mode):
    caplog.set_level(logging.WARNING, logger="difftrain.datamodules.datamodule")
    Image.new("RGB", (40, 30), "red").save(video_folder / "still.png")  # text-to-video also trains on images
    (video_folder / "still.txt").write_text("a red picture")
    result = run(make_config("model=wan21_t2v", *FAST, f"dataset.path={video_folder}",
                             f"dataset.video_clip_mode={mode}"))
    samples = samples_by_name(result.datamodule)

    timeline = resample_indices(36, Fraction(24), 16)
    expected = [tuple(timeline[s:s + 17]) for s in clip_starts(len(timeline), 17, mode)]
    assert [s.frames for s in samples["long.mp4"]] == expected
    encode = MediaToEncode(samples["long.mp4"])
    for i, frames in enumerate(expected):  # the pixels cached for each clip show exactly those frames
        assert shown_indices(encode[i][1]) == list(frames)
    latents = [EmbeddingCache.read(s.latent_path)["latents"] for s in samples["long.mp4"]]
    assert all(lat.shape[1] == (17 - 1) // 4 + 1 for lat in latents)  # 4x temporal compression, 4k+1 frames
    assert len({s.latent_path for s in samples["long.mp4"]}) == len(expected)  # each clip cached on its own

    assert [s.bucket[2] for s in samples["still.png"]] == [1]
    assert {s.bucket[2] for s in samples["long.mp4"]} == {17}
    skipped = {s.path.name: s.reason for s in result.datamodule.skipped}
    assert "too short" in skipped["short.webm"] and "frame_buckets" in skipped["short.webm"]
    assert skipped["corrupt.mov"].startswith("unreadable video")
    assert str(video_folder / "short.webm") in caplog.text and str(video_folder / "corrupt.mov") in caplog.text


def test_frame_buckets_must_be_encodable_by_the_vae(make_config, video_folder):
    with pytest.raises(ConfigError, match=r"4k\+1"):
        run(make_config("model=wan21_t2v", *FAST, f"dataset.path={video_folder}", "dataset.frame_buckets=[1,16]"))


@pytest.mark.parametrize("variant", ["wan21_i2v", "wan22_low_i2v", "wan22_high_i2v"])
def test_image_in_an_image_to_video_dataset_is_one_clear_error(make_config, tmp_path, variant):
    folder = tmp_path / "mixed"
    shutil.copytree(ROOT / "data" / "examples" / "videos", folder)
    Image.new("RGB", (32, 32), "blue").save(folder / "photo.jpg")
    (folder / "photo.txt").write_text("a blue picture")
    with pytest.raises(ConfigError) as error:
        run(make_config(f"model={variant}", *FAST, f"dataset.path={folder}"))
    message = str(error.value)
    assert str(folder / "photo.jpg") in message and "videos only" in message and "wan21_t2v" in message


@pytest.mark.parametrize("variant", ["wan21_i2v", "wan22_high_i2v"])
def test_first_frame_conditions_image_to_video_as_the_model_expects(make_config, variant):
    result = run(make_config(f"model={variant}", "dataset=videos", *FAST))
    sample = result.datamodule.train_set.samples[0]
    cached = EmbeddingCache.read(sample.latent_path)
    latents, condition = cached["latents"], cached["image_condition"]
    channels, frames = latents.shape[:2]
    assert condition.shape == (4 + channels, *latents.shape[1:])  # 16 + 4 + 16 = the transformer's 36 inputs
    assert result.module.denoiser.config.in_channels == 2 * channels + 4
    mask = condition[:4]
    assert torch.all(mask[:, 0] == 1) and torch.all(mask[:, 1:] == 0)  # only the first frame is given
    # The condition's latents are the VAE's of the first frame followed by black frames: the clip's own first
    # latent frame (the VAE is causal), and nothing of the frames the model must predict.
    torch.testing.assert_close(condition[4:, 0], latents[:, 0], rtol=1e-4, atol=1e-4)
    pixels = MediaToEncode([sample])[0][1]
    first_only = torch.cat([pixels[:, :1], torch.zeros_like(pixels[:, 1:])], dim=1)
    vae = result.module.load_cache_encoders().pipe.vae
    with torch.no_grad():
        expected = vae.encode(first_only.unsqueeze(0)).latent_dist.mode()[0]
    mean, std = (torch.tensor(vae.config[k]).view(-1, 1, 1, 1) for k in ("latents_mean", "latents_std"))
    torch.testing.assert_close(condition[4:], (expected - mean) / std, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(condition[4:, 1:], latents[:, 1:], atol=1e-2)
    clip_config = result.module.denoiser.config
    if variant == "wan21_i2v":  # CLIP features of the first frame
        assert cached["image_embeds"].ndim == 2 and cached["image_embeds"].shape[1] == clip_config.image_dim
    else:  # Wan2.2 A14B I2V: no image encoder, the transformer has no image projections
        assert "image_embeds" not in cached and clip_config.image_dim is None


@pytest.mark.parametrize("variant,low,high", [("wan22_low", 0.0, 0.875), ("wan22_high", 0.875, 1.0),
                                              ("wan22_low_i2v", 0.0, 0.9), ("wan22_high_i2v", 0.9, 1.0)])
@pytest.mark.parametrize("shift", [None, "model.shift=3", "model.flux_shift=true"])
def test_expert_timestep_ranges_hold_under_shift_and_match_the_shifted_distribution(make_config, variant, low,
                                                                                     high, shift):
    overrides = (f"model={variant}", "model.tiny=true", *([shift] if shift else []))
    cfg = make_config(*overrides)
    module = instantiate(cfg.model, adapter=cfg.adapter, optimizer=cfg.optimizer, scheduler=cfg.scheduler,
                         _recursive_=False)
    assert (module.timesteps.min_t, module.timesteps.max_t) == (low, high)
    seq_len = module.image_seq_len(torch.zeros(1, 16, 5, 8, 8))
    t = module.timesteps.sample(20000, seq_len, torch.Generator().manual_seed(0))
    assert low <= t.min() and t.max() <= high

    # Restricting the range conditions the shifted distribution on it, nothing else: same shape inside.
    unrestricted = instantiate(cfg.model, min_t=0.0, max_t=1.0, adapter=cfg.adapter, optimizer=cfg.optimizer,
                               scheduler=cfg.scheduler, _recursive_=False)
    reference = unrestricted.timesteps.sample(200000, seq_len, torch.Generator().manual_seed(1))
    reference = reference[(reference >= low) & (reference <= high)]
    quantiles = torch.linspace(0.05, 0.95, 19)
    torch.testing.assert_close(torch.quantile(t, quantiles), torch.quantile(reference, quantiles), atol=0.01, rtol=0)
