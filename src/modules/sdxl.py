"""SDXL: diffusers' UNet2DConditionModel with both CLIP text encoders training beside it (LoRA on all three, or
a full fine-tune), on the DDPM epsilon or v-prediction objective.

Loads the original single-file checkpoint (`checkpoint_path`) with diffusers' `from_single_file`, offline, from
the SDXL base configs bundled in src/formats/sdxl_configs. Latents are cached; captions are cached as token ids
only, because the text encoders train. LoRAs export in kohya's format (lora.safetensors), full fine-tunes as the
original checkpoint (model.safetensors)."""
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import SingleFileComponentError
from transformers import CLIPTokenizer

from difftrain.config.keys import ModelPath
from difftrain.config.validate import ConfigError
from difftrain.datamodules.cache import fingerprint_files
from difftrain.formats.sdxl import (
    SDXL_BASE_CONFIG_DIR,
    checkpoint_metadata,
    kohya_lora,
    kohya_metadata,
    original_checkpoint,
    save_original_checkpoint,
    split_parts,
    untrained_tensors,
)
from difftrain.tiny import sdxl as tiny_sdxl
from difftrain.tiny import tiny_model_dir
from difftrain.tiny.sdxl import CHECKPOINT_FILE as TINY_FILE
from difftrain.utils.atomic import save_safetensors

from .base import DiffusionModule, skeleton
from .noise_schedules import DDPM

# Where the CLIP tokenizers of a real SDXL checkpoint come from (its single file holds none): the Hugging Face
# cache, filled on first use when online. Both are the CLIP BPE vocabulary, so any SDXL variant shares them.
TOKENIZER_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
TEXT_ENCODERS = {"text_encoder_1": "text_encoder", "text_encoder_2": "text_encoder_2"}  # our part -> pipeline
LORA_FILE, CHECKPOINT_FILE = "lora.safetensors", "model.safetensors"


