"""Exports in diffusers' own layouts, for the families whose consumer is a diffusers pipeline or model class."""
from pathlib import Path
from typing import Any

import torch

from difftrain.utils.atomic import save_safetensors


def save_diffusers_lora(pipeline_class: Any, lora_state_dict: dict[str, torch.Tensor], out_dir: Path,
                        metadata: dict[str, str]) -> None:
    """The pipeline's own LoRA layout (`pytorch_lora_weights.safetensors`, `transformer.<diffusers names>`), written
    by our atomic writer with the run's metadata (diffusers' loaders read only their own `lora_adapter_metadata` key,
    absent here: the scale is folded into the weights)."""
    pipeline_class.save_lora_weights(out_dir, transformer_lora_layers=lora_state_dict, safe_serialization=True,
                                     save_function=lambda tensors, path: save_safetensors(tensors, path, metadata))


def save_model_folder(model_class: Any, config: Any, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    """A diffusers model folder (config.json + weights) of `state_dict`, which `model_class.from_pretrained` loads."""
    model = model_class.from_config(config)
    model.load_state_dict(state_dict)
    model.save_pretrained(folder, safe_serialization=True)
