"""HunyuanVideo (T2V; also text-to-image on images): diffusers' HunyuanVideoTransformer3DModel on [B, C, F, h, w]
video latents (an image is a 1-frame video), conditioned on Llama hidden states of the prompt template (cropped and
masked as HunyuanVideoPipeline builds them), CLIP's pooled output and the embedded guidance.

Weights come from Tencent's official inference folder or from ComfyUI files (never a diffusers folder):

| key              | files read                                                                                   |
|------------------|----------------------------------------------------------------------------------------------|
| ckpt_path        | official folder: `hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt`, its      |
|                  | `vae/pytorch_model.pt`, `text_encoder/` (llava-llama-3-8b), `text_encoder_2/` (CLIP-L)      |
| transformer_path | a ComfyUI transformer file (bf16, or fp8 e4m3fn as stored), overriding the folder's          |
| vae_path         | a ComfyUI VAE file (hunyuan_video_vae_bf16.safetensors)                                      |
| llm_path         | the llava-llama-3-8b text encoder + tokenizer folder                                         |
| clip_path        | the clip-vit-large-patch14 folder                                                            |

LoRAs export as `transformer.<original names>.lora_A/lora_B.weight` (ComfyUI and diffusers read them). LoRA only:
there is no full fine-tune export."""
import pickle
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, LlamaModel, PreTrainedTokenizerBase

from difftrain.config.keys import ModelPath
from difftrain.config.validate import ConfigError
from difftrain.datamodules.cache import fingerprint_files
from difftrain.formats import hunyuan_video as formats
from difftrain.tiny import hunyuan_video as tiny_hunyuan_video
from difftrain.tiny import tiny_model_dir
from difftrain.utils.atomic import save_safetensors

from .base import DiffusionModule, skeleton

LORA_FILE = "adapter_model.safetensors"
FLOW_SHIFT = 7.0  # the official sampler's shift at 720p


def template_crop_start(tokenizer: PreTrainedTokenizerBase, template: str) -> int:
    """The number of tokens before the caption in the templated prompt (BOS included): what the pipeline crops off
    the hidden states. diffusers' 95 holds for the real Llama 3 tokenizer only."""
    return len(tokenizer(template.split("{}")[0]).input_ids)


