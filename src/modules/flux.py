"""Flux.1 (dev, schnell, de-distilled, Flex): diffusers' FluxTransformer2DModel on packed 2x2 latent patches,
conditioned on T5 token embeddings and a pooled CLIP vector. LoRAs export in diffusers format, full fine-tunes
as a BFL single file plus a diffusers transformer folder."""
from abc import abstractmethod
from pathlib import Path
from typing import Annotated, Optional

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from difftrain.config.keys import ModelPath
from difftrain.datamodules.cache import fingerprint_files
from difftrain.formats.diffusers_files import save_diffusers_lora, save_model_folder
from difftrain.formats.flux import load_bfl_transformer, save_bfl_transformer
from difftrain.tiny import flux as tiny_flux
from difftrain.tiny import tiny_model_dir

from .base import DiffusionModule, skeleton


class FluxEncoders:
    """VAE + CLIP + T5 from the diffusers folder, used once to fill the cache."""

    def __init__(self, pipe: FluxPipeline, max_sequence_length: int):
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length

    def to(self, device: torch.device) -> "FluxEncoders":
        self.pipe.to(device)
        return self

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        prompt_embeds, pooled, _ = self.pipe.encode_prompt(
            captions, prompt_2=None, device=self.pipe.text_encoder.device, max_sequence_length=self.max_sequence_length)
        return [{"prompt_embeds": e, "pooled_prompt_embeds": p} for e, p in zip(prompt_embeds, pooled)]


class GuidanceBypass(torch.nn.Module):
    """A guidance-distilled time/text embedding run without its guidance branch (FLEX.1-alpha training).
    It holds the original's submodules under their own names, so weights and exports keep every key."""

    def __init__(self, embedding: torch.nn.Module):
        super().__init__()
        self.time_proj = embedding.time_proj
        self.timestep_embedder = embedding.timestep_embedder
        self.guidance_embedder = embedding.guidance_embedder
        self.text_embedder = embedding.text_embedder

    def forward(self, timestep: torch.Tensor, pooled_projection: torch.Tensor) -> torch.Tensor:
        timesteps_emb = self.timestep_embedder(self.time_proj(timestep).to(pooled_projection.dtype))
        return timesteps_emb + self.text_embedder(pooled_projection)


