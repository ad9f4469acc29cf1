"""Qwen-Image, Qwen-Image-Edit and Qwen-Image-Edit-2509 (Plus): diffusers' QwenImageTransformer2DModel (60 dual-stream
blocks) on 2x2-packed latents of AutoencoderKLQwenImage, conditioned on Qwen2.5-VL hidden states.

Text goes through the pipelines' own `encode_prompt` (their prompt template, its dropped tokens, the last hidden
state); embeddings are cached unpadded and padded per batch with their mask (`encoder_hidden_states_mask`). The
Edit models also show the control image(s) to Qwen2.5-VL with the Edit template, and feed their latents after the
noisy target's tokens with their own `img_shapes` entries, as QwenImageEditPipeline / QwenImageEditPlusPipeline do;
the loss covers the target's tokens.

Files: `diffusers_path` is a Qwen-Image (or Qwen-Image-Edit) Diffusers folder: configs, tokenizer, processor,
scheduler and, unless a single file replaces them, the weights. `transformer_path` = ComfyUI's
`qwen_image_bf16.safetensors` / `qwen_image_edit_bf16.safetensors`, `text_encoder_path` = ComfyUI's
`qwen_2.5_vl_7b.safetensors`, `vae_path` = the diffusers VAE file. LoRAs export in ComfyUI format (= diffusers
names under `diffusion_model.`), full fine-tunes as the ComfyUI single file plus a diffusers `transformer/` folder."""
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_pipeline_module
import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus_pipeline_module
import numpy as np
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from difftrain.config.keys import ModelPath
from difftrain.datamodules.cache import fingerprint_files
from difftrain.formats import qwen_image as formats
from difftrain.formats.diffusers_files import save_model_folder
from difftrain.tiny import qwen_image as tiny_qwen
from difftrain.tiny import tiny_model_dir
from difftrain.utils.atomic import save_safetensors

from .base import DiffusionModule, skeleton
from .flux import unpack_latents

