"""Flux Kontext (FLUX.1-Kontext-dev): Flux trained to edit. The control images of an edit dataset are VAE-encoded,
packed like the target and appended after the noisy target's tokens with their own position ids (first id 1),
exactly as diffusers' FluxKontextPipeline feeds them; the loss covers the target tokens only. On a plain
text-to-image dataset it trains as Flux. The weights have Flux Dev's shapes, so `diffusers_path` is a Kontext
folder, or a FLUX.1-dev folder plus `transformer_path` = the BFL `flux1-kontext-dev.safetensors`."""
from typing import Any, Optional

import numpy as np
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from .flux import FluxEncoders, FluxModule, pack_with_ids


class FluxKontextEncoders(FluxEncoders):
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor,
                      controls: Optional[torch.Tensor] = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """Target latents, and with controls [B, K, 3, H, W] also their latents [B, K, C, h, w]."""
        latents = super().encode_images(pixels)
        if controls is None:
            return latents
        control_latents = super().encode_images(controls.flatten(0, 1)).unflatten(0, controls.shape[:2])
        return {"latents": latents, "control_latents": control_latents}


class FluxKontextModule(FluxModule):
    def load_cache_encoders(self) -> FluxKontextEncoders:
        encoders = super().load_cache_encoders()
        return FluxKontextEncoders(encoders.pipe, encoders.max_sequence_length)

    def context_tokens(self, cond: dict[str, torch.Tensor], tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if "control_latents" not in cond:
            return super().context_tokens(cond, tokens)
        packed = [pack_with_ids(control) for control in cond["control_latents"].to(tokens.dtype).unbind(1)]
        for _, ids in packed:
            ids[..., 0] = 1  # FluxKontextPipeline.prepare_latents: context images sit at first id 1
        return torch.cat([t for t, _ in packed], dim=1), torch.cat([ids for _, ids in packed])

    def inference_pipeline(self) -> FluxKontextPipeline:
        return self.place_pipeline(FluxKontextPipeline.from_pretrained(
            self.model_dir, transformer=self.denoiser, dtype=self.compute_dtype, local_files_only=True))

    def render(self, prompt: str, width: int, height: int, steps: int, seed: int,
               image: Optional[Image.Image | np.ndarray] = None, **family_inputs: Any) -> np.ndarray:
        """With `image`, an edit of it (resized to width x height, as training crops controls to the target's
        size); without, plain text-to-image. Never the pipeline's snapping to its preferred 1 MP sizes."""
        if image is not None:
            family_inputs["image"] = image
        return super().render(prompt, width, height, steps, seed, _auto_resize=False, max_area=width * height,
                              **family_inputs)
