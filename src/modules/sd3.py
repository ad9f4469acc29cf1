"""Stable Diffusion 3 and 3.5 (Medium, Large): diffusers' SD3Transformer2DModel (MMDiT; 3.5's dual attention layers
and qk RMSNorm come with its config) on 16-channel latents, flow matching, conditioned on the joint CLIP-L + CLIP-G +
T5 prompt embeddings and the pooled CLIP projections, all computed by StableDiffusion3Pipeline's own `encode_prompt`
and cached. Reads the full Diffusers folder (`diffusers_path`); `transformer_path` may replace its transformer with a
diffusers transformer folder (a full fine-tune's export). LoRAs export in diffusers format, full fine-tunes as a
diffusers `transformer/` folder."""
from pathlib import Path
from typing import Annotated, Optional

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from difftrain.config.keys import ModelPath
from difftrain.datamodules.cache import fingerprint_files
from difftrain.formats.diffusers_files import save_diffusers_lora, save_model_folder
from difftrain.tiny import sd3 as tiny_sd3
from difftrain.tiny import tiny_model_dir

from .base import DiffusionModule, skeleton
from .flux import FluxEncoders

TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


class SD3Encoders(FluxEncoders):
    """The folder's VAE (latents shifted and scaled by its config, as Flux's) and its three text encoders."""

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(
            captions, prompt_2=None, prompt_3=None, device=self.pipe.text_encoder.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return [{"prompt_embeds": e, "pooled_prompt_embeds": p} for e, p in zip(prompt_embeds, pooled)]


class SD3Module(DiffusionModule):
    cache_name = "sd3"
    tiny_models = ("sd3",)
    lora_target_blocks = ("JointTransformerBlock",)
    block_lists = ("transformer_blocks",)
    keep_in_high_precision = (r"^pos_embed", r"^time_text_embed", r"^context_embedder$", r"^norm_out",
                              r"^proj_out$")
    pixels_round_to_multiple = 16  # VAE factor 8 x 2x2 patches

    def __init__(self,
                 diffusers_path: Annotated[Optional[str], ModelPath(
                     "the model's Diffusers folder", example="/models/stable-diffusion-3.5-large",
                     required=True)] = None,
                 transformer_path: Annotated[Optional[str], ModelPath(
                     "a diffusers transformer folder (config.json + weights) replacing the Diffusers folder's")] = None,
                 max_sequence_length: int = 256, **common):
        super().__init__(**common)
        self.diffusers_path = diffusers_path
        self.transformer_path = transformer_path
        self.max_sequence_length = max_sequence_length

    @property
    def model_dir(self) -> Path:
        return tiny_model_dir("sd3", tiny_sd3.build) if self.tiny else Path(self.diffusers_path)

    @property
    def transformer_dir(self) -> Path:
        return Path(self.transformer_path) if self.transformer_path else self.model_dir / "transformer"

    def base_model(self) -> str:
        return str(self.transformer_path or self.model_dir)

    def _pipeline(self, transformer: Optional[SD3Transformer2DModel]) -> StableDiffusion3Pipeline:
        return StableDiffusion3Pipeline.from_pretrained(self.model_dir, transformer=transformer,
                                                        dtype=self.compute_dtype, local_files_only=True)

    # --- caching
    def cache_fingerprints(self) -> tuple[str, str]:
        root = self.model_dir
        text = fingerprint_files(*(root / part for part in TEXT_PARTS), extra=f"sd3:{self.max_sequence_length}")
        return fingerprint_files(root / "vae", extra="sd3"), text

    def load_cache_encoders(self) -> SD3Encoders:
        return SD3Encoders(self._pipeline(transformer=None), self.max_sequence_length)

    # --- training
    def denoiser_skeleton(self) -> SD3Transformer2DModel:
        return skeleton(SD3Transformer2DModel, SD3Transformer2DModel.load_config(self.transformer_dir))

    def load_denoiser(self) -> SD3Transformer2DModel:
        return SD3Transformer2DModel.from_pretrained(self.transformer_dir, dtype=self.compute_dtype,
                                                     local_files_only=True)

    def discarded_modules(self, denoiser: SD3Transformer2DModel) -> list[str]:
        # The last block outputs the image tokens only: its text queries (and their qk-norm) feed nothing.
        attention = denoiser.transformer_blocks[-1].attn
        last = f"transformer_blocks.{len(denoiser.transformer_blocks) - 1}.attn"
        return [f"{last}.{name}" for name in ("add_q_proj", "norm_added_q") if getattr(attention, name) is not None]

    def predict(self, noisy_latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.denoiser(hidden_states=noisy_latents, timestep=t * 1000, encoder_hidden_states=text["prompt_embeds"],
                             pooled_projections=text["pooled_prompt_embeds"], return_dict=False)[0]

    def inference_pipeline(self) -> StableDiffusion3Pipeline:
        return self.place_pipeline(self._pipeline(self.denoiser))

    # --- export
    def export_lora(self, lora_state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        save_diffusers_lora(StableDiffusion3Pipeline, lora_state_dict, out_dir, self.lora_metadata())

    def export_full(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        save_model_folder(SD3Transformer2DModel, self.denoiser.config, state_dict, out_dir / "transformer")
