"""Wan 2.1 / 2.2 (T2V 1.3B/14B, I2V 14B, A14B T2V and I2V low/high-noise experts, TI2V-5B): diffusers'
WanTransformer3DModel on [B, C, F, h, w] video latents (an image is a 1-frame video), conditioned on UMT5 token
embeddings; I2V also on the first frame (4-channel mask + its VAE latents, concatenated to 36 channels) and, for
2.1 only, CLIP image features (Wan2.2 A14B I2V has no image encoder).

Weights come from the original Wan-AI checkpoint folder and ComfyUI single files (never a diffusers folder):

| key              | files read                                                                                   |
|------------------|----------------------------------------------------------------------------------------------|
| ckpt_path        | original folder: `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth`, `google/umt5-xxl/` (tokenizer), and  |
|                  | unless overridden below `diffusion_pytorch_model*.safetensors` (+ `config.json`; A14B: in   |
|                  | `low_noise_model/` or `high_noise_model/`, picked by the variant), `models_t5_umt5-xxl-enc-bf16.pth` |
| transformer_path | a ComfyUI / original single-file transformer, or a folder of shards (an A14B expert folder)  |
| llm_path         | UMT5 encoder as one file: ComfyUI `umt5_xxl_*.safetensors` or the wrapper's `umt5-xxl-enc-*` |
| clip_path        | Wan2.1 I2V only: a transformers CLIPVisionModel folder (default `<ckpt_path>/image_encoder`; |
|                  | the `image_encoder/` of Wan-AI's `*-Diffusers` repos). The open-clip `.pth` is not read.     |

LoRAs export in ComfyUI format (`diffusion_model.blocks.N.self_attn.q.lora_A.weight`), full fine-tunes as a
ComfyUI-layout single file plus the diffusers config that lets `from_single_file` read it offline."""
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel

from difftrain.config.keys import Choices, ModelPath
from difftrain.config.validate import ConfigError
from difftrain.datamodules.cache import fingerprint_files
from difftrain.formats import wan as formats
from difftrain.formats.single_file import read_shapes, save_native, strip_comfy_prefix
from difftrain.tiny import tiny_model_dir
from difftrain.tiny import wan as tiny_wan
from difftrain.utils.atomic import save_safetensors

from .base import DiffusionModule, skeleton

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
VAE_FILES = ("Wan2.1_VAE.pth", "Wan2.2_VAE.pth")
LORA_FILE = "adapter_model.safetensors"
FULL_FILE = "transformer_comfyui.safetensors"


@dataclass(frozen=True)
class Variant:
    tiny: str  # tiny model (difftrain.tiny.wan.TINY_MODELS)
    cache: str  # latents and text embeddings are shared by variants with the same VAE / T5 / conditioning
    expert: Optional[str] = None  # A14B expert subfolder of the checkpoint
    i2v: bool = False
    clip: bool = False  # Wan2.1 I2V: CLIP image features
    pixel_multiple: int = 16  # VAE spatial factor x 2x2 patches


VARIANTS = {
    "wan21_t2v": Variant("wan21_t2v", "wan21"),
    "wan21_i2v": Variant("wan21_i2v", "wan21_i2v", i2v=True, clip=True),
    "wan22_low": Variant("wan22_a14b", "wan21", expert="low_noise_model"),  # 2.2 A14B shares 2.1's VAE and T5
    "wan22_high": Variant("wan22_a14b", "wan21", expert="high_noise_model"),
    # 2.2 A14B I2V: the first-frame condition without CLIP features, so a cache of its own shared by both experts
    "wan22_low_i2v": Variant("wan22_a14b_i2v", "wan22_i2v", expert="low_noise_model", i2v=True),
    "wan22_high_i2v": Variant("wan22_a14b_i2v", "wan22_i2v", expert="high_noise_model", i2v=True),
    "wan22_5b": Variant("wan22_5b", "wan22_5b", pixel_multiple=32),
}


