"""Video media: PyAV probing and decoding of every container we accept, framerate resampling, frame buckets and
clip modes, checked on synthetic videos whose every frame shows its own index (as its grey level)."""
import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy
import pytest
import torch
from PIL import Image

from difftrain.datamodules.buckets import clip_starts, frame_buckets_with_image, video_frame_bucket
from difftrain.datamodules.cache import file_digest
from difftrain.datamodules.media import ProbeIndex, load_video, probe_video, resample_indices, scan_directory
from tests.conftest import ROOT

LEVEL_STEP = 7  # grey level of frame i is LEVEL_STEP * i: codecs keep it within +-3
CONTAINERS = {".mp4": "libx264", ".webm": "libvpx-vp9", ".mov": "mpeg4", ".gif": "gif", ".mkv": "libx264"}


def write_indexed_video(path: Path, num_frames: int, fps: int, size=(32, 24)) -> Path:
    """A video whose frame i is flat grey at level LEVEL_STEP * i."""
    codec = CONTAINERS[path.suffix]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        for i in range(num_frames):
            pixels = numpy.full((size[1], size[0], 3), LEVEL_STEP * i, numpy.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    path.with_suffix(".txt").write_text(f"{num_frames} frames at {fps} fps")
    return path


def shown_indices(clip: torch.Tensor) -> list[int]:
    """The source frame index each frame of a [3, F, H, W] clip in [-1, 1] shows."""
    levels = (clip + 1) / 2 * 255
    return [round(level / LEVEL_STEP) for level in levels.mean(dim=(0, 2, 3)).tolist()]


@pytest.mark.parametrize("suffix", sorted(CONTAINERS))
def test_every_container_is_probed_and_decoded_frame_exactly(tmp_path, suffix):
    path = write_indexed_video(tmp_path / f"clip{suffix}", num_frames=20, fps=10)
    width, height, num_frames, fps = probe_video(path)
    assert (width, height, num_frames, fps) == (32, 24, 20, 10)
    wanted = [0, 3, 3, 19]  # repeats allowed: a slow video resampled to a faster clock shows frames twice
    clip = load_video(path, (16, 16), wanted)
    assert clip.shape == (3, 4, 16, 16) and clip.dtype == torch.float32
    assert shown_indices(clip) == wanted


@pytest.mark.parametrize("source_fps,num_frames", [(32, 32), (24, 33), (16, 17), (10, 20), (30, 36)])
def test_resampling_to_the_model_framerate_shows_the_frame_on_screen_at_each_tick(tmp_path, source_fps, num_frames):
    path = write_indexed_video(tmp_path / "clip.mp4", num_frames, source_fps)
    timeline = resample_indices(num_frames, Fraction(source_fps), 16)
    duration = Fraction(num_frames, source_fps)
    assert len(timeline) == -(-duration * 16 // 1)  # one frame per 1/16 s tick that starts within the video
    for k, index in enumerate(timeline):  # the frame on screen at time k/16: shown from index/fps to (index+1)/fps
        assert Fraction(index, source_fps) <= Fraction(k, 16) < Fraction(index + 1, source_fps)
    assert shown_indices(load_video(path, (16, 16), timeline)) == timeline


def test_frame_buckets_take_the_longest_clip_that_fits_and_never_the_image_bucket():
    buckets = frame_buckets_with_image([33, 17])
    assert buckets == [1, 17, 33]
    for length in range(40):
        chosen = video_frame_bucket(length, buckets)
        fitting = [b for b in buckets if 1 < b <= length]
        assert chosen == (max(fitting) if fitting else None)


@pytest.mark.parametrize("num_frames,length", [(17, 17), (22, 17), (33, 17), (34, 17), (50, 17), (81, 33)])
def test_clip_modes_choose_the_frames_their_names_promise(num_frames, length):
    (beginning,) = clip_starts(num_frames, length, "single_beginning")
    (middle,) = clip_starts(num_frames, length, "single_middle")
    assert beginning == 0
    assert abs((middle + length / 2) - num_frames / 2) <= 0.5  # centred, to half a frame
    starts = clip_starts(num_frames, length, "multiple_overlapping")
    covered = {f for s in starts for f in range(s, s + length)}
    assert covered == set(range(num_frames))  # every frame is trained on, nothing past the end
    assert len(starts) == -(-num_frames // length)  # with the fewest clips that can do that
    gaps = numpy.diff(starts)
    assert len(gaps) == 0 or gaps.max() - gaps.min() <= 1  # spread evenly


def test_unknown_clip_mode_is_rejected():
    with pytest.raises(ValueError, match="single_beginning"):
        clip_starts(20, 17, "random")


def test_corrupt_truncated_and_empty_videos_are_skipped_with_their_path(tmp_path):
    good = write_indexed_video(tmp_path / "good.mp4", 17, 16)
    data = good.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.webm").write_bytes(numpy.random.default_rng(0).bytes(2000))
    (tmp_path / "empty.mov").write_bytes(b"")
    for stem in ("truncated", "garbage", "empty"):
        (tmp_path / f"{stem}.txt").write_text("caption")
    scan = scan_directory(tmp_path)
    assert [item.path.name for item in scan.items] == ["good.mp4"]
    assert scan.items[0].is_video and scan.items[0].num_frames == 17 and scan.items[0].fps == 16
    reasons = {s.path.name: s.reason for s in scan.skipped}
    assert reasons["truncated.mp4"].startswith("unreadable video")
    assert reasons["garbage.webm"].startswith("unreadable video")
    assert reasons["empty.mov"] == "empty video file (0 bytes)"


def test_bundled_example_videos_are_all_usable():
    scan = scan_directory(ROOT / "data" / "examples" / "videos")
    assert not scan.skipped
    assert {item.path.suffix for item in scan.items} == {".mp4", ".webm", ".mov", ".gif"}
    assert all(item.is_video and item.num_frames >= 17 and item.caption for item in scan.items)


def scan_with_index(folder: Path, index: Path):
    """A scan as a new run makes it: the index loaded afresh from disk."""
    return scan_directory(folder, probe_index=ProbeIndex(index))


def garble_keeping_size_and_mtime(path: Path) -> None:
    stat = path.stat()
    path.write_bytes(numpy.random.default_rng(1).bytes(stat.st_size))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_probe_index_skips_decoding_unchanged_files_and_reprobes_changed_ones(tmp_path):
    data, index = tmp_path / "data", tmp_path / "cache" / "probes.json"
    data.mkdir()
    video = write_indexed_video(data / "clip.mp4", 17, 16)
    image = data / "still.png"
    Image.new("RGB", (40, 30), "teal").save(image)
    image.with_suffix(".txt").write_text("a teal rectangle")
    (data / "bad.webm").write_bytes(numpy.random.default_rng(0).bytes(2000))
    (data / "bad.txt").write_text("caption")
    first = scan_with_index(data, index)
    assert [(i.path.name, i.width, i.height, i.num_frames, i.fps) for i in first.items] == [
        ("clip.mp4", 32, 24, 17, 16), ("still.png", 40, 30, 1, None)]
    assert [s.path.name for s in first.skipped] == ["bad.webm"]
    assert not list(index.parent.glob("*.tmp")), "a temporary file of the atomic write was left behind"

    # Unreadable now, but with the same size and mtime: only a remembered verdict can still call them good.
    garble_keeping_size_and_mtime(video)
    garble_keeping_size_and_mtime(image)
    second = scan_with_index(data, index)
    assert second.items == first.items and second.skipped == first.skipped

    # A new mtime (or size) is a changed file: decoded again, and now found corrupt.
    os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns + 1_000_000_000))
    with open(image, "ab") as f:
        f.write(b"\0")
    third = scan_with_index(data, index)
    assert not third.items
    reasons = {s.path.name: s.reason for s in third.skipped}
    assert reasons["clip.mp4"].startswith("unreadable video") and reasons["still.png"].startswith("unreadable image")
    assert reasons["bad.webm"] == {s.path.name: s.reason for s in first.skipped}["bad.webm"]


def test_probe_index_remembers_each_file_digest_until_the_file_changes(tmp_path):
    image = tmp_path / "still.png"
    Image.new("RGB", (40, 30), "teal").save(image)
    index_path = tmp_path / "cache" / "probes.json"
    index = ProbeIndex(index_path)
    digest = index.digest(image)
    assert digest == file_digest(image)
    index.save()

    garble_keeping_size_and_mtime(image)  # same size and mtime: the remembered digest, the file is not read
    assert ProbeIndex(index_path).digest(image) == digest
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 1_000_000_000))
    assert ProbeIndex(index_path).digest(image) == file_digest(image) != digest


