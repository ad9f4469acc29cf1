"""What the Cosmos families (Cosmos 1.0 text2world, Cosmos-Predict2 text2image) share: diffusers'
CosmosTransformer3DModel read from NVIDIA's original checkpoint through the family's key map, the OLD T5 v1.0 XXL
from ComfyUI's single file with a T5 tokenizer (folder or repo id), LoRAs in ComfyUI format (`diffusion_model.<native names>`) and
full fine-tunes in the original layout. A family supplies its key map, VAE, pipeline and denoiser call."""
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
from diffusers import ConfigMixin, CosmosTransformer3DModel, ModelMixin
from safetensors.torch import load_file

from difftrain.datamodules.cache import fingerprint_files
from difftrain.formats import cosmos_common as formats
from difftrain.formats.keymap import KeyMap
from difftrain.formats.old_t5 import load_old_t5
from difftrain.tiny import tiny_model
from difftrain.utils.atomic import save_safetensors

from .base import DiffusionModule, skeleton
from .parts import load_tokenizer, tokenizer_folders

LORA_FILE = "adapter_model.safetensors"


class PassThroughSafetyChecker(ModelMixin, ConfigMixin):
    """Stands in for the pipelines' CosmosSafetyChecker (guardrail models that are no part of training and not
    installed): previews of a run render unfiltered. Its one buffer gives the pipeline a device and dtype to read."""

    def __init__(self):
        super().__init__()
        self.register_buffer("placement", torch.zeros(1), persistent=False)

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames):
        return frames


class CosmosBase(DiffusionModule):
    lora_target_blocks = ("CosmosTransformerBlock",)
    block_lists = ("transformer_blocks",)
    keep_in_high_precision = (r"^patch_embed", r"^time_embed", r"^learnable_pos_embed", r"^norm_out", r"^proj_out")
    keymap: KeyMap
    rope_scale: Callable[[int], tuple[float, float, float]]  # per model width; no weight shape shows it
    what: str  # "a Cosmos-Predict2 transformer", for errors
    full_file: str
    tiny_files: dict[str, str]  # the tiny model's file per path key

    paths: dict[str, Optional[str]]  # the path keys' values: transformer_path, vae_path, t5, tokenizer_path
    max_sequence_length: int

    def file(self, key: str) -> Path:
        """The file a path key names, or (model.tiny=true, unset) the tiny model's."""
        if self.paths[key] or not self.tiny:
            return Path(self.paths[key])
        return tiny_model(self.tiny_models[0]) / self.tiny_files[key]

    def base_model(self) -> str:
        return str(self.file("transformer_path"))

    # --- text encoder
    def text_fingerprint(self) -> str:
        return fingerprint_files(self.file("t5"), *tokenizer_folders(self.tokenizer_source()),
                                 extra=f"old_t5:{self.max_sequence_length}:{self.tokenizer_source()}")

    def tokenizer_source(self) -> str:
        """`tokenizer_path` (a folder or a repo id); a tiny model's own, which fits its vocabulary."""
        if self.tiny:
            return str(tiny_model(self.tiny_models[0]) / self.tiny_files["tokenizer_path"])
        return self.paths["tokenizer_path"]

    def text_parts(self) -> dict:
        return dict(text_encoder=load_old_t5(self.file("t5"), self.compute_dtype),
                    tokenizer=load_tokenizer(self.tokenizer_source(), "T5"),
                    safety_checker=PassThroughSafetyChecker())

    # --- denoiser
    def denoiser_skeleton(self) -> CosmosTransformer3DModel:
        _, config = formats.diffusers_weights(self.file("transformer_path"), self.keymap, self.rope_scale, self.what,
                                              shapes_only=True)
        return skeleton(CosmosTransformer3DModel, config)

    def load_denoiser(self) -> CosmosTransformer3DModel:
        return formats.load_transformer(self.file("transformer_path"), self.keymap, self.compute_dtype,
                                        self.rope_scale, self.what)

    def run_denoiser(self, inputs: torch.Tensor, timestep: torch.Tensor, text: dict[str, torch.Tensor],
                     **family_inputs) -> torch.Tensor:
        """[B, C, F, h, w] latents; the all-zero padding mask the pipelines pass (nothing of a sample is padding)."""
        padding_mask = inputs.new_zeros(1, 1, *inputs.shape[-2:])
        return self.denoiser(hidden_states=inputs, timestep=timestep, encoder_hidden_states=text["prompt_embeds"],
                             padding_mask=padding_mask, return_dict=False, **family_inputs)[0]

    def image_seq_len(self, latents: torch.Tensor) -> int:
        frames, height, width = latents.shape[-3:]
        return frames * height * width // 4  # 1x2x2 patches

    # --- export
    def export_lora(self, lora_state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        native = self.keymap.lora_to_native(lora_state_dict, f"the LoRA of {self.what}")
        save_safetensors(native, out_dir / LORA_FILE, self.lora_metadata())

    def read_exported_lora(self, path: Path) -> dict[str, torch.Tensor]:
        return self.keymap.lora_to_diffusers(load_file(path), f"the ComfyUI LoRA of {self.what}")

    def export_full(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        formats.save_original(state_dict, self.keymap, out_dir / self.full_file)
