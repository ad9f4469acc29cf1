"""HunyuanImage-2.1: diffusers' HunyuanImageTransformer2DModel (dual- then single-stream blocks, 1x1 patches) on the
latents of its 32x VAE, conditioned on Qwen2.5-VL hidden states and, for text in quotes, glyph ByT5 embeddings.

Text goes through HunyuanImagePipeline's own `encode_prompt` (its template and dropped tokens; quoted text in a
caption to ByT5, none: no ByT5 tokens); both are cached cut at their masks and padded per batch with a mask.

Files: ComfyUI's `transformer_path` (hunyuanimage2.1.safetensors), `vae_path` (hunyuan_image_2.1_vae_fp16),
`text_encoder_path` (qwen_2.5_vl_7b) and `byt5_path` (byt5_small_glyphxl_fp16) hold the weights; `diffusers_path`
(a HunyuanImage-2.1 Diffusers folder) gives what they cannot: the model configs, both tokenizers, the scheduler
and guiders, and the weights of any part without its file. LoRAs export in ComfyUI format, full fine-tunes as
ComfyUI's single file (see src/formats/hunyuan_image.py)."""
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
from diffusers import (
    AutoencoderKLHunyuanImage,
    HunyuanImagePipeline,
    HunyuanImageTransformer2DModel,
)
from safetensors.torch import load_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, T5Config, T5EncoderModel

from difftrain.config.keys import ModelPath
from difftrain.datamodules.cache import fingerprint_files
from difftrain.formats import hunyuan_image as formats
from difftrain.formats.qwen_image import load_text_encoder
from difftrain.tiny import hunyuan_image as tiny_hunyuan
from difftrain.tiny import tiny_model_dir
from difftrain.utils.atomic import save_safetensors

from .base import DiffusionModule, pad_sequences, skeleton

LORA_FILE = "adapter_model.safetensors"
FULL_FILE = "hunyuanimage2.1.safetensors"
TEXT_KEYS = ("prompt_embeds", "prompt_embeds_2")
# HunyuanImagePipeline feeds the transformer the scheduler's timesteps: sigma x 1000.
TIMESTEP_SCALE = 1000
TINY_FILES = {"transformer": tiny_hunyuan.COMFY_TRANSFORMER, "vae": tiny_hunyuan.COMFY_VAE,
              "text_encoder": tiny_hunyuan.COMFY_TEXT_ENCODER, "text_encoder_2": tiny_hunyuan.COMFY_BYT5}


class HunyuanImageEncoders:
    """VAE, Qwen2.5-VL and ByT5, used once to fill the cache."""

    def __init__(self, pipe: HunyuanImagePipeline):
        self.pipe = pipe

    def to(self, device: torch.device) -> "HunyuanImageEncoders":
        self.pipe.to(device)
        return self

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode() * vae.config.scaling_factor

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """Qwen2.5-VL embeddings [L, D] and ByT5 embeddings of the caption's quoted text [L2, D2] (L2 = 0 without
        quotes), each cut at its mask."""
        embeds, mask, glyph_embeds, glyph_mask = self.pipe.encode_prompt(captions, device=self.pipe.text_encoder.device,
                                                                         batch_size=len(captions))
        return [{"prompt_embeds": e[m.bool()], "prompt_embeds_2": g[gm.bool()]}
                for e, m, g, gm in zip(embeds, mask, glyph_embeds, glyph_mask)]


