"""HiDream-I1 (Full): diffusers' HiDreamImageTransformer2DModel (16 double-stream + 32 single-stream blocks with
mixture-of-experts feed-forwards) on 2x2 patches of Flux-VAE latents, conditioned on two pooled CLIPs, T5 token
embeddings and, per block, one hidden layer of Llama 3.1 8B Instruct.

CLIP and T5 embeddings are cached; the Llama is not (every layer's hidden states would fill the disk): its token
ids are cached and the Llama runs every step as a frozen loop encoder (`load_loop_encoders`), never trained,
checkpointed or exported, its hidden states built as `HiDreamImagePipeline` builds them. The denoiser predicts
x - eps, which the pipeline negates (so does `predict`).

Files: `diffusers_path` is the HiDream-I1-Full Diffusers folder (without a Llama), `llama3_path` a Llama 3.1 8B
Instruct folder (`llama3_4bit`: loaded in bitsandbytes NF4). LoRAs export in ComfyUI format (diffusers names under
`diffusion_model.`, the MoE experts' linears included); no full fine-tune (as the reference trainer)."""
import math
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import torch
from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel
from transformers import AutoTokenizer, BitsAndBytesConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from difftrain.config.keys import ModelPath
from difftrain.datamodules.cache import fingerprint_files
from difftrain.formats.qwen_image import lora_to_comfyui
from difftrain.tiny import hidream as tiny_hidream
from difftrain.tiny import tiny_model_dir
from difftrain.utils.atomic import save_safetensors

from .base import DiffusionModule, skeleton
from .flux import FluxEncoders
from .nf4 import no_cpu_repacking

LORA_FILE = "adapter_model.safetensors"
TEXT_TOKENS = 128  # CLIP and T5 tokens: the official inference code's length for every text encoder


def llama_tokens(tokenizer: PreTrainedTokenizerBase, captions: list[str], max_length: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) [B, L], as HiDreamImagePipeline tokenizes for the Llama (padded to the length
    with the EOS token the pipeline sets as padding)."""
    inputs = tokenizer(captions, padding="max_length", max_length=min(max_length, tokenizer.model_max_length),
                       truncation=True, add_special_tokens=True, return_tensors="pt")
    return inputs.input_ids, inputs.attention_mask


def llama_hidden_states(llama: LlamaForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor
                        ) -> torch.Tensor:
    """[layers, B, L, D]: the output of every Llama layer, stacked as HiDreamImagePipeline stacks them (the
    transformer picks its `llama_layers`)."""
    outputs = llama(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return torch.stack(outputs.hidden_states[1:], dim=0)


class HiDreamEncoders(FluxEncoders):
    """The Flux VAE (encoded as Flux's), two CLIPs, T5 and the Llama's tokenizer, used once to fill the cache."""

    def __init__(self, pipe: HiDreamImagePipeline, max_llama3_sequence_length: int):
        super().__init__(pipe, TEXT_TOKENS)
        self.max_llama3_sequence_length = max_llama3_sequence_length

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """Per caption: T5 embeddings [128, D] and the two CLIPs' pooled embeddings concatenated, as the pipeline's
        encode_prompt builds them, and the Llama's token ids and mask."""
        pipe, device, length = self.pipe, self.pipe.text_encoder.device, self.max_sequence_length
        pooled = torch.cat([pipe._get_clip_prompt_embeds(tokenizer, encoder, captions, length, device)
                            for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder),
                                                       (pipe.tokenizer_2, pipe.text_encoder_2))], dim=-1)
        t5 = pipe._get_t5_prompt_embeds(captions, length, device)
        ids, mask = llama_tokens(pipe.tokenizer_4, captions, self.max_llama3_sequence_length)
        return [{"prompt_embeds_t5": e, "pooled_prompt_embeds": p, "llama_input_ids": i, "llama_attention_mask": m}
                for e, p, i, m in zip(t5, pooled, ids, mask)]


