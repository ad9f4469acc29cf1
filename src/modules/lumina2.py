"""Lumina Image 2.0: diffusers' Lumina2Transformer2DModel (NextDiT: context and noise refiners, then joint blocks)
on the Flux VAE's 16-channel latents, conditioned on Gemma 2's second-to-last hidden states.

Captions are encoded as Lumina2Pipeline encodes prompts: `<system_prompt> <Prompt Start> <caption>` (the default
system prompt is the caption prefix of the reference trainer's Lumina example), cached unpadded and padded per batch
with their mask. Lumina's time runs from noise (0) to image (1) and it predicts image minus noise, so `predict`
hands it 1 - t and negates its output into the shared flow-matching target.

Files: ComfyUI's three single files, `transformer_path` (`lumina_2_model_bf16.safetensors`), `llm_path`
(`gemma_2_2b_fp16.safetensors`, with its tokenizer) and `vae_path` (`flux_vae.safetensors`), suffice: each part's
config is read off its file (formats.lumina2). Or `diffusers_path`, a Lumina-Image-2.0 Diffusers folder (configs,
tokenizer, scheduler and the weights of the parts no single file replaces).
LoRAs export in ComfyUI format (`diffusion_model.<native names>`, q/k/v fused), full fine-tunes as the native
single file."""
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
from safetensors.torch import load_file
from transformers import AutoTokenizer, Gemma2Config, Gemma2Model, PreTrainedTokenizerBase

from difftrain.config.errors import ConfigError
from difftrain.config.keys import ModelPath
from difftrain.datamodules.cache import fingerprint_files
from difftrain.formats import lumina2 as formats
from difftrain.tiny import lumina2 as tiny_lumina2
from difftrain.tiny import tiny_model_dir
from difftrain.utils.atomic import save_safetensors

from .base import pad_sequences, skeleton
from .flux import FluxEncoders
from .parts import Part, SingleFileModule
from .qwen_image import unpadded

LORA_FILE = "adapter_model.safetensors"
FULL_FILE = "lumina_2_model.safetensors"
SINGLE_FILE_KEYS = ("transformer_path", "llm_path", "vae_path")
PARTS = {"transformer": Part(Lumina2Transformer2DModel, Lumina2Transformer2DModel.load_config,
                             formats.transformer_config, formats.load_transformer),
         "text_encoder": Part(Gemma2Model, Gemma2Config.from_pretrained, formats.gemma_config,
                              formats.load_text_encoder),
         "vae": Part(AutoencoderKL, AutoencoderKL.load_config, formats.vae_config, formats.load_vae)}


class Lumina2Encoders(FluxEncoders):
    """The Flux VAE's scaled latents, and Gemma embeddings through Lumina2Pipeline's own prompt encoding."""

    def __init__(self, pipe: Lumina2Pipeline, max_sequence_length: int, system_prompt: str):
        super().__init__(pipe, max_sequence_length)
        self.system_prompt = system_prompt

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            captions, do_classifier_free_guidance=False, device=self.pipe.text_encoder.device,
            system_prompt=self.system_prompt, max_sequence_length=self.max_sequence_length)
        return unpadded(embeds, mask)