class HunyuanImageModule(DiffusionModule):
    cache_name = "hunyuan_image"
    tiny_models = ("hunyuan_image",)
    lora_target_blocks = ("HunyuanImageTransformerBlock", "HunyuanImageSingleTransformerBlock")
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    keep_in_high_precision = (r"^x_embedder", r"^context_embedder", r"^time_guidance_embed", r"^norm_out",
                              r"^proj_out$")
    pixels_round_to_multiple = 32  # the VAE's 32x compression, 1x1 patches

    def __init__(self,
                 diffusers_path: Annotated[Optional[str], ModelPath(
                     "a HunyuanImage-2.1 Diffusers folder (configs, tokenizers, scheduler; weights of parts without "
                     "their file)", example="/models/HunyuanImage-2.1-Diffusers", required=True)] = None,
                 transformer_path: Annotated[Optional[str], ModelPath(
                     "ComfyUI's transformer file", example="/models/hunyuanimage2.1.safetensors")] = None,
                 vae_path: Annotated[Optional[str], ModelPath(
                     "ComfyUI's VAE file", example="/models/hunyuan_image_2.1_vae_fp16.safetensors")] = None,
                 text_encoder_path: Annotated[Optional[str], ModelPath(
                     "ComfyUI's Qwen2.5-VL file", example="/models/qwen_2.5_vl_7b.safetensors")] = None,
                 byt5_path: Annotated[Optional[str], ModelPath(
                     "ComfyUI's glyph ByT5 file", example="/models/byt5_small_glyphxl_fp16.safetensors")] = None,
                 **common):
        super().__init__(**common)
        self.diffusers_path = diffusers_path
        self.part_files = {"transformer": transformer_path, "vae": vae_path, "text_encoder": text_encoder_path,
                           "text_encoder_2": byt5_path}

    # --- files
    @property
    def model_dir(self) -> Path:
        return tiny_model_dir("hunyuan_image", tiny_hunyuan.build) if self.tiny else Path(self.diffusers_path)

    def part_file(self, part: str) -> Optional[Path]:
        """The part's single file; a tiny model reads its own ComfyUI files unless given others."""
        if self.part_files[part]:
            return Path(self.part_files[part])
        return self.model_dir / TINY_FILES[part] if self.tiny else None

    def weights_source(self, part: str) -> Path:
        return self.part_file(part) or self.model_dir / part

    def load_part(self, part: str, model_cls: type, read_file: Callable[..., torch.nn.Module]
                  ) -> torch.nn.Module:
        """The part from its single file (`read_file(file, dtype=...)`), else from the folder."""
        file = self.part_file(part)
        if file is None:
            return model_cls.from_pretrained(self.model_dir, subfolder=part, dtype=self.compute_dtype,
                                             local_files_only=True).eval()
        return read_file(file, dtype=self.compute_dtype)

    def pipeline(self, transformer: Optional[HunyuanImageTransformer2DModel]) -> HunyuanImagePipeline:
        root = self.model_dir
        vae = skeleton(AutoencoderKLHunyuanImage, AutoencoderKLHunyuanImage.load_config(root, subfolder="vae"))
        qwen_config = Qwen2_5_VLConfig.from_pretrained(root / "text_encoder")
        byt5_config = T5Config.from_pretrained(root / "text_encoder_2")
        return HunyuanImagePipeline.from_pretrained(
            root, transformer=transformer, local_files_only=True,
            vae=self.load_part("vae", AutoencoderKLHunyuanImage, partial(formats.load_vae, skeleton=vae)),
            text_encoder=self.load_part("text_encoder", Qwen2_5_VLForConditionalGeneration,
                                        partial(load_text_encoder, config=qwen_config)),
            text_encoder_2=self.load_part("text_encoder_2", T5EncoderModel,
                                          partial(formats.load_byt5, config=byt5_config)))

    # --- caching
    def cache_fingerprints(self) -> tuple[str, str]:
        root = self.model_dir
        text = fingerprint_files(self.weights_source("text_encoder"), self.weights_source("text_encoder_2"),
                                 root / "tokenizer", root / "tokenizer_2", extra=self.cache_name)
        return fingerprint_files(self.weights_source("vae"), extra=self.cache_name), text

    def load_cache_encoders(self) -> HunyuanImageEncoders:
        return HunyuanImageEncoders(self.pipeline(None))

    @staticmethod
    def collate_text(texts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Both embeddings padded to the batch's longest, each with its mask (the transformer requires them)."""
        batch = {}
        for key in TEXT_KEYS:
            batch[key], batch[f"{key}_mask"] = pad_sequences([text[key] for text in texts])
        return batch

    # --- training
    def denoiser_config(self) -> dict:
        return HunyuanImageTransformer2DModel.load_config(self.model_dir, subfolder="transformer")

    def load_denoiser(self) -> HunyuanImageTransformer2DModel:
        return self.load_part("transformer", HunyuanImageTransformer2DModel,
                              partial(formats.load_transformer, config=self.denoiser_config()))

    def denoiser_skeleton(self) -> HunyuanImageTransformer2DModel:
        return skeleton(HunyuanImageTransformer2DModel, self.denoiser_config())

    def base_model(self) -> str:
        return str(self.weights_source("transformer"))

    def image_seq_len(self, latents: torch.Tensor) -> int:
        return latents.shape[-2] * latents.shape[-1]  # 1x1 patches

    def predict(self, noisy_latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.denoiser(hidden_states=noisy_latents, timestep=t * TIMESTEP_SCALE,
                             encoder_hidden_states=text["prompt_embeds"],
                             encoder_attention_mask=text["prompt_embeds_mask"],
                             encoder_hidden_states_2=text["prompt_embeds_2"],
                             encoder_attention_mask_2=text["prompt_embeds_2_mask"], return_dict=False)[0]

    def inference_pipeline(self) -> HunyuanImagePipeline:
        return self.place_pipeline(self.pipeline(self.denoiser))

    def call_pipeline(self, pipeline: Optional[HunyuanImagePipeline], seed: int, guidance: Optional[float],
                      **inputs: Any) -> Any:
        """HunyuanImagePipeline takes no guidance_scale: `guidance` becomes its guiders' (plain and text) scale."""
        pipeline = self.inference_pipeline() if pipeline is None else pipeline
        if guidance is not None:
            for guider in (pipeline.guider, pipeline.ocr_guider):
                if guider is not None:
                    guider.guidance_scale = guidance
        return super().call_pipeline(pipeline, seed, None, **inputs)

    # --- export
    def export_lora(self, lora_state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        save_safetensors(formats.lora_to_comfyui(lora_state_dict), out_dir / LORA_FILE, self.lora_metadata())

    def read_exported_lora(self, path: Path) -> dict[str, torch.Tensor]:
        return formats.lora_from_comfyui(load_file(path), str(path))

    def export_full(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        formats.save_transformer(state_dict, out_dir / FULL_FILE)
