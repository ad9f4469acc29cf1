"""HunyuanImage-2.1: diffusers' HunyuanImageTransformer2DModel (dual- then single-stream blocks, 1x1 patches) on the
latents of its 32x VAE, conditioned on Qwen2.5-VL hidden states and, for text in quotes, glyph ByT5 embeddings.

Text goes through HunyuanImagePipeline's own `encode_prompt` (its template and dropped tokens; quoted text in a
caption to ByT5, none: no ByT5 tokens); both are cached cut at their masks and padded per batch with a mask.

Files: ComfyUI's four files suffice, as in the reference: `transformer_path` (hunyuanimage2.1.safetensors),
`vae_path` (hunyuan_image_2.1_vae_fp16), `text_encoder_path` (qwen_2.5_vl_7b) and `byt5_path`
(byt5_small_glyphxl_fp16); each part's config is read off its file (formats.hunyuan_image), ByT5's byte-level
tokenizer is built in code, the scheduler and guiders take the released pipeline's settings, and the Qwen2.5
tokenizer, which no weights file carries, comes from `tokenizer_path` (a folder, or a Hugging Face repo id fetched
when online). Or `diffusers_path`, a HunyuanImage-2.1 Diffusers folder (configs, tokenizers, scheduler, guiders and
the weights of any part without its file). LoRAs export in ComfyUI format, full fine-tunes as ComfyUI's single file
(see src/formats/hunyuan_image.py)."""
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
from diffusers import (
    AdaptiveProjectedMixGuidance,
    AutoencoderKLHunyuanImage,
    FlowMatchEulerDiscreteScheduler,
    HunyuanImagePipeline,
    HunyuanImageTransformer2DModel,
)
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    ByT5Tokenizer,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    T5Config,
    T5EncoderModel,
)

from difftrain.config.errors import ConfigError
from difftrain.config.keys import ModelPath
from difftrain.datamodules.cache import fingerprint_files
from difftrain.formats import hunyuan_image as formats
from difftrain.formats.qwen_image import load_text_encoder
from difftrain.tiny import hunyuan_image as tiny_hunyuan
from difftrain.tiny import tiny_model_dir
from difftrain.utils.atomic import save_safetensors

from .base import pad_sequences, skeleton
from .parts import Part, SingleFileModule, load_tokenizer, tokenizer_folders

LORA_FILE = "adapter_model.safetensors"
FULL_FILE = "hunyuanimage2.1.safetensors"
TEXT_KEYS = ("prompt_embeds", "prompt_embeds_2")
# HunyuanImagePipeline feeds the transformer the scheduler's timesteps: sigma x 1000.
TIMESTEP_SCALE = 1000
TINY_FILES = {"transformer": tiny_hunyuan.COMFY_TRANSFORMER, "vae": tiny_hunyuan.COMFY_VAE,
              "text_encoder": tiny_hunyuan.COMFY_TEXT_ENCODER, "text_encoder_2": tiny_hunyuan.COMFY_BYT5}
FILE_KEYS = {"transformer": "transformer_path", "vae": "vae_path", "text_encoder": "text_encoder_path",
             "text_encoder_2": "byt5_path"}
# HunyuanImage-2.1's sampling settings (Tencent's pipeline: shift 5; adaptive projected guidance from step 5, for
# quoted text from step 38); the rest are the guider's defaults.
SCHEDULER_SHIFT = 5.0
GUIDER_START_STEPS = {"guider": 5, "ocr_guider": 38}
PARTS = {"transformer": Part(HunyuanImageTransformer2DModel, HunyuanImageTransformer2DModel.load_config,
                             formats.transformer_config, formats.load_transformer),
         "vae": Part(AutoencoderKLHunyuanImage, AutoencoderKLHunyuanImage.load_config, formats.vae_config,
                     formats.load_vae),
         "text_encoder": Part(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig.from_pretrained,
                              formats.qwen_config, load_text_encoder),
         "text_encoder_2": Part(T5EncoderModel, T5Config.from_pretrained, formats.byt5_config, formats.load_byt5)}


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


