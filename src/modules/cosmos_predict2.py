"""Cosmos-Predict2 text-to-image (2B, 14B): diffusers' CosmosTransformer3DModel as Cosmos2TextToImagePipeline runs
it, on Wan 2.1 VAE latents [B, 16, 1, h, w]. Its EDM-style sigma handling (x_sigma = x + sigma eps, input
x_sigma / (1 + sigma), timestep t = sigma / (1 + sigma), denoised = (1 - t) x_sigma - t v) is flow matching in t:
the denoiser sees (1 - t) x + t eps and t, and predicts eps - x.

Files: `transformer_path` (the original model.pt, or a safetensors conversion), `vae_path` (ComfyUI's Wan 2.1 VAE),
`t5_path` (ComfyUI's oldt5_xxl_fp16.safetensors: the OLD T5 v1.0) and `tokenizer_path` (a T5 tokenizer: by default
google-t5/t5-11b's, downloaded when online; offline a folder).
fp8 storage: float8_e5m2 (e4m3 trains badly on this model)."""
import logging
from typing import Annotated, Optional

import torch
from diffusers import Cosmos2TextToImagePipeline, CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler

from difftrain.config.keys import ModelPath
from difftrain.datamodules.cache import fingerprint_files
from difftrain.formats.cosmos_predict2 import PREDICT2, rope_scale
from difftrain.formats.wan import load_vae
from difftrain.tiny import cosmos_predict2 as tiny

from .cosmos_common import CosmosBase
from .wan import WanEncoders

log = logging.getLogger(__name__)
E4M3 = ("float8", "float8_e4m3fn")


class CosmosPredict2Module(CosmosBase):
    cache_name = "cosmos_predict2"
    tiny_models = ("cosmos_predict2",)
    keymap = PREDICT2
    rope_scale = staticmethod(rope_scale)
    what = "a Cosmos-Predict2 transformer"
    full_file = "cosmos_predict2.safetensors"
    tiny_files = tiny.FILES

    def __init__(self,
                 transformer_path: Annotated[Optional[str], ModelPath(
                     "the original Cosmos-Predict2 model.pt (or a safetensors conversion)",
                     example="/models/Cosmos-Predict2-2B-Text2Image/model.pt", required=True)] = None,
                 vae_path: Annotated[Optional[str], ModelPath(
                     "ComfyUI's Wan 2.1 VAE", example="/models/wan_2.1_vae.safetensors", required=True)] = None,
                 t5_path: Annotated[Optional[str], ModelPath(
                     "ComfyUI's OLD T5 v1.0 XXL", example="/models/oldt5_xxl_fp16.safetensors", required=True)] = None,
                 # the reference's T5 tokenizer (t5-11b's), downloaded when online
                 tokenizer_path: Annotated[str, ModelPath(
                     "a T5 tokenizer (a folder, or a Hugging Face repo id)", example="/models/t5-11b",
                     repo_id=True)] = "google-t5/t5-11b",
                 max_sequence_length: int = 512, **common):
        if common.get("transformer_dtype") in E4M3:
            log.warning("model.transformer_dtype=%s: Cosmos-Predict2 trains badly on e4m3 fp8; use float8_e5m2.",
                        common["transformer_dtype"])
        super().__init__(**common)
        self.paths = {"transformer_path": transformer_path, "vae_path": vae_path, "t5": t5_path,
                      "tokenizer_path": tokenizer_path}
        self.max_sequence_length = max_sequence_length

    # --- caching
    def cache_fingerprints(self) -> tuple[str, str]:
        return fingerprint_files(self.file("vae_path"), extra="wan21"), self.text_fingerprint()

    def load_cache_encoders(self) -> WanEncoders:
        return WanEncoders(self._pipeline(transformer=None), None, self.max_sequence_length)

    def _pipeline(self, transformer: Optional[CosmosTransformer3DModel]) -> Cosmos2TextToImagePipeline:
        return Cosmos2TextToImagePipeline(transformer=transformer, vae=load_vae(self.file("vae_path"), self.compute_dtype),
                                          scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
                                          **self.text_parts())

    def inference_pipeline(self) -> Cosmos2TextToImagePipeline:
        return self.place_pipeline(self._pipeline(self.denoiser))

    # --- training
    def predict(self, noisy_latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.run_denoiser(noisy_latents, t, text)