class WanEncoders:
    """VAE + UMT5 (+ CLIP for 2.1 I2V) used once to fill the cache. Runs diffusers' own pipeline code for the
    prompt embeddings and the I2V first-frame condition, so training sees what inference feeds the model."""

    def __init__(self, pipe: WanPipeline, i2v_pipe: Optional[WanImageToVideoPipeline], max_sequence_length: int):
        self.pipe = pipe
        self.i2v_pipe = i2v_pipe
        self.max_sequence_length = max_sequence_length

    def to(self, device: torch.device) -> "WanEncoders":
        self.pipe.to(device)
        if self.i2v_pipe is not None:
            self.i2v_pipe.to(device)
        return self

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, 3, H, W] images or [B, 3, F, H, W] clips in [-1, 1] -> normalised latents [B, C, F', h, w]
        (+ the I2V condition of the first frame)."""
        video = pixels.unsqueeze(2) if pixels.ndim == 4 else pixels
        vae = self.pipe.vae
        latents = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode()
        out = {"latents": (latents - self._stat("latents_mean", latents)) / self._stat("latents_std", latents)}
        if self.i2v_pipe is not None:
            out.update(self._first_frame_condition(video, latents))
        return out

    def _stat(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.pipe.vae.config[name], device=like.device, dtype=like.dtype).view(1, -1, 1, 1, 1)

    def _first_frame_condition(self, video: torch.Tensor, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """WanImageToVideoPipeline.prepare_latents: mask (4 ch, first frame kept) + latents of the first frame
        followed by zeros; encode_image: CLIP penultimate hidden states of the first frame (2.1 only: the pipeline
        of a variant without CLIP has no image encoder, as diffusers' Wan2.2 A14B I2V pipeline)."""
        b, _, num_frames, height, width = video.shape
        first = video[:, :, 0].to(latents.device, latents.dtype)
        _, condition = self.i2v_pipe.prepare_latents(first, b, latents.shape[1], height, width, num_frames,
                                                     latents.dtype, latents.device, latents=torch.zeros_like(latents))
        out = {"image_condition": condition}
        if self.i2v_pipe.image_encoder is not None:
            uint8 = ((first.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
            out["image_embeds"] = self.i2v_pipe.encode_image(list(uint8), latents.device)
        return out

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        embeds = self.pipe._get_t5_prompt_embeds(captions, max_sequence_length=self.max_sequence_length,
                                                 device=self.pipe.text_encoder.device)
        return [{"prompt_embeds": e} for e in embeds]


class WanModule(DiffusionModule):
    lora_target_blocks = ("WanTransformerBlock",)
    block_lists = ("blocks",)
    keep_in_high_precision = (r"^patch_embedding", r"^condition_embedder", r"^proj_out", r"norm")
    framerate = 16
    frames_multiple = 4

    def __init__(self,
                 variant: Annotated[Literal["wan21_t2v", "wan21_i2v", "wan22_low", "wan22_high", "wan22_low_i2v",
                                            "wan22_high_i2v", "wan22_5b"], Choices("the Wan model")] = "wan21_t2v",
                 ckpt_path: Annotated[Optional[str], ModelPath(
                     "the original checkpoint folder", example="/models/Wan2.1-T2V-1.3B", required=True)] = None,
                 transformer_path: Annotated[Optional[str], ModelPath("a single-file transformer checkpoint")] = None,
                 llm_path: Annotated[Optional[str], ModelPath("a single-file text encoder")] = None,
                 clip_path: Annotated[Optional[str], ModelPath("a CLIP vision model folder")] = None,
                 max_sequence_length: int = 512, **common):
        if clip_path and not VARIANTS[variant].clip:
            readers = ", ".join(name for name, v in VARIANTS.items() if v.clip)
            raise ConfigError(f"model.clip_path={clip_path} would be ignored: model.variant={variant} has no CLIP "
                              f"image encoder (only {readers} reads one). Unset model.clip_path, or pick "
                              f"model=wan21_i2v.")
        super().__init__(**common)
        self.variant_name = variant
        self.variant = VARIANTS[variant]
        self.cache_name = self.variant.cache
        self.tiny_models = (self.variant.tiny,)
        self.requires_video = self.variant.i2v
        self.pixels_round_to_multiple = self.variant.pixel_multiple
        self.ckpt_path = ckpt_path
        self.transformer_path = transformer_path
        self.llm_path = llm_path
        self.clip_path = clip_path
        self.max_sequence_length = max_sequence_length

    # --- files
    @property
    def ckpt_dir(self) -> Path:
        return tiny_model_dir(self.variant.tiny, tiny_wan.TINY_MODELS[self.variant.tiny]) if self.tiny else Path(self.ckpt_path)

    def _require(self, path: Path, key: str, what: str) -> Path:
        if not path.exists():
            raise ConfigError(f"{path} not found: {what}. Download it into model.ckpt_path={self.ckpt_dir}, or "
                              f"point {key} at it.")
        return path

    @property
    def transformer_source(self) -> Path:
        if self.transformer_path:
            return Path(self.transformer_path)
        folder = self.ckpt_dir / self.variant.expert if self.variant.expert else self.ckpt_dir
        if not any(folder.glob("diffusion_pytorch_model*.safetensors")):
            raise ConfigError(f"No transformer weights (diffusion_pytorch_model*.safetensors) in {folder}. Download "
                              f"them, or set model.transformer_path to a ComfyUI single file.")
        return folder

    @property
    def vae_file(self) -> Path:
        found = [self.ckpt_dir / name for name in VAE_FILES if (self.ckpt_dir / name).is_file()]
        if not found:
            raise ConfigError(f"No Wan VAE ({' or '.join(VAE_FILES)}) in model.ckpt_path={self.ckpt_dir}.")
        return found[0]

    @property
    def t5_file(self) -> Path:
        return Path(self.llm_path) if self.llm_path else self._require(self.ckpt_dir / T5_FILE, "model.llm_path",
                                                                         "the UMT5 text encoder")

    @property
    def clip_dir(self) -> Path:
        return Path(self.clip_path) if self.clip_path else self._require(self.ckpt_dir / "image_encoder",
                                                                         "model.clip_path", "the CLIP image encoder")

    def base_model(self) -> str:
        return str(self.transformer_path or self.ckpt_dir)

    @property
    def family_name(self) -> str:
        return f"{super().family_name}:{self.variant_name}"

    # --- caching
    def cache_fingerprints(self) -> tuple[str, str]:
        media = [self.vae_file, *([self.clip_dir] if self.variant.clip else [])]
        latent = fingerprint_files(*media, extra=f"wan:{self.variant.cache}")
        text = fingerprint_files(self.t5_file, self.ckpt_dir / TOKENIZER_DIR, extra=f"wan:{self.max_sequence_length}")
        return latent, text

    def load_cache_encoders(self) -> WanEncoders:
        parts = self._pipeline_parts()
        i2v = WanImageToVideoPipeline(**parts, **self._image_encoder()) if self.variant.i2v else None
        return WanEncoders(WanPipeline(**parts), i2v, self.max_sequence_length)

    def _pipeline_parts(self, transformer: Optional[WanTransformer3DModel] = None) -> dict:
        return dict(transformer=transformer, vae=formats.load_vae(self.vae_file, self.compute_dtype),
                    text_encoder=formats.load_umt5(self.t5_file, self.compute_dtype),
                    tokenizer=AutoTokenizer.from_pretrained(self.ckpt_dir / TOKENIZER_DIR, local_files_only=True),
                    scheduler=FlowMatchEulerDiscreteScheduler())

    def _image_encoder(self) -> dict:
        """The I2V pipeline's CLIP image encoder and processor (Wan2.1 only; None for Wan2.2 A14B I2V)."""
        if not self.variant.clip:
            return dict(image_encoder=None, image_processor=None)
        return dict(image_encoder=CLIPVisionModel.from_pretrained(self.clip_dir, dtype=self.compute_dtype),
                    image_processor=CLIPImageProcessor.from_pretrained(self.clip_dir))

    def inference_pipeline(self) -> WanPipeline | WanImageToVideoPipeline:
        """The variant's diffusers pipeline with the denoiser as its only transformer (an A14B expert then
        denoises every step)."""
        parts = self._pipeline_parts(self.denoiser)
        if self.variant.i2v:
            return self.place_pipeline(WanImageToVideoPipeline(**parts, **self._image_encoder()))
        return self.place_pipeline(WanPipeline(**parts))

    def render(self, prompt: str, width: int, height: int, steps: int, seed: int, guidance: Optional[float] = None,
               pipeline: Any = None, frames: int = 1, **family_inputs) -> np.ndarray:
        """Video frames [N, F, H, W, 3] in [0, 1]; image-to-video variants take the first frame as `image`."""
        return self.call_pipeline(pipeline, seed, guidance, prompt=prompt, width=width, height=height,
                                  num_frames=frames, num_inference_steps=steps, **family_inputs).frames

    # --- training
    def denoiser_skeleton(self) -> WanTransformer3DModel:
        source = self.transformer_source
        shapes = strip_comfy_prefix(read_shapes(source, "diffusion_pytorch_model*"))
        return skeleton(WanTransformer3DModel, formats.transformer_config(shapes, self._num_heads(source)))

    def _num_heads(self, source: Path) -> Optional[int]:
        return formats.original_num_heads(source if source.is_dir() else self.ckpt_dir)

    def load_denoiser(self) -> WanTransformer3DModel:
        source = self.transformer_source
        heads = self._num_heads(source)
        try:
            return formats.load_transformer(source, self.compute_dtype, heads)
        except (OSError, ValueError, KeyError) as error:
            raise ConfigError(f"Cannot load the Wan transformer from {source}: {error}") from error

    def image_seq_len(self, latents: torch.Tensor) -> int:
        frames, height, width = latents.shape[-3:]
        return frames * height * width // 4  # 1x2x2 patches

    def predict(self, noisy_latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                cond: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
        inputs, image_embeds = noisy_latents, None
        if self.variant.i2v:
            inputs = torch.cat([noisy_latents, cond["image_condition"]], dim=1)
            image_embeds = cond.get("image_embeds")
        return self.denoiser(hidden_states=inputs, timestep=t * 1000, encoder_hidden_states=text["prompt_embeds"],
                             encoder_hidden_states_image=image_embeds, return_dict=False)[0]

    # --- export
    def export_lora(self, lora_state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        save_safetensors(formats.lora_to_comfyui(lora_state_dict), out_dir / LORA_FILE, self.lora_metadata())

    def export_full(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """The native single file, and transformer/config.json: with it, `WanTransformer3DModel.from_single_file(
        <file>, config=<export dir>, subfolder="transformer", local_files_only=True)` loads the export offline."""
        save_native(formats.transformer_to_native(state_dict), out_dir / FULL_FILE)
        self.denoiser.save_config(out_dir / "transformer")