class HunyuanImageModule(SingleFileModule):
    cache_name = "hunyuan_image"
    tiny_models = ("hunyuan_image",)
    lora_target_blocks = ("HunyuanImageTransformerBlock", "HunyuanImageSingleTransformerBlock")
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    keep_in_high_precision = (r"^x_embedder", r"^context_embedder", r"^time_guidance_embed", r"^norm_out",
                              r"^proj_out$")
    pixels_round_to_multiple = 32  # the VAE's 32x compression, 1x1 patches
    PARTS = PARTS

    def __init__(self,
                 diffusers_path: Annotated[Optional[str], ModelPath(
                     "a HunyuanImage-2.1 Diffusers folder (configs, tokenizers, scheduler; weights of parts without "
                     "their file); not needed when the four ComfyUI files are set",
                     example="/models/HunyuanImage-2.1-Diffusers")] = None,
                 transformer_path: Annotated[Optional[str], ModelPath(
                     "ComfyUI's transformer file", example="/models/hunyuanimage2.1.safetensors")] = None,
                 vae_path: Annotated[Optional[str], ModelPath(
                     "ComfyUI's VAE file", example="/models/hunyuan_image_2.1_vae_fp16.safetensors")] = None,
                 text_encoder_path: Annotated[Optional[str], ModelPath(
                     "ComfyUI's Qwen2.5-VL file", example="/models/qwen_2.5_vl_7b.safetensors")] = None,
                 byt5_path: Annotated[Optional[str], ModelPath(
                     "ComfyUI's glyph ByT5 file", example="/models/byt5_small_glyphxl_fp16.safetensors")] = None,
                 # by default that of ComfyUI's qwen_2.5_vl_7b (HunyuanImage-2.1's tokenizer/), downloaded
                 tokenizer_path: Annotated[str, ModelPath(
                     "the Qwen2.5-VL tokenizer (a folder, or a Hugging Face repo id), used without diffusers_path",
                     example="/models/Qwen2.5-VL-7B-Instruct", repo_id=True)] = "Qwen/Qwen2.5-VL-7B-Instruct",
                 **common):
        super().__init__(**common)
        self.diffusers_path = diffusers_path
        self.tokenizer_path = tokenizer_path
        self.files = {"transformer": transformer_path, "vae": vae_path, "text_encoder": text_encoder_path,
                      "text_encoder_2": byt5_path}
        self.check_sources()

    # --- files
    def check_sources(self) -> None:
        """A Diffusers folder, or the four single files (a tiny model is a folder)."""
        missing = [f"model.{FILE_KEYS[part]}" for part, path in self.files.items() if not path]
        if missing and not (self.tiny or self.diffusers_path):
            raise ConfigError(f"model.diffusers_path is not set, nor {' and '.join(missing)}: set the four ComfyUI "
                              f"files (model.transformer_path, model.vae_path, model.text_encoder_path, "
                              f"model.byt5_path) or a HunyuanImage-2.1 Diffusers folder "
                              f"(model.diffusers_path=/models/HunyuanImage-2.1-Diffusers), or use model.tiny=true for "
                              f"a tiny test model.")

    @property
    def model_dir(self) -> Optional[Path]:
        """The Diffusers folder (the tiny one in tests), or None: the single files alone."""
        if self.tiny:
            return tiny_model_dir("hunyuan_image", tiny_hunyuan.build)
        return Path(self.diffusers_path) if self.diffusers_path else None

    @property
    def part_files(self) -> dict[str, Optional[str]]:
        """Each part's single file; a tiny model reads its own ComfyUI files unless given others."""
        if not self.tiny:
            return self.files
        return {part: path or str(self.model_dir / TINY_FILES[part]) for part, path in self.files.items()}

    def load_tokenizers(self) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
        """Qwen2.5's and ByT5's: the folder's, else `tokenizer_path`'s and ByT5's byte-level one (no vocabulary)."""
        if self.model_dir is not None:
            return tuple(AutoTokenizer.from_pretrained(self.model_dir, subfolder=name, local_files_only=True)
                         for name in ("tokenizer", "tokenizer_2"))
        return load_tokenizer(self.tokenizer_path, "Qwen2.5-VL"), ByT5Tokenizer()

    def tokenizer_folders(self) -> list[Path]:
        """The folders the tokenizers are read from (none for a repo id: its name identifies it)."""
        if self.model_dir is not None:
            return [self.model_dir / "tokenizer", self.model_dir / "tokenizer_2"]
        return tokenizer_folders(self.tokenizer_path)

    def load_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        if self.model_dir is None:
            return FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT)
        return FlowMatchEulerDiscreteScheduler.from_pretrained(self.model_dir, subfolder="scheduler")

    def load_guiders(self) -> dict[str, AdaptiveProjectedMixGuidance]:
        if self.model_dir is None:
            return {name: AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=step)
                    for name, step in GUIDER_START_STEPS.items()}
        return {name: AdaptiveProjectedMixGuidance.from_pretrained(self.model_dir, subfolder=name)
                for name in GUIDER_START_STEPS}

    def pipeline(self, transformer: Optional[HunyuanImageTransformer2DModel]) -> HunyuanImagePipeline:
        tokenizer, tokenizer_2 = self.load_tokenizers()
        return HunyuanImagePipeline(
            transformer=transformer, vae=self.load_part("vae").eval(), text_encoder=self.load_part("text_encoder").eval(),
            tokenizer=tokenizer, text_encoder_2=self.load_part("text_encoder_2").eval(), tokenizer_2=tokenizer_2,
            scheduler=self.load_scheduler(), **self.load_guiders())

    # --- caching
    def cache_fingerprints(self) -> tuple[str, str]:
        text = fingerprint_files(self.weights_source("text_encoder"), self.weights_source("text_encoder_2"),
                                 *self.tokenizer_folders(), extra=f"{self.cache_name}:{self.tokenizer_path}")
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
    def load_denoiser(self) -> HunyuanImageTransformer2DModel:
        return self.load_part("transformer")

    def denoiser_skeleton(self) -> HunyuanImageTransformer2DModel:
        return skeleton(HunyuanImageTransformer2DModel, self.part_config("transformer"))

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