class HiDreamModule(DiffusionModule):
    cache_name = "hidream"
    tiny_models = ("hidream",)
    lora_only = True
    lora_target_blocks = ("HiDreamImageTransformerBlock", "HiDreamImageSingleTransformerBlock")
    block_lists = ("double_stream_blocks", "single_stream_blocks")
    keep_in_high_precision = (r"^t_embedder", r"^p_embedder", r"^x_embedder", r"^final_layer")
    pixels_round_to_multiple = 16  # VAE factor 8 x 2x2 patches

    def __init__(self,
                 diffusers_path: Annotated[Optional[str], ModelPath(
                     "the HiDream-I1-Full Diffusers folder", example="/models/HiDream-I1-Full", required=True)] = None,
                 llama3_path: Annotated[Optional[str], ModelPath(
                     "a Llama 3.1 8B Instruct folder (weights and tokenizer)",
                     example="/models/Meta-Llama-3.1-8B-Instruct", required=True)] = None,
                 llama3_4bit: bool = False, max_llama3_sequence_length: int = 128, **common):
        super().__init__(**common)
        self.diffusers_path = diffusers_path
        self.llama3_path = llama3_path
        self.llama3_4bit = llama3_4bit
        self.max_llama3_sequence_length = max_llama3_sequence_length

    # --- files
    @property
    def tiny_dir(self) -> Path:
        return tiny_model_dir("hidream", tiny_hidream.build)

    @property
    def model_dir(self) -> Path:
        return self.tiny_dir / tiny_hidream.DIFFUSERS_DIR if self.tiny else Path(self.diffusers_path)

    @property
    def llama_dir(self) -> Path:
        return self.tiny_dir / tiny_hidream.LLAMA_DIR if self.tiny else Path(self.llama3_path)

    def base_model(self) -> str:
        return str(self.model_dir)

    def load_llama_tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self.llama_dir, local_files_only=True)

    def load_llama(self) -> LlamaForCausalLM:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=self.compute_dtype) if self.llama3_4bit else None
        llama = LlamaForCausalLM.from_pretrained(self.llama_dir, dtype=self.compute_dtype,
                                                 quantization_config=quantization, local_files_only=True)
        no_cpu_repacking(llama)
        return llama

    def pipeline(self, **parts: Any) -> HiDreamImagePipeline:
        return HiDreamImagePipeline.from_pretrained(self.model_dir, tokenizer_4=self.load_llama_tokenizer(),
                                                    dtype=self.compute_dtype, local_files_only=True, **parts)

    # --- caching
    def cache_fingerprints(self) -> tuple[str, str]:
        root = self.model_dir
        text_parts = [root / name for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                                               "tokenizer_2", "tokenizer_3")]
        llama_tokenizer = sorted(self.llama_dir.glob("*token*"))  # only its token ids are cached
        text = fingerprint_files(*text_parts, *llama_tokenizer, extra=f"hidream:{self.max_llama3_sequence_length}")
        return fingerprint_files(root / "vae", extra="hidream"), text

    def load_cache_encoders(self) -> HiDreamEncoders:
        return HiDreamEncoders(self.pipeline(transformer=None, text_encoder_4=None), self.max_llama3_sequence_length)

    # --- training
    def load_denoiser(self) -> HiDreamImageTransformer2DModel:
        return HiDreamImageTransformer2DModel.from_pretrained(self.model_dir, subfolder="transformer",
                                                              dtype=self.compute_dtype, local_files_only=True)

    def denoiser_skeleton(self) -> HiDreamImageTransformer2DModel:
        return skeleton(HiDreamImageTransformer2DModel,
                        HiDreamImageTransformer2DModel.load_config(self.model_dir, subfolder="transformer"))

    def load_loop_encoders(self) -> dict[str, torch.nn.Module]:
        return {"llama": self.load_llama()}

    def conditioning(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        text = super().conditioning(batch)
        with torch.no_grad(), self.loop_encoder("llama") as llama:
            hidden = llama_hidden_states(llama, text.pop("llama_input_ids"), text.pop("llama_attention_mask"))
        return {**text, "llama_hidden_states": hidden.to(self.compute_dtype)}

    def predict(self, noisy_latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.denoiser(hidden_states=noisy_latents, timesteps=t * 1000,
                            encoder_hidden_states_t5=text["prompt_embeds_t5"],
                            encoder_hidden_states_llama3=text["llama_hidden_states"],
                            pooled_embeds=text["pooled_prompt_embeds"], return_dict=False)[0]
        return -self.as_latents(out, noisy_latents.shape)

    def as_latents(self, out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The denoiser's output as latents [B, C, h, w]. In training mode (where its MoE routes with gradients)
        it returns patches [B, C, tokens, p*p] instead, the tokens padded to its max_seq for non-square latents."""
        config = self.denoiser.config
        if not self.denoiser.training or config.force_inference_output:
            return out
        b, c, h, w = shape
        p = config.patch_size
        patches = out[:, :, :(h // p) * (w // p)].reshape(b, c, h // p, w // p, p, p)
        return patches.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)

    def inference_pipeline(self) -> HiDreamImagePipeline:
        return self.place_pipeline(self.pipeline(transformer=self.denoiser, text_encoder_4=self.loop_encoders["llama"]))

    def render(self, prompt: str, width: int, height: int, steps: int, seed: int, guidance: Optional[float] = None,
               pipeline: Any = None, **family_inputs: Any) -> np.ndarray:
        """The pipeline rescales every request to the area of its default_sample_size (1 MP): set to the requested
        area (a hair above, so its rounding down to multiples of 16 keeps the size)."""
        pipeline = self.inference_pipeline() if pipeline is None else pipeline
        pipeline.default_sample_size = math.sqrt(width * height) * (1 + 1e-6) / pipeline.vae_scale_factor
        return super().render(prompt, width, height, steps, seed, guidance, pipeline, **family_inputs)

    # --- export
    def export_lora(self, lora_state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """ComfyUI format: what HiDreamImagePipeline.load_lora_weights converts."""
        save_safetensors(lora_to_comfyui(lora_state_dict), out_dir / LORA_FILE, self.lora_metadata())

    def export_full(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        raise NotImplementedError("HiDream trains LoRAs only")