class HunyuanVideoEncoders:
    """VAE + Llama + CLIP used once to fill the cache, through diffusers' own pipeline code."""

    def __init__(self, pipe: HunyuanVideoPipeline, prompt_template: dict, max_sequence_length: int):
        self.pipe = pipe
        self.prompt_template = prompt_template
        self.max_sequence_length = max_sequence_length

    def to(self, device: torch.device) -> "HunyuanVideoEncoders":
        self.pipe.to(device)
        return self

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images or [B, 3, F, H, W] clips in [-1, 1] -> latents [B, C, F', h, w], scaled as the
        pipeline unscales them before decoding."""
        video = pixels.unsqueeze(2) if pixels.ndim == 4 else pixels
        vae = self.pipe.vae
        return vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode() * vae.config.scaling_factor

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """The pipeline's prompt embeddings without their padding (collate_text pads a batch again and masks it)
        and CLIP's pooled output."""
        embeds, pooled, mask = self.pipe.encode_prompt(captions, prompt_template=self.prompt_template,
                                                       max_sequence_length=self.max_sequence_length,
                                                       device=self.pipe.text_encoder.device)
        return [{"prompt_embeds": e[m.bool()], "pooled_prompt_embeds": p} for e, m, p in zip(embeds, mask, pooled)]


class HunyuanVideoModule(DiffusionModule):
    cache_name = "hunyuan_video"
    tiny_models = ("hunyuan_video",)
    lora_target_blocks = ("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock")
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    keep_in_high_precision = (r"^x_embedder", r"^context_embedder", r"^time_text_embed", r"^norm_out",
                              r"attn\.norm_")
    framerate = 24
    frames_multiple = 4
    lora_only = True  # diffusion-pipe saves no HunyuanVideo full fine-tune either

    def __init__(self,
                 ckpt_path: Annotated[Optional[str], ModelPath(
                     "the official HunyuanVideo inference folder (ckpts)", example="/models/HunyuanVideo/ckpts")] = None,
                 transformer_path: Annotated[Optional[str], ModelPath("a ComfyUI transformer file")] = None,
                 vae_path: Annotated[Optional[str], ModelPath("a ComfyUI VAE file")] = None,
                 llm_path: Annotated[Optional[str], ModelPath("the llava-llama-3-8b text encoder folder")] = None,
                 clip_path: Annotated[Optional[str], ModelPath("the clip-vit-large-patch14 folder")] = None,
                 guidance: float = 1.0, max_sequence_length: int = 256, **common):
        super().__init__(**common)
        paths = dict(transformer_path=transformer_path, vae_path=vae_path, llm_path=llm_path, clip_path=clip_path)
        unset = [f"model.{key}" for key, path in paths.items() if not path]
        if unset and not (ckpt_path or self.tiny):
            raise ConfigError(f"{', '.join(unset)} not set: set model.ckpt_path to the official HunyuanVideo folder, "
                              f"or point every one of model.transformer_path, vae_path, llm_path and clip_path at "
                              f"the ComfyUI files.")
        self.ckpt_path = ckpt_path
        self.transformer_path = transformer_path
        self.vae_path = vae_path
        self.llm_path = llm_path
        self.clip_path = clip_path
        self.guidance = guidance
        self.max_sequence_length = max_sequence_length

    # --- files
    @property
    def root(self) -> Path:
        return tiny_model_dir("hunyuan_video", tiny_hunyuan_video.build) if self.tiny else Path(self.ckpt_path)

    def _file(self, path: Optional[str], official: str) -> Path:
        return Path(path) if path else self.root / official

    @property
    def transformer_file(self) -> Path:
        return self._file(self.transformer_path, formats.TRANSFORMER_FILE)

    @property
    def vae_file(self) -> Path:
        return self._file(self.vae_path, formats.VAE_FILE)

    @property
    def llm_dir(self) -> Path:
        return self._file(self.llm_path, formats.LLM_DIR)

    @property
    def clip_dir(self) -> Path:
        return self._file(self.clip_path, formats.CLIP_DIR)

    def base_model(self) -> str:
        return str(self.transformer_file)

    @property
    def rope_axes_dim(self) -> tuple[int, ...]:
        """Not visible in any weight shape: the tiny model's, or the released model's."""
        return tiny_hunyuan_video.ROPE_AXES_DIM if self.tiny else formats.ROPE_AXES_DIM

    # --- text
    def prompt_template(self, tokenizer: PreTrainedTokenizerBase) -> dict:
        """diffusers' template and crop; the tiny tokenizer's crop is counted (95 is the real tokenizer's)."""
        if not self.tiny:
            return DEFAULT_PROMPT_TEMPLATE
        template = DEFAULT_PROMPT_TEMPLATE["template"]
        return {"template": template, "crop_start": template_crop_start(tokenizer, template)}

    def _pipeline(self, transformer: Optional[HunyuanVideoTransformer3DModel]) -> HunyuanVideoPipeline:
        dtype = self.compute_dtype
        return HunyuanVideoPipeline(
            transformer=transformer, vae=formats.load_vae(self.vae_file, dtype),
            text_encoder=LlamaModel.from_pretrained(self.llm_dir, dtype=dtype, local_files_only=True),
            # right padding: the pipeline crops the template off the front and masks the end
            tokenizer=AutoTokenizer.from_pretrained(self.llm_dir, padding_side="right", local_files_only=True),
            text_encoder_2=CLIPTextModel.from_pretrained(self.clip_dir, dtype=dtype, local_files_only=True),
            tokenizer_2=CLIPTokenizer.from_pretrained(self.clip_dir, local_files_only=True),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT))

    # --- caching
    def cache_fingerprints(self) -> tuple[str, str]:
        text = fingerprint_files(self.llm_dir, self.clip_dir, extra=f"hunyuan_video:{self.max_sequence_length}")
        return fingerprint_files(self.vae_file, extra="hunyuan_video"), text

    def load_cache_encoders(self) -> HunyuanVideoEncoders:
        pipe = self._pipeline(transformer=None)
        return HunyuanVideoEncoders(pipe, self.prompt_template(pipe.tokenizer), self.max_sequence_length)

    def inference_pipeline(self) -> HunyuanVideoPipeline:
        return self.place_pipeline(self._pipeline(self.denoiser))

    def render(self, prompt: str, width: int, height: int, steps: int, seed: int, guidance: Optional[float] = None,
               pipeline: Any = None, frames: int = 1, **family_inputs) -> np.ndarray:
        """Video frames [N, F, H, W, 3] in [0, 1]; `guidance` is the embedded guidance (the model is distilled)."""
        pipeline = self.inference_pipeline() if pipeline is None else pipeline
        return self.call_pipeline(pipeline, seed, guidance, prompt=prompt, width=width, height=height,
                                  num_frames=frames, num_inference_steps=steps,
                                  prompt_template=self.prompt_template(pipeline.tokenizer),
                                  max_sequence_length=self.max_sequence_length, **family_inputs).frames

    # --- training
    def denoiser_skeleton(self) -> HunyuanVideoTransformer3DModel:
        shapes = formats.read_native_shapes(self.transformer_file)
        return skeleton(HunyuanVideoTransformer3DModel, formats.transformer_config(shapes, self.rope_axes_dim))

    def load_denoiser(self) -> HunyuanVideoTransformer3DModel:
        try:
            return formats.load_transformer(self.transformer_file, self.compute_dtype, self.rope_axes_dim)
        except pickle.UnpicklingError as error:
            raise ConfigError(f"{self.transformer_file} holds objects other than tensors: checkpoints are read with "
                              f"weights_only=True, which refuses pickled code. Use the official or ComfyUI file.") from error
        except (OSError, ValueError, KeyError) as error:
            raise ConfigError(f"Cannot load the HunyuanVideo transformer from {self.transformer_file}: {error}") from error

    def image_seq_len(self, latents: torch.Tensor) -> int:
        frames, height, width = latents.shape[-3:]
        return frames * height * width // 4  # 1x2x2 patches

    def predict(self, noisy_latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        guidance = torch.full_like(t, self.guidance * 1000)  # the pipeline embeds guidance_scale * 1000
        embeds = text["prompt_embeds"]
        # collate_text masks a batch of captions with different lengths only
        mask = text.get("prompt_embeds_mask", torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device))
        return self.denoiser(hidden_states=noisy_latents, timestep=t * 1000, encoder_hidden_states=embeds,
                             encoder_attention_mask=mask,
                             pooled_projections=text["pooled_prompt_embeds"], guidance=guidance,
                             return_dict=False)[0]

    # --- export
    def export_lora(self, lora_state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        save_safetensors(formats.lora_to_original(lora_state_dict), out_dir / LORA_FILE, self.lora_metadata())

    def read_exported_lora(self, path: Path) -> dict[str, torch.Tensor]:
        return formats.lora_from_original(load_file(path))

    def export_full(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        raise NotImplementedError("HunyuanVideo trains LoRAs only")
