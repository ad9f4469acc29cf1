"""Previews during training: the `sample_prompts` rendered through the family's inference hook (`module.render`)
with the adapter as trained at that step, into <run_dir>/samples/<step>/<index>.png (.mp4 for videos) and the
active TensorBoard / W&B loggers. Rendering leaves training exactly as it was (train modes, requires_grad, RNG
states), so a run with previews trains the same weights as one without."""
import gc
import io
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import av
import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary

from difftrain.config.samples import SampleRequest, sample_requests
from difftrain.utils.atomic import atomic_directory


class PreviewCallback(Callback):
    def __init__(self, run_dir: str, requests: list[SampleRequest], every_n_steps: Optional[int] = None,
                 every_n_epochs: Optional[int] = None, before_first_step: bool = False, steps: int = 20,
                 guidance: Optional[float] = None):
        self.samples_dir = Path(run_dir) / "samples"
        self.requests = requests
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.before_first_step = before_first_step
        self.steps = steps
        self.guidance = guidance
        self._last_step_rendered = -1

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "PreviewCallback":
        return cls(cfg.run_dir, sample_requests(cfg), cfg.sample_every_n_steps, cfg.sample_every_n_epochs,
                   cfg.sample_before_first_step, cfg.sample_steps, cfg.sample_guidance)

    def on_train_start(self, trainer: Trainer, module: LightningModule) -> None:
        if self.before_first_step:
            self.preview(trainer, module)
        self._last_step_rendered = trainer.global_step  # not again at the step training starts (or resumes) from

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, *args) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.preview(trainer, module)

    def on_train_epoch_end(self, trainer: Trainer, module: LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.preview(trainer, module)

    def preview(self, trainer: Trainer, module: LightningModule) -> None:
        """Render every request once per step, on rank 0 while the other ranks wait."""
        step = trainer.global_step
        if not self.requests or step == self._last_step_rendered:
            return
        self._last_step_rendered = step
        if trainer.is_global_zero:
            with training_state_kept(module):
                media = render_requests(module, self.requests, self.steps, self.guidance)
            fps = module.framerate or 1
            files = write_samples(media, self.samples_dir / str(step), fps)
            log_samples(trainer.loggers, media, files, [r.prompt for r in self.requests], step, fps)
        trainer.strategy.barrier("previews")


def render_requests(module: Any, requests: list[SampleRequest], steps: int, guidance: Optional[float]
                    ) -> list[np.ndarray]:
    """One image [H, W, 3] or video [F, H, W, 3] in [0, 1] per request, all through one inference pipeline
    (built from the module's parts as they are now, freed after)."""
    pipeline = module.inference_pipeline()
    try:
        return [module.render(r.prompt, r.width, r.height, steps, r.seed, guidance=guidance, pipeline=pipeline,
                              **family_inputs(module, r))[0] for r in requests]
    finally:
        del pipeline
        if torch.cuda.is_available():  # the pipeline's encoders leave the training device's memory now
            gc.collect()
            torch.cuda.empty_cache()


def family_inputs(module: Any, request: SampleRequest) -> dict[str, Any]:
    """The request's frames (video families) and control image (edit / image-to-video families)."""
    inputs = {}
    if request.frames and module.framerate:
        inputs["frames"] = request.frames
    if request.image:
        inputs["image"] = Image.open(request.image).convert("RGB")
    return inputs


@contextmanager
def training_state_kept(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside the block; after it, every submodule's train flag, every parameter's
    requires_grad and the RNG states (torch CPU and CUDA, numpy, random) as they were."""
    modes = {m: m.training for m in module.modules()}
    grads = {p: p.requires_grad for p in module.parameters()}
    numpy_state, python_state = np.random.get_state(), random.getstate()
    cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            module.eval()
            yield
    finally:
        for m, training in modes.items():
            m.training = training
        for p, requires_grad in grads.items():
            p.requires_grad_(requires_grad)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded as diffusers' numpy_to_pil rounds."""
    return (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)


def is_video(media: np.ndarray) -> bool:
    return media.ndim == 4 and media.shape[0] > 1


def write_samples(media: list[np.ndarray], folder: Path, fps: int) -> list[Path]:
    """<folder>/<index>.png (a video: .mp4), the folder replaced whole once every file is written."""
    names = [f"{i}.mp4" if is_video(m) else f"{i}.png" for i, m in enumerate(media)]
    with atomic_directory(folder) as tmp:
        for item, name in zip(media, names):
            save_media(item, tmp / name, fps)
    return [folder / name for name in names]


def save_media(media: np.ndarray, path: Path, fps: int) -> None:
    """An image (or a one-frame video) as PNG; a video as H.264 MP4 (yuv420p, which players expect)."""
    if not is_video(media):
        Image.fromarray(to_uint8(media.reshape(media.shape[-3:]))).save(path)
        return
    frames = to_uint8(media)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def log_samples(loggers: list[Logger], media: list[np.ndarray], files: list[Path], prompts: list[str], step: int,
                fps: int) -> None:
    """Each sample as samples/<index> to TensorBoard (images; videos as animated GIFs) and W&B (the written files)."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            for i, item in enumerate(media):
                tensorboard_sample(logger.experiment, f"samples/{i}", item, step, fps)
        elif isinstance(logger, WandbLogger):
            for i, (item, file, prompt) in enumerate(zip(media, files, prompts)):
                log = logger.log_video if is_video(item) else logger.log_image
                log(f"samples/{i}", [str(file)], step=step, caption=[prompt])


def tensorboard_sample(writer: Any, tag: str, media: np.ndarray, step: int, fps: int) -> None:
    """add_image; a video as the animated-GIF image summary add_video writes, encoded here with Pillow (add_video
    itself needs moviepy)."""
    if not is_video(media):
        writer.add_image(tag, to_uint8(media.reshape(media.shape[-3:])), step, dataformats="HWC")
        return
    frames = [Image.fromarray(frame) for frame in to_uint8(media)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=1000 / fps, loop=0)
    height, width = media.shape[1:3]
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif.getvalue())
    writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