class Lumina2Module(SingleFileModule):
    cache_name = "lumina2"
    tiny_models = ("lumina2",)
    lora_target_blocks = ("Lumina2TransformerBlock",)
    block_lists = ("context_refiner", "noise_refiner", "layers")  # the order forward runs them
    pixels_round_to_multiple = 16  # VAE factor 8 x 2x2 patches
    PARTS = PARTS

    def __init__(self,
                 diffusers_path: Annotated[Optional[str], ModelPath(
                     "the Lumina-Image-2.0 Diffusers folder (configs, tokenizer, scheduler; weights unless single "
                     "files replace them); not needed when the three single files are set",
                     example="/models/Lumina-Image-2.0")] = None,
                 transformer_path: Annotated[Optional[str], ModelPath(
                     "ComfyUI's single-file transformer", example="/models/lumina_2_model_bf16.safetensors")] = None,
                 llm_path: Annotated[Optional[str], ModelPath(
                     "ComfyUI's single-file Gemma 2", example="/models/gemma_2_2b_fp16.safetensors")] = None,
                 vae_path: Annotated[Optional[str], ModelPath(
                     "a single-file Flux VAE", example="/models/flux_vae.safetensors")] = None,
                 # the caption prefix of the reference trainer's Lumina example (before its " <Prompt Start> ")
                 system_prompt: str = "You are an assistant designed to generate high-quality images based on user "
                                      "prompts.",
                 max_sequence_length: int = 256,
                 lumina_shift: bool = True, **common):
        # lumina_shift is the reference trainer's name for the resolution-dependent shift flux_shift computes; a
        # constant shift takes precedence over it, as there.
        common["flux_shift"] = common.get("flux_shift", False) or (lumina_shift and common.get("shift") is None)
        super().__init__(**common)
        self.diffusers_path = diffusers_path
        self.part_files = {"transformer": transformer_path, "text_encoder": llm_path, "vae": vae_path}
        self.check_sources()
        self.system_prompt = system_prompt
        self.max_sequence_length = max_sequence_length

    # --- files
    def check_sources(self) -> None:
        """A Diffusers folder, or the three single files (a tiny model is a folder)."""
        missing = [f"model.{key}" for key, path in zip(SINGLE_FILE_KEYS, self.part_files.values()) if not path]
        if missing and not (self.tiny or self.diffusers_path):
            raise ConfigError(f"model.diffusers_path is not set, nor {' and '.join(missing)}: set the three ComfyUI "
                              f"files (model.transformer_path, model.llm_path, model.vae_path) or a Lumina-Image-2.0 "
                              f"Diffusers folder (model.diffusers_path=/models/Lumina-Image-2.0), or use "
                              f"model.tiny=true for a tiny test model.")

    @property
    def model_dir(self) -> Optional[Path]:
        """The Diffusers folder (the tiny one in tests), or None: the single files alone."""
        if self.tiny:
            return tiny_model_dir("lumina2", tiny_lumina2.build)
        return Path(self.diffusers_path) if self.diffusers_path else None

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.model_dir is None:
            return formats.load_tokenizer(self.part_files["text_encoder"])
        return AutoTokenizer.from_pretrained(self.model_dir, subfolder="tokenizer", local_files_only=True)

    def load_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        if self.model_dir is None:
            return FlowMatchEulerDiscreteScheduler()  # Lumina-Image-2.0's scheduler config: the defaults
        return FlowMatchEulerDiscreteScheduler.from_pretrained(self.model_dir, subfolder="scheduler")

    def pipeline(self, transformer: Optional[Lumina2Transformer2DModel]) -> Lumina2Pipeline:
        return Lumina2Pipeline(transformer=transformer, vae=self.load_part("vae"),
                               text_encoder=self.load_part("text_encoder").eval(), tokenizer=self.load_tokenizer(),
                               scheduler=self.load_scheduler())

    def base_model(self) -> str:
        return str(self.part_files["transformer"] or self.model_dir)

    # --- caching
    def cache_fingerprints(self) -> tuple[str, str]:
        tokenizer = [self.model_dir / "tokenizer"] if self.model_dir else []  # else in the text encoder's file
        text = fingerprint_files(self.weights_source("text_encoder"), *tokenizer,
                                 extra=f"lumina2:{self.max_sequence_length}:{self.system_prompt}")
        return fingerprint_files(self.weights_source("vae"), extra="flux"), text

    def load_cache_encoders(self) -> Lumina2Encoders:
        return Lumina2Encoders(self.pipeline(None), self.max_sequence_length, self.system_prompt)

    @staticmethod
    def collate_text(texts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Embeddings zero-padded to the batch's longest, always with their mask (the transformer requires it)."""
        embeds, mask = pad_sequences([text["prompt_embeds"] for text in texts])
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    # --- training
    def load_denoiser(self) -> Lumina2Transformer2DModel:
        return self.load_part("transformer")

    def denoiser_skeleton(self) -> Lumina2Transformer2DModel:
        return skeleton(Lumina2Transformer2DModel, self.part_config("transformer"))

    def predict(self, noisy_latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        image_minus_noise = self.denoiser(hidden_states=noisy_latents, timestep=1 - t,
                                          encoder_hidden_states=text["prompt_embeds"],
                                          encoder_attention_mask=text["prompt_embeds_mask"], return_dict=False)[0]
        return -image_minus_noise

    def inference_pipeline(self) -> Lumina2Pipeline:
        return self.place_pipeline(self.pipeline(self.denoiser))

    def render(self, prompt: str, width: int, height: int, steps: int, seed: int, **family_inputs: Any) -> np.ndarray:
        return super().render(prompt, width, height, steps, seed, system_prompt=self.system_prompt, **family_inputs)

    # --- export
    def export_lora(self, lora_state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        save_safetensors(formats.lora_to_comfyui(lora_state_dict, self.denoiser.config), out_dir / LORA_FILE,
                         self.lora_metadata())

    def read_exported_lora(self, path: Path) -> dict[str, torch.Tensor]:
        return formats.lora_from_comfyui(load_file(path), self.denoiser.config, str(path))

    def export_full(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        formats.save_transformer(state_dict, self.denoiser.config, out_dir / FULL_FILE)
