"""Text-to-image sampling with OmniGen2 as its upstream pipeline samples: the prompt in the MLLM's chat template
under OmniGen2's system prompt, the MLLM's last hidden states as text features, Euler steps over time 0 (noise) ..
1 (image), shifted by the image size when the scheduler's dynamic_time_shift is on, text guidance against the
empty prompt, and the Flux VAE's scaled latents."""
from typing import Optional

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedTokenizerBase, Qwen2_5_VLForConditionalGeneration

from .transformer import OmniGen2Transformer2DModel

SYSTEM_PROMPT = "You are a helpful assistant that generates high-quality images based on user instructions."
VAE_SCALE = 8


class OmniGen2Pipeline(DiffusionPipeline):
    model_cpu_offload_seq = "mllm->transformer->vae"

    def __init__(self, transformer: Optional[OmniGen2Transformer2DModel], vae: AutoencoderKL,
                 mllm: Qwen2_5_VLForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                 dynamic_time_shift: bool = True):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, mllm=mllm, tokenizer=tokenizer)
        self.register_to_config(dynamic_time_shift=dynamic_time_shift)
        self.image_processor = VaeImageProcessor(vae_scale_factor=VAE_SCALE)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 256
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden states [B, L, D], attention mask [B, L]) of the prompts in the chat template, padded to
        the longest."""
        texts = [self.tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                                     {"role": "user", "content": prompt}],
                                                    tokenize=False, add_generation_prompt=False)
                 for prompt in prompts]
        tokens = self.tokenizer(texts, padding="longest", max_length=max_sequence_length, truncation=True,
                                return_tensors="pt").to(self.mllm.device)
        hidden = self.mllm(tokens.input_ids, attention_mask=tokens.attention_mask,
                           output_hidden_states=True).hidden_states[-1]
        return hidden, tokens.attention_mask.bool()

    def timesteps(self, steps: int, latent_pixels: int) -> torch.Tensor:
        """steps + 1 times from 0 to 1; the dynamic shift spends more of them near noise for larger images."""
        times = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        if self.config.dynamic_time_shift:
            m = latent_pixels ** 0.5 / 40
            times = times / (m - m * times + times)
        return times.float()

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor],
                 negative: Optional[tuple[torch.Tensor, torch.Tensor]], guidance_scale: float) -> torch.Tensor:
        dtype = self.transformer.dtype
        timestep = t.expand(latents.shape[0]).to(latents.device, dtype)
        conditional = self.transformer(latents.to(dtype), timestep, text[0].to(dtype), text[1])
        if negative is None:
            return conditional
        unconditional = self.transformer(latents.to(dtype), timestep, negative[0].to(dtype), negative[1])
        return unconditional + guidance_scale * (conditional - unconditional)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], width: int = 1024, height: int = 1024, num_inference_steps: int = 50,
                 guidance_scale: float = 5.0, generator: Optional[torch.Generator] = None, output_type: str = "np",
                 max_sequence_length: int = 256) -> ImagePipelineOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        text = self.encode_prompt(prompts, max_sequence_length)
        negative = self.encode_prompt([""] * len(prompts), max_sequence_length) if guidance_scale > 1 else None
        shape = (len(prompts), self.transformer.config.in_channels, height // VAE_SCALE, width // VAE_SCALE)
        latents = randn_tensor(shape, generator=generator, device=self.transformer.device, dtype=torch.float32)
        times = self.timesteps(num_inference_steps, shape[-2] * shape[-1])
        for t, t_next in zip(times[:-1], times[1:]):
            latents = latents + (t_next - t) * self.velocity(latents, t, text, negative, guidance_scale).float()
        vae = self.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        pixels = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        images = self.image_processor.postprocess(pixels, output_type=output_type)
        return ImagePipelineOutput(images=np.asarray(images) if output_type == "np" else images)