def malformed_entry_for(path: Path) -> str:
    """An entry whose key and stamp match `path` but whose verdict is not one the index writes."""
    stamp = {"size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}
    entry = {"stamp": stamp, "verdict": {"width": "wide", "height": 1, "num_frames": 5, "fps": "16"}}
    return json.dumps({"version": 1, "files": {str(path.absolute()): entry}})


@pytest.mark.parametrize("corrupt", [
    lambda video: "\0\xff not json",
    lambda video: '{"version": 1, "files": {',  # truncated
    lambda video: "[]",
    lambda video: '{"version": 0, "files": {}}',
    lambda video: '{"version": 1, "files": {"x": 3}}',
    malformed_entry_for,
], ids=["binary", "truncated", "not_an_object", "other_version", "bad_entry", "malformed_verdict"])
def test_corrupt_probe_index_is_ignored_and_rebuilt(tmp_path, corrupt):
    data, index = tmp_path / "data", tmp_path / "probes.json"
    data.mkdir()
    video = write_indexed_video(data / "clip.mp4", 17, 16)
    index.write_text(corrupt(video))
    scan = scan_with_index(data, index)
    assert [(i.path.name, i.num_frames, i.fps) for i in scan.items] == [("clip.mp4", 17, 16)]
    garble_keeping_size_and_mtime(video)  # the rebuilt index now holds the verified verdict
    assert scan_with_index(data, index).items == scan.items
