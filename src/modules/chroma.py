"""Chroma (lodestone's Flux Schnell derivative): diffusers' ChromaTransformer2DModel on Flux's packed latents,
conditioned on T5 embeddings alone, with the attention mask ChromaPipeline builds (every real token plus the first
pad token, applied as the pipeline applies it). The transformer comes from the Chroma single file (`transformer_path`, native/ComfyUI layout); the VAE
and T5 from a FLUX.1 dev or schnell Diffusers folder (`diffusers_path`). LoRAs export in ComfyUI format
(`diffusion_model.<native names>`, q/k/v fused as the native layout is), full fine-tunes as the native single file."""
from pathlib import Path
from typing import Annotated, Optional

import torch
from diffusers import AutoencoderKL, ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file
from transformers import AutoTokenizer, T5EncoderModel

from difftrain.config.keys import ModelPath
from difftrain.datamodules.cache import fingerprint_files
from difftrain.formats import chroma as formats
from difftrain.formats.single_file import read_shapes, strip_comfy_prefix
from difftrain.tiny import chroma as tiny_chroma
from difftrain.tiny import tiny_model_dir
from difftrain.utils.atomic import save_safetensors

from .base import skeleton
from .flux import FluxBase, FluxEncoders

LORA_FILE = "adapter_model.safetensors"
FULL_FILE = "chroma.safetensors"


class ChromaEncoders(FluxEncoders):
    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """T5 embeddings and their mask (every real token plus the first pad) as ChromaPipeline computes them, padded
        to max_sequence_length as it does: the transformer takes the mask additively (0/1 logits bias, not a
        hard mask), so the pad tokens' embeddings reach it and must be those of inference."""
        embeds, mask = self.pipe._get_t5_prompt_embeds(captions, max_sequence_length=self.max_sequence_length,
                                                       device=self.pipe.text_encoder.device)
        return [{"prompt_embeds": e, "prompt_embeds_mask": m.bool()} for e, m in zip(embeds, mask)]


class ChromaModule(FluxBase):
    cache_name = "chroma"
    tiny_models = ("flux", "chroma")  # the Flux folder's VAE and T5, Chroma's transformer
    lora_target_blocks = ("ChromaTransformerBlock", "ChromaSingleTransformerBlock")
    keep_in_high_precision = (r"^x_embedder", r"^context_embedder", r"^distilled_guidance_layer", r"^proj_out",
                              r"^norm_out")

    def __init__(self, diffusers_path: Annotated[Optional[str], ModelPath(
                     "a FLUX.1 dev or schnell Diffusers folder (Chroma's VAE and T5 come from it)",
                     example="/models/FLUX.1-schnell", required=True)] = None,
                 transformer_path: Annotated[Optional[str], ModelPath(
                     "the Chroma single-file transformer", example="/models/chroma-unlocked-v48.safetensors",
                     required=True)] = None,
                 max_sequence_length: int = 512, **common):
        super().__init__(diffusers_path=diffusers_path, transformer_path=transformer_path,
                         max_sequence_length=max_sequence_length, **common)

    @property
    def transformer_file(self) -> Path:
        if self.tiny and not self.transformer_path:
            return tiny_model_dir("chroma", tiny_chroma.build) / tiny_chroma.TRANSFORMER_FILE
        return Path(self.transformer_path)

    def base_model(self) -> str:
        return str(self.transformer_file)

    # --- caching
    def cache_fingerprints(self) -> tuple[str, str]:
        root = self.model_dir
        text = fingerprint_files(root / "text_encoder_2", root / "tokenizer_2",
                                 extra=f"chroma:{self.max_sequence_length}")
        return fingerprint_files(root / "vae", extra="flux"), text

    def load_cache_encoders(self) -> ChromaEncoders:
        return ChromaEncoders(self._pipeline(transformer=None), self.max_sequence_length)

    def _pipeline(self, transformer: Optional[ChromaTransformer2DModel]) -> ChromaPipeline:
        root, dtype = self.model_dir, self.compute_dtype
        return ChromaPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler"),
            vae=AutoencoderKL.from_pretrained(root, subfolder="vae", dtype=dtype, local_files_only=True),
            text_encoder=T5EncoderModel.from_pretrained(root, subfolder="text_encoder_2", dtype=dtype,
                                                        local_files_only=True),
            tokenizer=AutoTokenizer.from_pretrained(root, subfolder="tokenizer_2", local_files_only=True),
            transformer=transformer)

    # --- training
    def denoiser_skeleton(self) -> ChromaTransformer2DModel:
        shapes = strip_comfy_prefix(read_shapes(self.transformer_file))
        return skeleton(ChromaTransformer2DModel, formats.transformer_config(shapes, *self._rotary_axes()))

    def _rotary_axes(self) -> tuple:
        """The rotary axes show in no weight shape: the tiny model's, or (none given) the released Chroma's."""
        return (tiny_chroma.TRANSFORMER_CONFIG["axes_dims_rope"],) if self.tiny else ()

    def load_denoiser(self) -> ChromaTransformer2DModel:
        return formats.load_chroma_transformer(self.transformer_file, self.compute_dtype, *self._rotary_axes())

    def denoise_tokens(self, tokens: torch.Tensor, ids: torch.Tensor, t: torch.Tensor,
                       text: dict[str, torch.Tensor]) -> torch.Tensor:
        prompt_embeds = text["prompt_embeds"]
        b, length = prompt_embeds.shape[:2]
        # ChromaPipeline._prepare_attention_mask: the text mask, then every image token, in the compute dtype
        mask = torch.cat([text["prompt_embeds_mask"].to(tokens.dtype),
                          torch.ones(b, tokens.shape[1], device=tokens.device, dtype=tokens.dtype)], dim=1)
        txt_ids = torch.zeros(length, 3, device=tokens.device, dtype=tokens.dtype)
        return self.denoiser(hidden_states=tokens, timestep=t, encoder_hidden_states=prompt_embeds, txt_ids=txt_ids,
                             img_ids=ids, attention_mask=mask, return_dict=False)[0]

    def inference_pipeline(self) -> ChromaPipeline:
        return self.place_pipeline(self._pipeline(self.denoiser))

    # --- export
    def export_lora(self, lora_state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        save_safetensors(formats.lora_to_comfyui(lora_state_dict), out_dir / LORA_FILE, self.lora_metadata())

    def read_exported_lora(self, path: Path) -> dict[str, torch.Tensor]:
        return formats.lora_from_comfyui(load_file(path))

    def export_full(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        formats.save_chroma_transformer(state_dict, out_dir / FULL_FILE)
