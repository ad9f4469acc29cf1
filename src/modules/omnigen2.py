"""OmniGen2 (text-to-image LoRA): our OmniGen2Transformer2DModel (src/models/omnigen2) on the Flux VAE's 16-channel
latents, conditioned on the last hidden states of its Qwen2.5-VL MLLM for the caption in the upstream pipeline's
chat template (cached unpadded, padded per batch with its mask). OmniGen2's time runs from noise (0) to image (1)
and it predicts image minus noise, so `predict` hands it 1 - t and negates its output into the shared
flow-matching target; logit-normal times with the resolution-dependent shift, as upstream trains.

Files: `diffusers_path` is the original OmniGen2 checkpoint folder (transformer/, vae/, mllm/, processor/,
scheduler/). Module names equal its checkpoint keys, so LoRAs export in ComfyUI format as
`diffusion_model.<checkpoint module>.lora_A/B.weight`."""
import json
from pathlib import Path
from typing import Annotated, Optional

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from difftrain.config.keys import ModelPath
from difftrain.datamodules.cache import fingerprint_files
from difftrain.formats.qwen_image import lora_from_comfyui, lora_to_comfyui
from difftrain.models.omnigen2 import OmniGen2Transformer2DModel
from difftrain.models.omnigen2.pipeline import OmniGen2Pipeline
from difftrain.tiny import omnigen2 as tiny_omnigen2
from difftrain.tiny import tiny_model_dir
from difftrain.utils.atomic import save_safetensors

from .base import DiffusionModule, skeleton
from .flux import FluxEncoders
from .lumina2 import Lumina2Module
from .qwen_image import unpadded

LORA_FILE = "adapter_model.safetensors"
REFERENCE_IMAGE_MODULES = ("ref_image_patch_embedder", "ref_image_refiner")  # edit inputs: unused by t2i


class OmniGen2Encoders(FluxEncoders):
    """The Flux VAE's scaled latents, and the MLLM's features through the pipeline's own prompt encoding."""

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        return unpadded(*self.pipe.encode_prompt(captions, self.max_sequence_length))


class OmniGen2Module(DiffusionModule):
    cache_name = "omnigen2"
    tiny_models = ("omnigen2",)
    lora_only = True
    lora_target_blocks = ("Lumina2TransformerBlock",)
    block_lists = ("context_refiner", "noise_refiner", "layers")  # the order forward runs them
    pixels_round_to_multiple = 16  # VAE factor 8 x 2x2 patches

    def __init__(self,
                 diffusers_path: Annotated[Optional[str], ModelPath(
                     "the original OmniGen2 checkpoint folder (transformer, vae, mllm, processor, scheduler)",
                     example="/models/OmniGen2", required=True)] = None,
                 max_sequence_length: int = 256, **common):
        super().__init__(**common)
        self.diffusers_path = diffusers_path
        self.max_sequence_length = max_sequence_length

    # --- files
    @property
    def model_dir(self) -> Path:
        return tiny_model_dir("omnigen2", tiny_omnigen2.build) if self.tiny else Path(self.diffusers_path)

    def pipeline(self, transformer: Optional[OmniGen2Transformer2DModel]) -> OmniGen2Pipeline:
        root, dtype = self.model_dir, self.compute_dtype
        scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        return OmniGen2Pipeline(
            transformer=transformer,
            vae=AutoencoderKL.from_pretrained(root, subfolder="vae", dtype=dtype, local_files_only=True),
            mllm=Qwen2_5_VLForConditionalGeneration.from_pretrained(root, subfolder="mllm", dtype=dtype,
                                                                    local_files_only=True).eval(),
            tokenizer=AutoTokenizer.from_pretrained(root / "processor", local_files_only=True),
            dynamic_time_shift=scheduler.get("dynamic_time_shift", True))

    def base_model(self) -> str:
        return str(self.model_dir)

    # --- caching
    def cache_fingerprints(self) -> tuple[str, str]:
        root = self.model_dir
        text = fingerprint_files(root / "mllm", root / "processor", extra=f"omnigen2:{self.max_sequence_length}")
        return fingerprint_files(root / "vae", extra="flux"), text

    def load_cache_encoders(self) -> OmniGen2Encoders:
        return OmniGen2Encoders(self.pipeline(None), self.max_sequence_length)

    collate_text = staticmethod(Lumina2Module.collate_text)

    # --- training
    def load_denoiser(self) -> OmniGen2Transformer2DModel:
        return OmniGen2Transformer2DModel.from_pretrained(self.model_dir, subfolder="transformer",
                                                          dtype=self.compute_dtype, local_files_only=True)

    def denoiser_skeleton(self) -> OmniGen2Transformer2DModel:
        return skeleton(OmniGen2Transformer2DModel,
                        OmniGen2Transformer2DModel.load_config(self.model_dir, subfolder="transformer"))

    def discarded_modules(self, denoiser: torch.nn.Module) -> list[str]:
        return list(REFERENCE_IMAGE_MODULES)

    def predict(self, noisy_latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        image_minus_noise = self.denoiser(noisy_latents, 1 - t, text["prompt_embeds"], text["prompt_embeds_mask"])
        return -image_minus_noise

    def inference_pipeline(self) -> OmniGen2Pipeline:
        return self.place_pipeline(self.pipeline(self.denoiser))

    # --- export
    def export_lora(self, lora_state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        save_safetensors(lora_to_comfyui(lora_state_dict), out_dir / LORA_FILE, self.lora_metadata())

    def read_exported_lora(self, path: Path) -> dict[str, torch.Tensor]:
        return lora_from_comfyui(load_file(path), str(path))

    def export_full(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        raise NotImplementedError("OmniGen2 trains LoRAs only")
