"""Cosmos 1.0 text2world (7B, 14B): diffusers' CosmosTransformer3DModel trained with EDM (noise_schedules.EDM: the
preconditioning and Karras sigmas of CosmosTextToWorldPipeline's EDMEulerScheduler) on CV8x8x8 latents normalised
as the pipeline does. The model knows one size: 1280x704 images and 121-frame videos (`allowed_sizes`,
`allowed_frames`; the tiny model: TINY_SIZES and TINY_FRAMES); the datamodule refuses others.

Files (ComfyUI's): `transformer_path` (cosmos-1.0-diffusion-7b-text2world.pt, read with weights_only=True, or a
safetensors conversion), `vae_path` (cosmos_cv8x8x8_1.0.safetensors), `text_encoder_path` (oldt5_xxl_fp16.safetensors,
the OLD T5 v1.0) and `tokenizer_path` (a T5 tokenizer: by default google-t5/t5-11b's, downloaded when online;
offline a folder). LoRAs export in ComfyUI format (`diffusion_model.blocks.blockN.blocks.0.block.attn.to_q.0.lora_A.weight`)."""
from typing import Annotated, Optional

import torch
from diffusers import CosmosTextToWorldPipeline, CosmosTransformer3DModel, EDMEulerScheduler

from difftrain.config.keys import ModelPath
from difftrain.datamodules.cache import fingerprint_files
from difftrain.formats.cosmos import COSMOS1, load_vae, rope_scale
from difftrain.tiny import cosmos as tiny

from .cosmos_common import CosmosBase
from .noise_schedules import EDM
from .wan import WanEncoders, WanModule

RELEASED_SIZES = ((1280, 704),)
RELEASED_FRAMES = (121,)
# the tiny model's stand-ins: the tests' 32x32 / 9 frames and the bundled videos' buckets (dataset=videos)
TINY_SIZES = ((32, 32), (64, 64), (80, 48))
TINY_FRAMES = (9, 17, 33)


class CosmosEncoders(WanEncoders):
    """The tokenizer's latents normalised per latent frame as CosmosTextToWorldPipeline un-normalises them; T5 as
    its _get_t5_prompt_embeds (the same call as Wan's)."""

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        video = pixels.unsqueeze(2) if pixels.ndim == 4 else pixels
        vae, sigma_data = self.pipe.vae, self.pipe.scheduler.config.sigma_data
        latents = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode()
        if vae.config.latents_mean is None:
            return latents * sigma_data
        mean, std = (torch.tensor(values).view(1, vae.config.latent_channels, -1, 1, 1)[:, :, :latents.shape[2]]
                     .to(latents) for values in (vae.config.latents_mean, vae.config.latents_std))
        return (latents - mean) / std * sigma_data


class CosmosModule(CosmosBase):
    cache_name = "cosmos"
    tiny_models = ("cosmos",)
    keymap = COSMOS1
    rope_scale = staticmethod(rope_scale)
    what = "a Cosmos 1.0 transformer"
    full_file = "cosmos.safetensors"
    tiny_files = tiny.FILES
    framerate = 24
    frames_multiple = 8
    lora_only = True  # as the reference trainer

    def __init__(self,
                 transformer_path: Annotated[Optional[str], ModelPath(
                     "the Cosmos 1.0 text2world transformer (.pt or a safetensors conversion)",
                     example="/models/cosmos-1.0-diffusion-7b-text2world.pt", required=True)] = None,
                 vae_path: Annotated[Optional[str], ModelPath(
                     "ComfyUI's Cosmos video tokenizer", example="/models/cosmos_cv8x8x8_1.0.safetensors",
                     required=True)] = None,
                 text_encoder_path: Annotated[Optional[str], ModelPath(
                     "ComfyUI's OLD T5 v1.0 XXL", example="/models/oldt5_xxl_fp16.safetensors", required=True)] = None,
                 # the reference's T5 tokenizer (t5-11b's), downloaded when online
                 tokenizer_path: Annotated[str, ModelPath(
                     "a T5 tokenizer (a folder, or a Hugging Face repo id)", example="/models/t5-11b",
                     repo_id=True)] = "google-t5/t5-11b",
                 max_sequence_length: int = 512, **common):
        super().__init__(**common)
        self.paths = {"transformer_path": transformer_path, "vae_path": vae_path, "t5": text_encoder_path,
                      "tokenizer_path": tokenizer_path}
        self.max_sequence_length = max_sequence_length
        self.noise_schedule = EDM()
        self.allowed_sizes = TINY_SIZES if self.tiny else RELEASED_SIZES
        self.allowed_frames = TINY_FRAMES if self.tiny else RELEASED_FRAMES

    # --- caching
    def cache_fingerprints(self) -> tuple[str, str]:
        return fingerprint_files(self.file("vae_path"), extra="cosmos1"), self.text_fingerprint()

    def load_cache_encoders(self) -> CosmosEncoders:
        return CosmosEncoders(self._pipeline(transformer=None), None, self.max_sequence_length)

    def _pipeline(self, transformer: Optional[CosmosTransformer3DModel]) -> CosmosTextToWorldPipeline:
        scheduler = EDMEulerScheduler.from_config(self.noise_schedule.scheduler.config, final_sigmas_type="sigma_min")
        return CosmosTextToWorldPipeline(transformer=transformer, vae=load_vae(self.file("vae_path"), self.compute_dtype),
                                         scheduler=scheduler, **self.text_parts())

    def inference_pipeline(self) -> CosmosTextToWorldPipeline:
        return self.place_pipeline(self._pipeline(self.denoiser))

    render = WanModule.render  # video frames [N, F, H, W, 3], as Wan's

    # --- training
    def predict(self, noisy_latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.run_denoiser(noisy_latents, t, text, fps=self.framerate)