class SDXLCacheEncoders:
    """The VAE (latents) and both tokenizers (captions -> token ids, padded to 77 as diffusers' pipeline does)."""

    def __init__(self, vae: AutoencoderKL, tokenizers: tuple[CLIPTokenizer, CLIPTokenizer]):
        self.vae = vae
        self.tokenizers = tokenizers

    def to(self, device: torch.device) -> "SDXLCacheEncoders":
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        return latents * self.vae.config.scaling_factor

    def encode_captions(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        ids = [tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids for tokenizer in self.tokenizers]
        return [{"input_ids_1": first, "input_ids_2": second} for first, second in zip(*ids)]


class SDXLModule(DiffusionModule):
    cache_name = "sdxl"
    tiny_models = ("sdxl",)
    # kohya's targets: every Linear in the UNet's transformer blocks and in both encoders' attention and MLPs.
    lora_target_blocks = ("Transformer2DModel", "CLIPAttention", "CLIPMLP")
    pixels_round_to_multiple = 64  # kohya's SDXL bucket step
    fold_lora_scale = False  # kohya files carry alpha tensors

    def __init__(self,
                 checkpoint_path: Annotated[Optional[str], ModelPath(
                     "the original single-file checkpoint", example="/models/sd_xl_base_1.0.safetensors",
                     required=True)] = None,
                 v_pred: bool = False,
                 min_snr_gamma: Optional[float] = None, debiased_estimation_loss: bool = False,
                 unet_lr: Optional[float] = None, text_encoder_1_lr: Optional[float] = None,
                 text_encoder_2_lr: Optional[float] = None,
                 timestep_sample_method="uniform",  # DDPM: a uniform t gives uniform integer timesteps
                 **common):
        if common.get("transformer_dtype"):
            raise ConfigError("model.transformer_dtype (fp8 storage) is not supported for SDXL; unset it.")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ConfigError(f"model.min_snr_gamma={min_snr_gamma} must be positive (sd-scripts recommends 5), "
                              f"or null to train without Min-SNR weighting.")
        super().__init__(timestep_sample_method=timestep_sample_method, **common)
        self.checkpoint_path = checkpoint_path
        self.v_pred = v_pred
        self.noise_schedule = DDPM(v_pred, min_snr_gamma, debiased_estimation_loss)
        self.learning_rates = {"denoiser": unet_lr, "text_encoder_1": text_encoder_1_lr,
                               "text_encoder_2": text_encoder_2_lr}
        self._pipeline: Optional[StableDiffusionXLPipeline] = None  # between load_denoiser and load_text_encoders

    @property
    def checkpoint(self) -> Path:
        """checkpoint_path; with tiny=true and no checkpoint_path, the tiny model's own single file."""
        return Path(self.checkpoint_path) if self.checkpoint_path else tiny_model_dir("sdxl", tiny_sdxl.build) / TINY_FILE

    @property
    def config_dir(self) -> Path:
        """The diffusers configs `from_single_file` builds the models from."""
        return tiny_model_dir("sdxl", tiny_sdxl.build) if self.tiny else SDXL_BASE_CONFIG_DIR

    # --- caching
    def cache_fingerprints(self) -> tuple[str, str]:
        """Latents: the checkpoint file (it holds the VAE). Token ids: the tokenizers."""
        latent = fingerprint_files(self.checkpoint, extra="sdxl-vae")
        if self.tiny:
            return latent, fingerprint_files(self.config_dir / "tokenizer", self.config_dir / "tokenizer_2",
                                             extra="sdxl-token-ids")
        return latent, fingerprint_files(extra=f"sdxl-token-ids:{TOKENIZER_REPO}")

    def load_cache_encoders(self) -> SDXLCacheEncoders:
        # float32 whatever model.dtype: SDXL's VAE overflows in fp16
        vae = self._from_single_file(AutoencoderKL.from_single_file, subfolder="vae")
        return SDXLCacheEncoders(vae, self._tokenizers())

    def _tokenizers(self) -> tuple[CLIPTokenizer, CLIPTokenizer]:
        source, local = (self.config_dir, True) if self.tiny else (TOKENIZER_REPO, False)
        try:
            return tuple(CLIPTokenizer.from_pretrained(source, subfolder=sub, local_files_only=local)
                         for sub in ("tokenizer", "tokenizer_2"))
        except OSError as error:
            raise ConfigError(f"The SDXL CLIP tokenizers could not be loaded from the Hugging Face repo {source} "
                              f"({error}). They are not inside checkpoint files: run once online (they are "
                              f"cached, ~2 MB), or copy the repo's tokenizer/ and tokenizer_2/ folders into the "
                              f"Hugging Face cache.") from None

    # --- models
    def load_denoiser(self) -> torch.nn.Module:
        self._pipeline = self._from_single_file(StableDiffusionXLPipeline.from_single_file, vae=None, tokenizer=None,
                                                tokenizer_2=None, torch_dtype=self.compute_dtype)
        return self._pipeline.unet

    def denoiser_skeleton(self) -> UNet2DConditionModel:
        return skeleton(UNet2DConditionModel, UNet2DConditionModel.load_config(self.config_dir, subfolder="unet"))

    def load_text_encoders(self) -> dict[str, torch.nn.Module]:
        pipeline, self._pipeline = self._pipeline, None
        return {part: getattr(pipeline, name) for part, name in TEXT_ENCODERS.items()}

    def _from_single_file(self, load, **kwargs) -> Any:
        try:
            return load(str(self.checkpoint), config=str(self.config_dir), local_files_only=True, **kwargs)
        except (OSError, ValueError, KeyError, SingleFileComponentError) as error:
            raise ConfigError(f"model.checkpoint_path={self.checkpoint} could not be loaded as an SDXL checkpoint "
                              f"in the original single-file layout ({type(error).__name__}: {error}). Point it at an "
                              f"SDXL .safetensors such as sd_xl_base_1.0.safetensors.") from None

    def checkpointed_blocks(self) -> list[torch.nn.Module]:
        unet = self.denoiser
        return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]

    def repeated_blocks(self) -> list[torch.nn.Module]:
        """The UNet's attention blocks, the ones diffusers' compile_repeated_blocks compiles (`_repeated_blocks`)."""
        names = UNet2DConditionModel._repeated_blocks
        return [module for module in self.denoiser.modules() if type(module).__name__ in names]

    def inference_pipeline(self) -> StableDiffusionXLPipeline:
        tokenizer, tokenizer_2 = self._tokenizers()
        parts = {name: self.text_encoders[part] for part, name in TEXT_ENCODERS.items()}
        return self.place_pipeline(self._from_single_file(
            StableDiffusionXLPipeline.from_single_file, unet=self.denoiser, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, torch_dtype=self.compute_dtype, **parts))

    def configure_model(self) -> None:
        super().configure_model()
        # SDXL reads text encoder 1 at its penultimate layer: the last layer and the final norm never reach the
        # loss. Frozen, they get no gradient DDP would wait for, and export as loaded (zero LoRA, as kohya's).
        first = self.text_encoders["text_encoder_1"]
        first = getattr(first, "text_model", first)  # transformers < 5.6 wraps the encoder in text_model
        for unused in (first.encoder.layers[-1], first.final_layer_norm):
            unused.requires_grad_(False)

    def part_learning_rates(self) -> dict[str, Optional[float]]:
        return self.learning_rates

    # --- training
    def conditioning(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Token ids plus SDXL's micro-conditioning from the crop the datamodule really took:
        (original h, w, crop top, left, target h, w)."""
        cond = super().conditioning(batch)
        sizes = (batch["original_size"], batch["crop_top_left"], batch["target_size"])
        cond["time_ids"] = torch.cat(sizes, dim=1).to(self.compute_dtype)
        return cond

    def encode_prompt(self, input_ids_1: torch.Tensor, input_ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt embeds, pooled) exactly as StableDiffusionXLPipeline.encode_prompt: both encoders' penultimate
        hidden states side by side, and the second encoder's projected pooled output."""
        first = self.text_encoders["text_encoder_1"](input_ids_1, output_hidden_states=True)
        second = self.text_encoders["text_encoder_2"](input_ids_2, output_hidden_states=True)
        return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds

    def predict(self, noisy_latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        prompt_embeds, pooled = self.encode_prompt(text["input_ids_1"], text["input_ids_2"])
        added = {"text_embeds": pooled, "time_ids": text["time_ids"]}
        return self.denoiser(noisy_latents, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added,
                             return_dict=False)[0]

    # --- export
    def export_lora(self, lora_state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        tensors = kohya_lora(lora_state_dict, self.lora_alpha, self.denoiser.config)
        save_safetensors(tensors, out_dir / LORA_FILE,
                         {**kohya_metadata(self.run_facts(), self.trained_resolution), **self.lora_metadata()})

    def export_full(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        parts = split_parts(state_dict)
        tensors = original_checkpoint(parts["denoiser"], self.denoiser.config, parts["text_encoder_1"],
                                      parts["text_encoder_2"], untrained_tensors(self.checkpoint))
        save_original_checkpoint(tensors, out_dir / CHECKPOINT_FILE,
                                 checkpoint_metadata(f"{self.checkpoint.stem} fine-tune", self.v_pred,
                                                     self.trained_resolution))

    def base_model(self) -> str:
        return str(self.checkpoint)

    @property
    def trained_resolution(self) -> str:
        """kohya's `WxH` of the run: its most used bucket size (SDXL's native 1024x1024 before any data)."""
        datamodule = getattr(self._trainer, "datamodule", None)
        sizes = datamodule.trained_sizes() if datamodule else []
        return sizes[0] if sizes else "1024x1024"

    def run_facts(self) -> dict[str, Any]:
        """What kohya records about a run (its ss_* metadata), from this run."""
        adapter, optimizer, schedule = self.adapter_cfg, self.optimizer_cfg, self.noise_schedule
        lr = optimizer.get("lr")
        rates = {part: lr if rate is None else rate for part, rate in self.learning_rates.items()}
        trainer = self._trainer
        return {"network_dim": adapter.rank, "network_alpha": self.lora_alpha, "network_dropout": adapter.get("dropout"),
                "learning_rate": lr, "unet_lr": rates["denoiser"],
                "text_encoder_lr": [rates["text_encoder_1"], rates["text_encoder_2"]],
                "optimizer": optimizer.get("_target_"), "lr_scheduler": (self.scheduler_cfg or {}).get("name"),
                "steps": trainer.global_step if trainer else 0, "epoch": trainer.current_epoch if trainer else 0,
                "seed": self.seed, "mixed_precision": str(self.compute_dtype).removeprefix("torch."),
                "v_parameterization": self.v_pred, "min_snr_gamma": schedule.min_snr_gamma,
                "debiased_estimation": schedule.debiased_estimation_loss, "sd_model_name": self.checkpoint.name,
                "output_name": "lora", "resolution": "({}, {})".format(*self.trained_resolution.split("x")),
                "num_train_images": trainer.datamodule.num_items if trainer and trainer.datamodule else 0, "training_finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