class FluxBase(DiffusionModule):
    """What Flux, Flux Kontext and Chroma share: a FLUX.1 Diffusers folder (VAE, T5; `diffusers_path`), an optional
    single-file transformer (`transformer_path`), and a transformer on 2x2-packed latent tokens followed by any
    context tokens (`context_tokens`). A subclass supplies the transformer call (`denoise_tokens`)."""
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    pixels_round_to_multiple = 16  # VAE factor 8 x 2x2 patches
    tiny_models = ("flux",)

    def __init__(self,
                 diffusers_path: Annotated[Optional[str], ModelPath(
                     "the model's Diffusers folder", example="/models/FLUX.1-dev", required=True)] = None,
                 transformer_path: Annotated[Optional[str], ModelPath("a single-file transformer checkpoint")] = None,
                 max_sequence_length: int = 512, **common):
        super().__init__(**common)
        self.diffusers_path = diffusers_path
        self.transformer_path = transformer_path
        self.max_sequence_length = max_sequence_length

    @property
    def model_dir(self) -> Path:
        return tiny_model_dir("flux", tiny_flux.build) if self.tiny else Path(self.diffusers_path)

    def base_model(self) -> str:
        return str(self.transformer_path or self.model_dir)

    def predict(self, noisy_latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                cond: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
        b, c, h, w = noisy_latents.shape
        tokens, ids = pack_with_ids(noisy_latents)
        context, context_ids = self.context_tokens(cond or {}, tokens)
        out = self.denoise_tokens(torch.cat([tokens, context], dim=1), torch.cat([ids, context_ids]), t, text)
        return unpack_latents(out[:, :tokens.shape[1]], c, h, w)  # the loss covers the noisy image's tokens only

    def context_tokens(self, cond: dict[str, torch.Tensor], tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean tokens the denoiser sees after the noisy image's, with their position ids (Kontext: the control
        images'); none for plain text-to-image."""
        return tokens[:, :0], torch.zeros(0, 3, device=tokens.device, dtype=tokens.dtype)

    @abstractmethod
    def denoise_tokens(self, tokens: torch.Tensor, ids: torch.Tensor, t: torch.Tensor,
                       text: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's output for the image's tokens (and context tokens) with position ids `ids`."""


class FluxModule(FluxBase):
    cache_name = "flux"
    lora_target_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    keep_in_high_precision = (r"^time_text_embed", r"^context_embedder$", r"^x_embedder$", r"^proj_out$",
                              r"^norm_out")

    def __init__(self, guidance: float = 1.0, bypass_guidance_embedding: bool = False, **common):
        super().__init__(**common)
        self.guidance = guidance
        self.bypass_guidance_embedding = bypass_guidance_embedding

    # --- caching
    def cache_fingerprints(self) -> tuple[str, str]:
        root = self.model_dir
        text = fingerprint_files(root / "text_encoder", root / "text_encoder_2", root / "tokenizer",
                                 root / "tokenizer_2", extra=f"flux:{self.max_sequence_length}")
        return fingerprint_files(root / "vae", extra="flux"), text

    def load_cache_encoders(self) -> FluxEncoders:
        pipe = FluxPipeline.from_pretrained(self.model_dir, transformer=None, dtype=self.compute_dtype,
                                            local_files_only=True)
        return FluxEncoders(pipe, self.max_sequence_length)

    # --- training
    def denoiser_skeleton(self) -> FluxTransformer2DModel:
        return skeleton(FluxTransformer2DModel, FluxTransformer2DModel.load_config(self.model_dir,
                                                                                   subfolder="transformer"))

    def load_denoiser(self) -> FluxTransformer2DModel:
        if self.transformer_path:
            model = load_bfl_transformer(self.transformer_path, self.model_dir, self.compute_dtype)
        else:
            model = FluxTransformer2DModel.from_pretrained(self.model_dir, subfolder="transformer",
                                                           dtype=self.compute_dtype, local_files_only=True)
        if self.bypass_guidance_embedding and model.config.guidance_embeds:
            model.time_text_embed = GuidanceBypass(model.time_text_embed)
        return model

    @property
    def uses_guidance(self) -> bool:
        return self.denoiser.config.guidance_embeds and not self.bypass_guidance_embedding

    def denoise_tokens(self, tokens: torch.Tensor, ids: torch.Tensor, t: torch.Tensor,
                       text: dict[str, torch.Tensor]) -> torch.Tensor:
        prompt_embeds = text["prompt_embeds"]
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=tokens.device, dtype=tokens.dtype)
        b = tokens.shape[0]
        guidance = torch.full((b,), self.guidance, device=tokens.device, dtype=tokens.dtype) if self.uses_guidance else None
        return self.denoiser(hidden_states=tokens, timestep=t, guidance=guidance,
                             pooled_projections=text["pooled_prompt_embeds"], encoder_hidden_states=prompt_embeds,
                             txt_ids=txt_ids, img_ids=ids, return_dict=False)[0]

    def inference_pipeline(self) -> FluxPipeline:
        return self.place_pipeline(FluxPipeline.from_pretrained(
            self.model_dir, transformer=self.denoiser, dtype=self.compute_dtype, local_files_only=True))

    # --- export
    def export_lora(self, lora_state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        save_diffusers_lora(FluxPipeline, lora_state_dict, out_dir, self.lora_metadata())

    def export_full(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        save_bfl_transformer(state_dict, out_dir / "flux1-transformer-bfl.safetensors")
        save_model_folder(FluxTransformer2DModel, self.denoiser.config, state_dict, out_dir / "transformer")


def pack_with_ids(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, h, w] latents -> 2x2-patch tokens [B, h*w/4, 4C] and their position ids [h*w/4, 3], as
    FluxPipeline packs them."""
    b, c, h, w = latents.shape
    tokens = FluxPipeline._pack_latents(latents, b, c, h, w)
    return tokens, FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, tokens.device, tokens.dtype)


def unpack_latents(packed: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """Inverse of FluxPipeline._pack_latents for latents of a known size."""
    b = packed.shape[0]
    x = packed.view(b, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, height, width)
