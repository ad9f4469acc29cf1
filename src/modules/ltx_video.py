"""LTX-Video (0.9.x): diffusers' LTXVideoTransformer3DModel on packed tokens of [B, C, F, h, w] video latents (an
image is a 1-frame video), flow matching, conditioned on T5 token embeddings and their mask as LTXPipeline computes
them. Latents are normalised by the VAE's per-channel latents_mean / latents_std as LTXPipeline does; the
transformer sees t * 1000 and the VAE's compression over the framerate as its rope interpolation scale.

| key              | files read                                                                               |
|------------------|------------------------------------------------------------------------------------------|
| diffusers_path   | the LTX-Video Diffusers folder (LTXPipeline): T5 text encoder and tokenizer always, the  |
|                  | transformer and VAE unless single_file_path is set, and the configs of both               |
| single_file_path | an original single file (ltx-video-2b-v0.9.1.safetensors, later 0.9.x): transformer and  |
|                  | VAE, read by diffusers' from_single_file with the folder's configs                       |

`first_frame_conditioning_p`: the probability that a video sample trains image-to-video as LTXConditionPipeline
conditions: its first latent frame stays clean (its tokens' timestep 0) and is left out of the loss.
LoRAs export in ComfyUI format (`diffusion_model.<diffusers names>`, which are the original names of the blocks);
no full fine-tune (as the reference trainer)."""
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import torch
from diffusers import AutoencoderKLLTXVideo, LTXPipeline, LTXVideoTransformer3DModel

from difftrain.config.keys import ModelPath
from difftrain.config.validate import ConfigError
from difftrain.datamodules.cache import fingerprint_files
from difftrain.formats.qwen_image import lora_to_comfyui
from difftrain.tiny import ltx_video as tiny_ltx
from difftrain.tiny import tiny_model_dir
from difftrain.utils.atomic import save_safetensors

from .base import DiffusionModule, skeleton
from .flux import FluxEncoders

LORA_FILE = "adapter_model.safetensors"
TEXT_PARTS = ("text_encoder", "tokenizer")