LORA_FILE = "adapter_model.safetensors"
FULL_FILE = "qwen_image_bf16.safetensors"
# Qwen2.5-VL's own image processor limit (its preprocessor_config.json), for folders without processor/.
VL_MAX_PIXELS = 12845056


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> an RGB image, as a user would hand it to the pipeline."""
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


class QwenImageEncoders:
    """VAE + Qwen2.5-VL, used once to fill the cache. `pipe` encodes plain captions; `edit_pipe` (Edit models)
    those whose item has control images, with them."""

    def __init__(self, pipe: QwenImagePipeline, max_sequence_length: int,
                 edit_pipe: Optional[QwenImageEditPipeline] = None):
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.edit_pipe = edit_pipe

    def to(self, device: torch.device) -> "QwenImageEncoders":
        self.pipe.to(device)  # edit_pipe shares its modules
        return self

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor,
                      controls: Optional[torch.Tensor] = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """Normalised latents [B, C, h, w] (the pipelines' latents_mean/std), and with controls [B, K, 3, H, W]
        theirs [B, K, C, h, w]."""
        latents = self._latents(pixels)
        if controls is None:
            return latents
        return {"latents": latents,
                "control_latents": self._latents(controls.flatten(0, 1)).unflatten(0, controls.shape[:2])}

    def _latents(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = vae.encode(pixels[:, :, None].to(vae.device, vae.dtype)).latent_dist.mode()[:, :, 0]
        stats = {name: torch.tensor(vae.config[name], device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
                 for name in ("latents_mean", "latents_std")}
        return (latents - stats["latents_mean"]) / stats["latents_std"]

    @torch.no_grad()
    def encode_captions(self, captions: list[str], images: Optional[list[Optional[torch.Tensor]]] = None
                        ) -> list[dict[str, torch.Tensor]]:
        """Prompt embeddings [L, D] each, cut at their mask (unpadded)."""
        device = self.pipe.text_encoder.device
        if images is None or self.edit_pipe is None:
            embeds, mask = self.pipe.encode_prompt(captions, device=device,
                                                   max_sequence_length=self.max_sequence_length)
            return unpadded(embeds, mask)
        return [self._encode_with_controls(caption, controls) for caption, controls in zip(captions, images)]

    def _encode_with_controls(self, caption: str, controls: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        if controls is None:
            return self.encode_captions([caption])[0]
        images = [to_pil(control) for control in controls]
        pipe = self.edit_pipe
        if not isinstance(pipe, QwenImageEditPlusPipeline):
            if len(images) != 1:
                raise ValueError(f"Qwen-Image-Edit takes one control image per target, this item has {len(images)}: "
                                 f"use model=qwen_image_edit_plus for several references.")
            images = images[0]
        embeds, mask = pipe.encode_prompt(caption, image=images, device=pipe.text_encoder.device)
        return unpadded(embeds, mask)[0]


def unpadded(embeds: torch.Tensor, mask: Optional[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    if mask is None:
        return [{"prompt_embeds": e} for e in embeds]
    return [{"prompt_embeds": e[m.bool()]} for e, m in zip(embeds, mask)]


class QwenImageModule(DiffusionModule):
    cache_name = "qwen_image"
    tiny_models = ("qwen_image",)
    lora_target_blocks = ("QwenImageTransformerBlock",)
    block_lists = ("transformer_blocks",)
    keep_in_high_precision = (r"^img_in$", r"^txt_in$", r"^txt_norm$", r"^time_text_embed", r"^norm_out",
                              r"^proj_out$")
    pixels_round_to_multiple = 16  # VAE factor 8 x 2x2 patches

    def __init__(self,
                 diffusers_path: Annotated[Optional[str], ModelPath(
                     "the Qwen-Image Diffusers folder (configs, tokenizer, scheduler; weights unless a single "
                     "file replaces them)", example="/models/Qwen-Image", required=True)] = None,
                 transformer_path: Annotated[Optional[str], ModelPath(
                     "ComfyUI's single-file transformer", example="/models/qwen_image_bf16.safetensors")] = None,
                 text_encoder_path: Annotated[Optional[str], ModelPath(
                     "ComfyUI's single-file Qwen2.5-VL", example="/models/qwen_2.5_vl_7b.safetensors")] = None,
                 vae_path: Annotated[Optional[str], ModelPath(
                     "the diffusers VAE file", example="/models/Qwen-Image/vae/diffusion_pytorch_model.safetensors")
                 ] = None,
                 max_sequence_length: int = 512, **common):
        super().__init__(**common)
        self.diffusers_path = diffusers_path
        # A part's single file replaces the folder's weights of it (the folder still gives its config).
        self.part_files = {"transformer": transformer_path, "text_encoder": text_encoder_path, "vae": vae_path}
        self.max_sequence_length = max_sequence_length

    # --- files
    @property
    def model_dir(self) -> Path:
        return tiny_model_dir("qwen_image", tiny_qwen.build) if self.tiny else Path(self.diffusers_path)

    def weights_source(self, part: str) -> Path:
        """The part's single file, or its subfolder of the Diffusers folder."""
        return Path(self.part_files[part]) if self.part_files[part] else self.model_dir / part

    def load_vae(self) -> AutoencoderKLQwenImage:
        if self.part_files["vae"]:
            config = AutoencoderKLQwenImage.load_config(self.model_dir, subfolder="vae")
            return formats.load_vae(self.part_files["vae"], config, self.compute_dtype)
        return AutoencoderKLQwenImage.from_pretrained(self.model_dir, subfolder="vae", dtype=self.compute_dtype,
                                                      local_files_only=True)

    def load_text_encoder(self) -> Qwen2_5_VLForConditionalGeneration:
        if self.part_files["text_encoder"]:
            config = Qwen2_5_VLConfig.from_pretrained(self.model_dir / "text_encoder")
            return formats.load_text_encoder(self.part_files["text_encoder"], config, self.compute_dtype)
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(self.model_dir, subfolder="text_encoder",
                                                                  dtype=self.compute_dtype, local_files_only=True)

    def pipeline_parts(self, transformer: Optional[QwenImageTransformer2DModel]) -> dict[str, Any]:
        root = self.model_dir
        return dict(transformer=transformer, vae=self.load_vae(), text_encoder=self.load_text_encoder().eval(),
                    tokenizer=AutoTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True),
                    scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler"))

    # --- caching
    def cache_fingerprints(self) -> tuple[str, str]:
        text = fingerprint_files(self.weights_source("text_encoder"), self.model_dir / "tokenizer",
                                 extra=f"{self.cache_name}:{self.max_sequence_length}")
        return fingerprint_files(self.weights_source("vae"), extra="qwen_image"), text

    def load_cache_encoders(self) -> QwenImageEncoders:
        return QwenImageEncoders(QwenImagePipeline(**self.pipeline_parts(None)), self.max_sequence_length)

    # --- training
    def load_denoiser(self) -> QwenImageTransformer2DModel:
        if self.part_files["transformer"]:
            config = QwenImageTransformer2DModel.load_config(self.model_dir, subfolder="transformer")
            return formats.load_transformer(self.part_files["transformer"], config, self.compute_dtype)
        return QwenImageTransformer2DModel.from_pretrained(self.model_dir, subfolder="transformer",
                                                           dtype=self.compute_dtype, local_files_only=True)

    def base_model(self) -> str:
        return str(self.part_files["transformer"] or self.model_dir)

    def discarded_modules(self, denoiser: QwenImageTransformer2DModel) -> list[str]:
        # Only the image tokens leave the last block: its text queries, text output projection and text MLP
        # feed nothing.
        last = f"transformer_blocks.{len(denoiser.transformer_blocks) - 1}"
        return [f"{last}.{name}" for name in ("attn.add_q_proj", "attn.norm_added_q", "attn.to_add_out", "txt_mlp")]

    def denoiser_skeleton(self) -> QwenImageTransformer2DModel:
        """From the Diffusers folder's transformer config (a single file has the same shapes)."""
        return skeleton(QwenImageTransformer2DModel,
                        QwenImageTransformer2DModel.load_config(self.model_dir, subfolder="transformer"))

    def predict(self, noisy_latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                cond: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
        b, c, h, w = noisy_latents.shape
        images = [noisy_latents, *self.context_latents(cond or {}, noisy_latents)]
        tokens = [QwenImagePipeline._pack_latents(x, b, c, x.shape[-2], x.shape[-1]) for x in images]
        img_shapes = [[(1, x.shape[-2] // 2, x.shape[-1] // 2) for x in images]] * b
        out = self.denoiser(hidden_states=torch.cat(tokens, dim=1), timestep=t,
                            encoder_hidden_states=text["prompt_embeds"],
                            encoder_hidden_states_mask=text.get("prompt_embeds_mask"), img_shapes=img_shapes,
                            return_dict=False)[0]
        return unpack_latents(out[:, :tokens[0].shape[1]], c, h, w)  # the loss covers the target's tokens

    def context_latents(self, cond: dict[str, torch.Tensor], like: torch.Tensor) -> list[torch.Tensor]:
        """Clean latents [B, C, h, w] fed after the noisy target's (Edit: the controls'); none for text-to-image."""
        return []

    def inference_pipeline(self) -> QwenImagePipeline:
        return self.place_pipeline(QwenImagePipeline(**self.pipeline_parts(self.denoiser)))

    def render(self, prompt: str, width: int, height: int, steps: int, seed: int, **family_inputs: Any) -> np.ndarray:
        return super().render(prompt, width, height, steps, seed, true_cfg_scale=1.0, **family_inputs)

    # --- export
    def export_lora(self, lora_state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        save_safetensors(formats.lora_to_comfyui(lora_state_dict), out_dir / LORA_FILE, self.lora_metadata())

    def read_exported_lora(self, path: Path) -> dict[str, torch.Tensor]:
        return formats.lora_from_comfyui(load_file(path), str(path))

    def export_full(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        formats.save_transformer(state_dict, out_dir / FULL_FILE)
        save_model_folder(QwenImageTransformer2DModel, self.denoiser.config, state_dict, out_dir / "transformer")


class QwenImageEditModule(QwenImageModule):
    """Qwen-Image-Edit: `diffusers_path` an Edit folder, or a Qwen-Image folder plus `transformer_path` = ComfyUI's
    `qwen_image_edit_bf16.safetensors` (same shapes)."""
    cache_name = "qwen_image_edit"
    text_depends_on_images = True
    pipeline_class = QwenImageEditPipeline

    def processor(self) -> Qwen2VLProcessor:
        folder = self.model_dir / "processor"
        if folder.is_dir():
            return Qwen2VLProcessor.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir, subfolder="tokenizer", local_files_only=True)
        return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(max_pixels=VL_MAX_PIXELS), tokenizer=tokenizer,
                                video_processor=Qwen2VLVideoProcessor())

    def cache_fingerprints(self) -> tuple[str, str]:
        latent, text = super().cache_fingerprints()
        processor = self.model_dir / "processor"
        return latent, fingerprint_files(*([processor] if processor.is_dir() else []), extra=text)

    def load_cache_encoders(self) -> QwenImageEncoders:
        parts = self.pipeline_parts(None)
        return QwenImageEncoders(QwenImagePipeline(**parts), self.max_sequence_length,
                                 self.pipeline_class(**parts, processor=self.processor()))

    def context_latents(self, cond: dict[str, torch.Tensor], like: torch.Tensor) -> list[torch.Tensor]:
        if "control_latents" not in cond:
            return []
        return list(cond["control_latents"].to(like.dtype).unbind(1))

    def inference_pipeline(self) -> QwenImageEditPipeline:
        return self.place_pipeline(self.pipeline_class(**self.pipeline_parts(self.denoiser),
                                                       processor=self.processor()))

    def render(self, prompt: str, width: int, height: int, steps: int, seed: int,
               image: Optional[Image.Image | list[Image.Image]] = None, **family_inputs: Any) -> np.ndarray:
        """An edit of `image` (a list: several references, Plus), each resized to width x height and conditioning
        at that size, as training crops controls to the target's size (never the pipeline's 1 MP resize)."""
        if image is None:
            raise ValueError(f"{type(self).__name__}.render needs the control image to edit (image=...)")
        images = [im.convert("RGB").resize((width, height)) for im in (image if isinstance(image, list) else [image])]
        with condition_area(width * height):
            return super().render(prompt, width, height, steps, seed, image=self.pipeline_image(images),
                                  **family_inputs)

    def pipeline_image(self, images: list[Image.Image]) -> Image.Image | list[Image.Image]:
        return images[0]


class QwenImageEditPlusModule(QwenImageEditModule):
    """Qwen-Image-Edit-2509: several reference images per target (dataset.control_paths)."""
    cache_name = "qwen_image_edit_plus"
    pipeline_class = QwenImageEditPlusPipeline

    def pipeline_image(self, images: list[Image.Image]) -> Image.Image | list[Image.Image]:
        return images


@contextmanager
def condition_area(area: int) -> Iterator[None]:
    """The Edit pipelines resize the condition image(s) to fixed areas (1 MP for the VAE; Plus: 384^2 for the VL
    encoder): within this block, to `area` (the requested output size), the size training conditions at."""
    original = (edit_pipeline_module.calculate_dimensions, plus_pipeline_module.CONDITION_IMAGE_SIZE,
                plus_pipeline_module.VAE_IMAGE_SIZE)
    edit_pipeline_module.calculate_dimensions = lambda _, ratio: original[0](area, ratio)
    plus_pipeline_module.CONDITION_IMAGE_SIZE = plus_pipeline_module.VAE_IMAGE_SIZE = area
    try:
        yield
    finally:
        (edit_pipeline_module.calculate_dimensions, plus_pipeline_module.CONDITION_IMAGE_SIZE,
         plus_pipeline_module.VAE_IMAGE_SIZE) = original