class LTXEncoders(FluxEncoders):
    """The VAE and T5 of an LTXPipeline, used once to fill the cache."""

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images or [B, 3, F, H, W] clips in [-1, 1] -> normalised latents [B, C, F', h, w]."""
        video = pixels.unsqueeze(2) if pixels.ndim == 4 else pixels
        vae = self.pipe.vae
        latents = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode()
        return self.pipe._normalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        embeds, masks = self.pipe._get_t5_prompt_embeds(captions, max_sequence_length=self.max_sequence_length,
                                                        device=self.pipe.text_encoder.device)
        return [{"prompt_embeds": e, "prompt_attention_mask": m} for e, m in zip(embeds, masks)]


class LTXVideoModule(DiffusionModule):
    cache_name = "ltx_video"
    tiny_models = ("ltx_video",)
    lora_only = True
    lora_target_blocks = ("LTXVideoTransformerBlock",)
    block_lists = ("transformer_blocks",)
    keep_in_high_precision = (r"^proj_in", r"^time_embed", r"^caption_projection", r"^proj_out", r"norm")
    pixels_round_to_multiple = 32  # the VAE's spatial factor
    framerate = 25  # LTXPipeline's default frame_rate
    frames_multiple = 8  # the VAE's temporal factor: 8k+1 frames

    def __init__(self,
                 diffusers_path: Annotated[Optional[str], ModelPath(
                     "the LTX-Video Diffusers folder", example="/models/LTX-Video", required=True)] = None,
                 single_file_path: Annotated[Optional[str], ModelPath(
                     "an LTX-Video single file (transformer + VAE)")] = None,
                 first_frame_conditioning_p: float = 0.0, max_sequence_length: int = 128, **common):
        if not 0 <= first_frame_conditioning_p <= 1:
            raise ConfigError(f"model.first_frame_conditioning_p={first_frame_conditioning_p} is not a probability: "
                              f"use a value in [0, 1].")
        super().__init__(**common)
        self.diffusers_path = diffusers_path
        self.single_file_path = single_file_path
        self.first_frame_conditioning_p = first_frame_conditioning_p
        self.max_sequence_length = max_sequence_length

    # --- files
    @property
    def model_dir(self) -> Path:
        return tiny_model_dir("ltx_video", tiny_ltx.build) if self.tiny else Path(self.diffusers_path)

    def base_model(self) -> str:
        return str(self.single_file_path or self.model_dir)

    def _from_single_file(self, model_class: Any, subfolder: str) -> Any:
        try:
            return model_class.from_single_file(self.single_file_path, config=str(self.model_dir), subfolder=subfolder,
                                                dtype=self.compute_dtype, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ConfigError(f"Cannot read the {subfolder} from model.single_file_path={self.single_file_path} with "
                              f"the config of model.diffusers_path={self.model_dir}/{subfolder}: {error}") from error

    def _vae(self) -> AutoencoderKLLTXVideo:
        if self.single_file_path:
            return self._from_single_file(AutoencoderKLLTXVideo, "vae")
        return AutoencoderKLLTXVideo.from_pretrained(self.model_dir / "vae", dtype=self.compute_dtype,
                                                     local_files_only=True)

    def _pipeline(self, transformer: Optional[LTXVideoTransformer3DModel]) -> LTXPipeline:
        return LTXPipeline.from_pretrained(self.model_dir, transformer=transformer, vae=self._vae(),
                                           dtype=self.compute_dtype, local_files_only=True)

    # --- caching
    def cache_fingerprints(self) -> tuple[str, str]:
        text = fingerprint_files(*(self.model_dir / part for part in TEXT_PARTS),
                                 extra=f"ltx_video:{self.max_sequence_length}")
        vae = Path(self.single_file_path) if self.single_file_path else self.model_dir / "vae"
        return fingerprint_files(vae, extra="ltx_video"), text

    def load_cache_encoders(self) -> LTXEncoders:
        return LTXEncoders(self._pipeline(transformer=None), self.max_sequence_length)

    def inference_pipeline(self) -> LTXPipeline:
        return self.place_pipeline(self._pipeline(self.denoiser))

    def render(self, prompt: str, width: int, height: int, steps: int, seed: int, guidance: Optional[float] = None,
               pipeline: Any = None, frames: int = 1, **family_inputs) -> np.ndarray:
        """Video frames [N, F, H, W, 3] in [0, 1]."""
        return self.call_pipeline(pipeline, seed, guidance, prompt=prompt, width=width, height=height,
                                  num_frames=frames, frame_rate=self.framerate, num_inference_steps=steps,
                                  **family_inputs).frames

    # --- training
    def denoiser_skeleton(self) -> LTXVideoTransformer3DModel:
        return skeleton(LTXVideoTransformer3DModel, LTXVideoTransformer3DModel.load_config(self.model_dir / "transformer"))

    def load_denoiser(self) -> LTXVideoTransformer3DModel:
        if self.single_file_path:
            return self._from_single_file(LTXVideoTransformer3DModel, "transformer")
        return LTXVideoTransformer3DModel.from_pretrained(self.model_dir / "transformer", dtype=self.compute_dtype,
                                                          local_files_only=True)

    def image_seq_len(self, latents: torch.Tensor) -> int:
        config = self.denoiser.config
        return latents[0, 0].numel() // (config.patch_size ** 2 * config.patch_size_t)

    def forward_loss(self, batch: dict[str, Any], t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """With first_frame_conditioning_p, the drawn video samples train image-to-video: their first latent frame is
        "noised" with itself (clean at any t), its tokens get timestep 0 and its frame leaves the loss mask."""
        latents = batch["latents"]
        clean_first = self.draw_first_frame_conditioning(latents)
        if not clean_first.any():
            return super().forward_loss(batch, t, noise)
        noise = noise.clone()
        noise[clean_first, :, 0] = latents[clean_first, :, 0].to(noise)
        frames_in_loss = torch.ones(latents.shape[0], latents.shape[2], 1, 1, device=latents.device)
        frames_in_loss[clean_first, 0] = 0
        spatial = batch.get("loss_mask", torch.ones(latents.shape[0], *latents.shape[-2:]))
        loss_mask = frames_in_loss * spatial.to(frames_in_loss).unsqueeze(1)  # [B, F, h, w]
        cond = {**batch.get("cond", {}), "clean_first_frame": clean_first}
        return super().forward_loss({**batch, "cond": cond, "loss_mask": loss_mask}, t, noise)

    def draw_first_frame_conditioning(self, latents: torch.Tensor) -> torch.Tensor:
        """Which samples train image-to-video this step (bool [B]): videos (more than one latent frame) with
        probability first_frame_conditioning_p, while training only (eval losses stay text-to-video)."""
        p = self.first_frame_conditioning_p
        if not self.training or p == 0 or latents.shape[2] == 1:
            return torch.zeros(latents.shape[0], dtype=torch.bool)
        # Numbers only (a str's hash changes between processes): a resumed run draws as the uninterrupted one.
        # Three of them: a stream apart from step_generator's (it hashes four); a step's micro-batches draw alike.
        generator = torch.Generator().manual_seed(hash((self.seed, self.global_step, self.global_rank)) % 2**63)
        return torch.rand(latents.shape[0], generator=generator) < p

    def predict(self, noisy_latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                cond: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """The transformer on LTXPipeline's packed tokens; per-token timesteps (0 on a clean first frame) as
        LTXConditionPipeline passes them."""
        config = self.denoiser.config
        _, _, frames, height, width = noisy_latents.shape
        patches = dict(patch_size=config.patch_size, patch_size_t=config.patch_size_t)
        timestep = t * 1000
        if cond is not None and "clean_first_frame" in cond:
            first_frame = torch.zeros_like(noisy_latents[:, :1])
            first_frame[cond["clean_first_frame"].to(first_frame.device), :, 0] = 1
            timestep = timestep[:, None] * (1 - LTXPipeline._pack_latents(first_frame, **patches)[..., 0])
        temporal, spatial = self.vae_compression
        prediction = self.denoiser(
            hidden_states=LTXPipeline._pack_latents(noisy_latents, **patches), timestep=timestep,
            encoder_hidden_states=text["prompt_embeds"], encoder_attention_mask=text["prompt_attention_mask"],
            num_frames=frames, height=height, width=width,
            rope_interpolation_scale=(temporal / self.framerate, spatial, spatial), return_dict=False)[0]
        return LTXPipeline._unpack_latents(prediction, frames // config.patch_size_t, height // config.patch_size,
                                           width // config.patch_size, **patches)

    @cached_property
    def vae_compression(self) -> tuple[int, int]:
        """(temporal, spatial) compression of the VAE, from its config (a weightless VAE on the meta device)."""
        vae = skeleton(AutoencoderKLLTXVideo, AutoencoderKLLTXVideo.load_config(self.model_dir / "vae"))
        return vae.temporal_compression_ratio, vae.spatial_compression_ratio

    # --- export
    def export_lora(self, lora_state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """ComfyUI format: what LTXPipeline.load_lora_weights converts."""
        save_safetensors(lora_to_comfyui(lora_state_dict), out_dir / LORA_FILE, self.lora_metadata())

    def export_full(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        raise NotImplementedError("LTX-Video trains LoRAs only")
