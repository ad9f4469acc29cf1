"""The shared training step. A family subclass supplies loading, encoders, its denoiser call and its export
format (the family contract, see docs/architecture.md); timestep sampling, loss, LoRA/fp8/full-fine-tune setup,
optimizer groups, logging, eval loss and checkpoint trimming live here once."""
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Protocol

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from diffusers.hooks import apply_layerwise_casting
from hydra.utils import instantiate
from lightning import LightningModule
from omegaconf import DictConfig, OmegaConf
from peft import get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from difftrain.config.keys import Choices
from difftrain.config.validate import ConfigError
from difftrain.optim.gradient_release import GradientReleaseOptimizer
from difftrain.parallel.fsdp import gathered_state_dict, shard_parts, whole_tensor
from difftrain.tiny import tiny_model

from .adapters import is_adapter_weight, part_prefix, peft_config, prepare_adapter, write_adapter
from .block_swap import BlockSwap
from .checkpointing import checkpoint_blocks
from .compile import cast_in_graph, compile_regions, regions_outside_blocks
from .nf4 import quantize_linears_nf4
from .noise_schedules import FlowMatching
from .timesteps import TimestepSampler

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float8": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
EVAL_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class CacheEncoders(Protocol):
    """What the datamodule needs from a family to fill the cache; dropped once caching is done."""

    def to(self, device: torch.device) -> "CacheEncoders": ...

    def encode_images(self, pixels: torch.Tensor, controls: Optional[torch.Tensor] = None
                      ) -> torch.Tensor | dict[str, torch.Tensor]:
        """[B, 3, H, W] (video families: also [B, 3, F, H, W] clips) in [-1, 1] -> the latents the denoiser trains on
        (already scaled), or a dict of batched tensors: "latents" plus conditioning cached beside them, which
        batches carry as batch["cond"] and `predict` receives as `cond`.
        `controls`: [B, K, 3, H, W], the K control / reference images of each item (dataset.control_path(s)),
        resized and centre-cropped to the target's size; passed only for items that have controls, so a family
        that trains without them may keep the signature `encode_images(self, pixels)`. A family that uses them
        returns their conditioning in the dict (e.g. "control_latents" [B, K, C, h, w])."""

    def encode_captions(self, captions: list[str], images: Optional[list[Optional[torch.Tensor]]] = None
                        ) -> list[dict[str, torch.Tensor]]:
        """One dict of text-conditioning tensors per caption; their first dim may differ between captions
        (unpadded token sequences: `DiffusionModule.collate_text` pads them per batch). `images` only for a
        family with `text_depends_on_images`: per caption its item's controls [K, 3, H, W], or None."""


class DiffusionModule(LightningModule, ABC):
    # --- family contract: class attributes
    cache_name: str = ""                                # separates caches of different families / variants
    lora_target_blocks: tuple[str, ...] = ()            # class names of blocks whose Linear layers get LoRA
    block_lists: tuple[str, ...] = ()                   # denoiser attributes holding its blocks, in running order
    keep_in_high_precision: tuple[str, ...] = ()        # regexes of module names never stored in fp8
    pixels_round_to_multiple: int = 16
    framerate: Optional[int] = None                     # fps videos are resampled to; None: an image-only family
    frames_multiple: int = 4                            # video frame counts are of the form frames_multiple * k + 1
    requires_video: bool = False                        # image-to-video: every item must be a video
    allowed_sizes: Optional[tuple[tuple[int, int], ...]] = None  # (width, height) the model trains at; None: any
    allowed_frames: Optional[tuple[int, ...]] = None    # video frame counts it trains on (images: 1); None: any
    text_depends_on_images: bool = False                # encode_captions sees the controls (cache key covers them)
    fold_lora_scale: bool = True                        # False: export_lora gets unscaled weights, writes alpha
    tiny_models: tuple[str, ...] = ()                   # what model.tiny=true reads: names in src/tiny's TINY_MODELS
    lora_only: bool = False                             # True: no full fine-tune (adapter=none is refused)

    # The constructor declares the config keys every family shares: their types, choices and defaults are what
    # validation checks (src/config/family.py reads them from this signature without importing this module).
    def __init__(self, tiny: bool = False,
                 dtype: Annotated[Literal["float32", "float16", "bfloat16"], Choices("a compute dtype")] = "bfloat16",
                 transformer_dtype: Annotated[Optional[Literal["float8", "float8_e4m3fn", "float8_e5m2", "nf4"]],
                                              Choices("fp8 or NF4 storage for LoRA training")] = None,
                 timestep_sample_method: Literal["logit_normal", "uniform"] = "logit_normal",
                 sigmoid_scale: float = 1.0, shift: Optional[float] = None, flux_shift: bool = False,
                 min_t: float = 0.0, max_t: float = 1.0,
                 activation_checkpointing: Annotated[Literal[False, True, "offload"], Choices(listed=(
                     "true (recompute each block's activations in backward), offload (the same, with the block "
                     "inputs kept for it in CPU memory: the reference trainer's 'unsloth') or false"))] = False,
                 blocks_to_swap: int = 0,
                 compile: Annotated[Literal[False, True, "max-autotune", "whole"], Choices(listed=(
                     "true (torch.compile each transformer block, and each module around them), max-autotune "
                     "(the same, also timing candidate matmul kernels while compiling: slower to compile), whole "
                     "(the denoiser as one graph: faster steps, a compile that grows with depth; no block swap, "
                     "activation checkpointing or FSDP) or false"))] = False,
                 adapter: Optional[DictConfig] = None,
                 optimizer: Optional[DictConfig] = None, scheduler: Optional[DictConfig] = None,
                 eval_names: tuple[str, ...] = (), seed: int = 0):
        super().__init__()
        self.tiny = tiny
        self.compute_dtype = DTYPES[dtype]
        self.nf4_base = transformer_dtype == "nf4"  # bitsandbytes storage (nf4.py); fp8: layerwise casting
        self.storage_dtype = DTYPES[transformer_dtype] if transformer_dtype and not self.nf4_base else None
        self.timesteps = TimestepSampler(timestep_sample_method, sigmoid_scale, shift, flux_shift, min_t, max_t)
        self.noise_schedule = FlowMatching()  # a family training another objective sets its own (SDXL: DDPM)
        self.activation_checkpointing = activation_checkpointing
        self.blocks_to_swap = blocks_to_swap
        self.block_swap: Optional[BlockSwap] = None
        self.compiled_blocks = compile  # regional or whole-denoiser compilation (compile.py)
        self.adapter_cfg = adapter
        self.optimizer_cfg = optimizer
        self.scheduler_cfg = scheduler
        self.eval_names = tuple(eval_names)
        self.seed = seed
        self.denoiser: Optional[torch.nn.Module] = None
        self.text_encoders = torch.nn.ModuleDict()  # the ones that train (load_text_encoders)
        self.loop_encoders: dict[str, torch.nn.Module] = {}  # frozen, unregistered: see load_loop_encoders
        self.strict_loading = False  # checkpoints hold trainable weights only; the base comes from disk

    def refuse_unsupported_training(self) -> None:
        """Runs before anything is cached or loaded."""
        if self.lora_only and not self.is_lora:
            raise ConfigError(f"model={self.cache_name} trains LoRAs only (no full fine-tune, as the reference "
                              f"trainer): use adapter=lora.")
        per_block = {"blocks_to_swap": self.blocks_to_swap, "activation_checkpointing": self.activation_checkpointing}
        if self.compiled_blocks == "whole" and any(per_block.values()):
            name, value = next((name, value) for name, value in per_block.items() if value)
            raise ConfigError(f"model.compile=whole with model.{name}={str(value).lower()}: torch cannot trace it "
                              f"into one graph of the whole denoiser. Use model.compile=true (each block compiled, "
                              f"{name} around them).")

    def build_tiny_models(self) -> None:
        """With model.tiny=true, build (once, into the tiny cache) every tiny model the family reads. Runs before
        Lightning starts other processes: inside a process group transformers' save_pretrained writes on rank 0
        only, so a rank building there would leave an incomplete folder."""
        if self.tiny:
            for name in self.tiny_models:
                tiny_model(name)

    # --- family contract: methods
    @abstractmethod
    def cache_fingerprints(self) -> tuple[str, str]:
        """(latent encoder, text encoders) fingerprints, computed without loading them."""

    @abstractmethod
    def load_cache_encoders(self) -> CacheEncoders: ...

    @abstractmethod
    def load_denoiser(self) -> torch.nn.Module:
        """The denoiser in the compute dtype."""

    def denoiser_skeleton(self) -> torch.nn.Module:
        """The denoiser with every weight on the meta device (shapes, no memory), from its config alone: the
        Diffusers folder's config.json, a single file's safetensors header, or bundled configs. No weight is read
        (the dry run estimates memory from it)."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its denoiser without loading it")

    @abstractmethod
    def predict(self, noisy_latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the denoiser; returns a prediction shaped like the latents. A family whose encoders cache
        conditioning beside the latents (see CacheEncoders.encode_images) also takes it as `cond=`."""

    @abstractmethod
    def export_lora(self, lora_state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """Write the LoRA (diffusers module names, lora_A/lora_B, scale baked in unless fold_lora_scale is
        False; a trained text encoder's keys under '<part name>.') in the family's format."""

    def read_exported_lora(self, path: Path) -> dict[str, torch.Tensor]:
        """A LoRA file in the family's format -> PEFT weights under diffusers module names (our own reader, for
        formats no diffusers loader takes)."""
        raise NotImplementedError(f"{type(self).__name__} has no reader of its LoRA format; diffusers' loaders "
                                  f"read it")

    @abstractmethod
    def export_full(self, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """Write a full fine-tune (the denoiser's keys bare, a trained text encoder's under '<part name>.') in
        the family's consumer format(s)."""

    @abstractmethod
    def inference_pipeline(self) -> Any:
        """The family's inference pipeline (a diffusers pipeline, or our own sampler with the same call) built
        from the loaded parts around the denoiser as it is now, adapter included: previews, the sample command and
        the conformance suite's consumer checks render through it. Encoders freed after caching load again."""

    def place_pipeline(self, pipeline: Any) -> Any:
        """`pipeline` with every model but the denoiser moved to the denoiser's device (the denoiser stays where
        training keeps it: block swap holds part of it in CPU memory)."""
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module) and component is not self.denoiser:
                component.to(self.device)
        return pipeline

    def render(self, prompt: str, width: int, height: int, steps: int, seed: int, guidance: Optional[float] = None,
               pipeline: Any = None, **family_inputs: Any) -> Any:
        """Images (numpy, [N, H, W, 3] in [0, 1]) for `prompt` from `inference_pipeline()`; a family whose
        pipeline takes other inputs (frames, a control image) adds them here. `guidance`: the pipeline's
        guidance_scale (None: its default); `pipeline`: one from inference_pipeline() to reuse across calls."""
        return self.call_pipeline(pipeline, seed, guidance, prompt=prompt, width=width, height=height,
                                  num_inference_steps=steps, **family_inputs).images

    def call_pipeline(self, pipeline: Any, seed: int, guidance: Optional[float], **inputs: Any) -> Any:
        """`pipeline` (or a new inference_pipeline()) called with a CPU generator seeded with `seed` (the same
        noise on every device), numpy output, and `guidance` as its guidance_scale when given."""
        if guidance is not None:
            inputs["guidance_scale"] = guidance
        pipeline = self.inference_pipeline() if pipeline is None else pipeline
        return pipeline(generator=torch.Generator().manual_seed(seed), output_type="np", **inputs)

    def load_exported_lora(self, path: Path) -> None:
        """Load a LoRA file this family exported into its (adapter-free) parts, as the file's consumer does:
        diffusers' own loader through the family's pipeline (whose models are the module's parts), or, for a format
        diffusers cannot read (the family has a `read_exported_lora`), our reader and diffusers' adapter loading
        into the denoiser."""
        if type(self).read_exported_lora is DiffusionModule.read_exported_lora:
            self.inference_pipeline().load_lora_weights(path)
        else:
            self.denoiser.load_lora_adapter(self.read_exported_lora(path), prefix=None)

    def discarded_modules(self, denoiser: torch.nn.Module) -> list[str]:
        """Names of the denoiser's modules whose output the denoiser discards: no gradient ever reaches them, so
        they get no LoRA and stay frozen in a full fine-tune (DDP requires a gradient for every trainable
        parameter). Default: none."""
        return []

    def load_loop_encoders(self) -> dict[str, torch.nn.Module]:
        """Frozen encoders that run at every step instead of being cached (HiDream's Llama), by name. They never
        train and are no part of the module's state: not in optimizer groups, checkpoints or exports, and on the
        training device only while they run (`loop_encoder`). Default: none."""
        return {}

    @contextmanager
    def loop_encoder(self, name: str) -> Iterator[torch.nn.Module]:
        """A loop encoder on the training device for the duration of the block, back in CPU memory after."""
        encoder = self.loop_encoders[name].to(self.device)
        try:
            yield encoder
        finally:
            encoder.to("cpu")

    def load_text_encoders(self) -> dict[str, torch.nn.Module]:
        """Text encoders that train with the denoiser, by part name (SDXL); their captions are cached as token
        ids, not embeddings. Default: none."""
        return {}

    def part_learning_rates(self) -> dict[str, Optional[float]]:
        """Learning rate per part ("denoiser" and the text encoders' names): None (or absent) = the optimizer's
        lr; 0 freezes the part (no LoRA, no gradients)."""
        return {}

    def conditioning(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """What `predict` receives as `text`: the cached text tensors, floating ones in the compute dtype. A family
        adds what it derives per batch (SDXL: the size/crop micro-conditioning from the batch geometry)."""
        return self._to_compute(batch["text"])

    @staticmethod
    def collate_text(texts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One batch of cached text tensors: stacked; a key whose tensors differ in length (dim 0) is padded
        with zeros to the longest and gets a bool `<key>_mask` [B, L] (True = real token). A family whose
        denoiser wants another padding or mask overrides this."""
        batch = {}
        for key in texts[0]:
            tensors = [text[key] for text in texts]
            if all(t.shape == tensors[0].shape for t in tensors):
                batch[key] = torch.stack(tensors)
            else:
                batch[key], batch[f"{key}_mask"] = pad_sequences(tensors)
        return batch

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Tokens the denoiser sees for these latents (drives flux_shift)."""
        return latents.shape[-2] * latents.shape[-1] // 4

    # --- model setup
    @property
    def is_lora(self) -> bool:
        """Whether an adapter (adapter=lora, lokr or loha) trains, rather than every weight."""
        return self.adapter_cfg is not None and self.adapter_cfg.type != "none"

    @property
    def lora_alpha(self) -> float:
        return self.adapter_cfg.alpha or self.adapter_cfg.rank

    def model_parts(self) -> dict[str, torch.nn.Module]:
        """The denoiser and the text encoders that train with it, by part name."""
        return {"denoiser": self.denoiser, **self.text_encoders}

    def configure_model(self) -> None:
        if self.denoiser is not None:
            return
        denoiser = self.load_denoiser()
        if self.nf4_base:  # before the LoRA, which wraps the 4-bit layers
            quantize_linears_nf4(denoiser, self.compute_dtype, keep=self.keep_in_high_precision)
        self.denoiser = self._prepare_part("denoiser", denoiser, self.discarded_modules(denoiser))
        if self.storage_dtype is not None:
            self._store_low_precision()
        if self.compiled_blocks:  # before checkpointing and block swap wrap the blocks (see compile.py)
            compile_regions(self._compiled_regions(), autotune=self.compiled_blocks == "max-autotune")
        if self.blocks_to_swap:
            self.block_swap = self._swap_blocks()
        if self.activation_checkpointing:
            self._checkpoint_activations()
        for name, encoder in self.load_text_encoders().items():
            self.text_encoders[name] = self._prepare_part(name, encoder)
        for name, encoder in self.load_loop_encoders().items():
            self.loop_encoders[name] = encoder.requires_grad_(False).eval()
        if self.is_lora:
            prepare_adapter(self)
        if self.device_mesh is not None:  # trainer=fsdp
            shard_parts(self.model_parts(), self.checkpointed_blocks(), self.device_mesh["data_parallel"],
                        self.compute_dtype)

    def _compiled_regions(self) -> list[torch.nn.Module]:
        graphs = self._compiled_graphs()
        if self.compiled_blocks == "whole":
            return graphs
        keep = self.kept_in_compute_dtype if self.storage_dtype is not None else None
        return [*graphs, *regions_outside_blocks(self.denoiser, graphs, keep)]

    def _compiled_graphs(self) -> list[torch.nn.Module]:
        """The modules model.compile traces (each a graph of its own): the denoiser, or its repeated blocks."""
        if self.compiled_blocks == "whole":
            return [self.denoiser]
        blocks = self.repeated_blocks()
        if not blocks:
            raise ConfigError(f"model.compile={str(self.compiled_blocks).lower()}: {type(self).__name__} lists no "
                              f"blocks to compile one by one (block_lists). Use model.compile=whole or false.")
        return blocks

    def repeated_blocks(self) -> list[torch.nn.Module]:
        """The blocks model.compile=true compiles one by one (blocks of one class share a graph): the transformer
        blocks, unless the family says otherwise."""
        return self.blocks()

    @property
    def kept_in_compute_dtype(self) -> tuple[str, ...]:
        """Name patterns of the layers low-precision storage leaves alone."""
        return (*self.keep_in_high_precision, "lora_")

    def _store_low_precision(self) -> None:
        keep = self.kept_in_compute_dtype
        # The layers inside a compiled graph cast in it (compile.py): the blocks', or all with one graph
        compiled = (cast_in_graph(self.denoiser, self._compiled_graphs(), self.storage_dtype, self.compute_dtype, keep)
                    if self.compiled_blocks else ())
        # The hook directly, not model.enable_layerwise_casting: that also skips every module whose name
        # contains "norm" (all of Flux's modulation linears), where the family's own list should decide.
        apply_layerwise_casting(self.denoiser, storage_dtype=self.storage_dtype, compute_dtype=self.compute_dtype,
                                skip_modules_pattern=(*keep, *compiled))

    def blocks(self) -> list[torch.nn.Module]:
        """The denoiser's transformer blocks in the order they run (block swap); empty where the family lists
        none (block_lists), and the block features refuse to run."""
        return [block for name in self.block_lists for block in getattr(self.denoiser, name)]

    def checkpointed_blocks(self) -> list[torch.nn.Module]:
        """The modules activation checkpointing wraps: the transformer blocks, unless the family says otherwise."""
        return self.blocks()

    def _checkpoint_activations(self) -> None:
        blocks = self.checkpointed_blocks()
        if not blocks:
            raise ConfigError(f"model.activation_checkpointing={self.activation_checkpointing}: "
                              f"{type(self).__name__} lists no blocks to checkpoint (block_lists). Use "
                              f"model.activation_checkpointing=false.")
        checkpoint_blocks(blocks, offload=self.activation_checkpointing == "offload",
                          recompute_context=self.block_swap.recompute if self.block_swap else None)

    def _swap_blocks(self) -> BlockSwap:
        blocks, count = self.blocks(), self.blocks_to_swap
        key = f"model.blocks_to_swap={count}"
        if not blocks:
            raise ConfigError(f"{key}: {type(self).__name__} does not list its transformer blocks (block_lists), "
                              f"so none can be swapped. Use model.blocks_to_swap=0.")
        if self.nf4_base:  # it re-points weights' data only: an NF4 weight's quantization state would stay behind
            raise ConfigError(f"{key}: block swap cannot move weights stored in NF4 (model.transformer_dtype=nf4). "
                              f"Use model.transformer_dtype=float8 with block swap, or model.blocks_to_swap=0.")
        if count > len(blocks) - 2:
            raise ConfigError(f"{key} is too large: this model has {len(blocks)} transformer blocks, and at most "
                              f"{len(blocks) - 2} (blocks - 2) can be swapped.")
        return BlockSwap(blocks, count)

    def _apply(self, fn, recurse=True):
        # Moving the module (Lightning's module.to(device)) leaves the swapped blocks' weights in CPU memory.
        if self.block_swap is None:
            return super()._apply(fn, recurse)
        with self.block_swap.kept_in_place():
            return super()._apply(fn, recurse)

    def _prepare_part(self, name: str, module: torch.nn.Module, discarded: Sequence[str] = ()) -> torch.nn.Module:
        """`discarded`: names of the part's modules that never train (see discarded_modules)."""
        trains = self.part_learning_rates().get(name) != 0
        module.train(trains)
        for param in module.parameters():  # weights stored in NF4 are integers, never trainable
            param.requires_grad_(trains and not self.is_lora and param.is_floating_point())
        for discarded_name in discarded:
            module.get_submodule(discarded_name).requires_grad_(False)
        if trains and self.is_lora:
            self._add_lora(module, discarded)
        return module

    def lora_target_modules(self, model: torch.nn.Module, discarded: Sequence[str] = ()) -> list[str]:
        """The Linear layers of the lora_target_blocks, except those in `discarded` modules."""
        targets = []
        for block_name, block in model.named_modules():
            if type(block).__name__ in self.lora_target_blocks:
                targets += [f"{block_name}.{name}" for name, m in block.named_modules()
                            if isinstance(m, torch.nn.Linear)]
        return [t for t in targets if not any(t == d or t.startswith(f"{d}.") for d in discarded)]

    def _add_lora(self, model: torch.nn.Module, discarded: Sequence[str]) -> None:
        cfg = self.adapter_cfg
        config = peft_config(cfg, self.lora_alpha, self.lora_target_modules(model, discarded))
        with torch.random.fork_rng():  # LoRA init must not depend on what consumed the global RNG before
            torch.manual_seed(self.seed)
            inject_adapter_in_model(config, model, adapter_name="default")
        for name, param in model.named_parameters():
            if is_adapter_weight(name):
                param.data = param.data.to(DTYPES[cfg.dtype])

    # --- training
    def forward_loss(self, batch: dict[str, Any], t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        prediction, target = self.denoise(batch, t, noise)
        return weighted_mse(prediction, target, self.noise_schedule.loss_weights(t.to(prediction.device)),
                            batch.get("loss_mask"))

    def denoise(self, batch: dict[str, Any], t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's prediction for the batch's latents noised to `t` with `noise`, and its target."""
        latents = batch["latents"].to(self.compute_dtype)
        noise = noise.to(latents.device, self.compute_dtype)
        t = t.to(latents.device)
        schedule = self.noise_schedule
        extra = {"cond": self._to_compute(batch["cond"])} if "cond" in batch else {}
        prediction = self.predict(schedule.add_noise(latents, noise, t), self._denoiser_timesteps(t),
                                  self.conditioning(batch), **extra)
        return prediction, schedule.target(latents, noise, t)

    def _denoiser_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        timesteps = self.noise_schedule.denoiser_timesteps(t)
        return timesteps.to(self.compute_dtype) if timesteps.is_floating_point() else timesteps

    def _to_compute(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.compute_dtype) if v.is_floating_point() else v for k, v in tensors.items()}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        latents = batch["latents"]
        generator = self.step_generator(batch_idx)
        t = self.timesteps.sample(latents.shape[0], self.image_seq_len(latents), generator)
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        loss = self.forward_loss(batch, t, noise)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Non-finite training loss {loss.item()} at step {self.global_step}.")
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("train/epoch_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """Noise and timesteps depend only on (seed, step, micro-batch, rank): a resumed run draws what an
        uninterrupted one would, with no RNG state to restore."""
        return torch.Generator().manual_seed(hash((self.seed, self.global_step, batch_idx, self.global_rank)) % 2**63)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Eval loss at fixed timestep quantiles with noise from a fixed generator: comparable across runs."""
        latents = batch["latents"]
        generator = torch.Generator().manual_seed(batch_idx)
        name = self.eval_names[dataloader_idx] if self.eval_names else "eval"
        losses = []
        for q in EVAL_QUANTILES:
            noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
            t = self.timesteps.at_quantiles(torch.full((latents.shape[0],), q), self.image_seq_len(latents))
            loss = self.forward_loss(batch, t, noise)
            self.log(f"{name}/loss_quantile_{q:.2f}", loss, add_dataloader_idx=False, sync_dist=True)
            losses.append(loss)
        self.log(f"{name}/loss", torch.stack(losses).mean(), add_dataloader_idx=False, sync_dist=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", whole_tensor(torch.nn.utils.get_total_norm(grads)))

    def configure_optimizers(self):
        lrs = self.part_learning_rates()
        groups = [g for name, part in self.model_parts().items() for g in _param_groups(part, lrs.get(name))]
        optimizer = self._make_optimizer([g for g in groups if g["params"]])
        scheduler = instantiate(self.scheduler_cfg)(optimizer, total_steps=self.total_optimizer_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        optimizer_kwargs = [k for k in self.optimizer_cfg if k != "gradient_release"]
        make_optimizer = instantiate(OmegaConf.masked_copy(self.optimizer_cfg, optimizer_kwargs))
        if self.optimizer_cfg.get("gradient_release"):
            return GradientReleaseOptimizer(groups, make_optimizer, self.trainer.accumulate_grad_batches)
        return make_optimizer(groups)

    def total_optimizer_steps(self) -> int:
        # Not trainer.estimated_stepping_batches: calling it here sets up the train loader before a resumed
        # checkpoint is restored, and Lightning then never restores the data position.
        trainer = self.trainer
        if trainer.max_steps > 0:
            return trainer.max_steps
        batches = len(trainer.datamodule.train_dataloader())
        return trainer.max_epochs * math.ceil(batches / trainer.accumulate_grad_batches)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # --- checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def export_weights(self, save_dtype: Optional[str] = None) -> dict[str, torch.Tensor]:
        """What `write_export` writes: the LoRA, or every part's weights, in `save_dtype`. Under FSDP every rank
        must call it (the shards are gathered) and only rank 0 gets the weights."""
        dtype = DTYPES[save_dtype] if save_dtype else None
        if self.is_lora:
            return self.lora_state_dict(dtype)
        state = {part_prefix(name) + key: tensor for name, part in self.model_parts().items()
                 for key, tensor in gathered_state_dict(part).items()}
        return {k: v.to(dtype) if dtype else v for k, v in state.items()}

    def write_export(self, weights: dict[str, torch.Tensor], out_dir: Path) -> None:
        if self.is_lora:
            write_adapter(self, weights, out_dir)
        else:
            self.export_full(weights, out_dir)

    @abstractmethod
    def base_model(self) -> str:
        """The base model the run trained on (its file or folder), as exported LoRA files record it."""

    @property
    def family_name(self) -> str:
        return f"{type(self).__module__}.{type(self).__qualname__}"

    def lora_metadata(self) -> dict[str, str]:
        """What every exported LoRA file records about its run (safetensors metadata, `difftrain.*`): the base
        model, the family, rank and alpha, the steps and epochs done (an epoch cut short by max_steps counts), the
        bucket sizes trained (most used first) and the number of dataset items."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None)
        facts = {"base_model": self.base_model(), "family": self.family_name, "rank": self.adapter_cfg.rank,
                 "alpha": self.lora_alpha, "steps": trainer.global_step if trainer else 0,
                 "epochs": trainer.fit_loop.epoch_progress.current.processed if trainer else 0,
                 "resolutions": ", ".join(datamodule.trained_sizes()) if datamodule else "",
                 "dataset_size": datamodule.num_items if datamodule else 0}
        return {f"difftrain.{key}": str(value) for key, value in facts.items()}

    def lora_state_dict(self, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """PEFT LoRA weights of every part that has one, under diffusers/transformers module names (a text
        encoder's under '<part name>.'). With fold_lora_scale, alpha/rank is folded into lora_B so every consumer
        (diffusers, ComfyUI, kohya loaders) applies the trained scale without reading any metadata; without it
        the weights are as trained and the family's format carries alpha (kohya's .alpha tensors)."""
        scale = self.lora_alpha / self.adapter_cfg.rank if self.fold_lora_scale else 1.0
        out = {}
        for name, part in self.model_parts().items():
            if not any(isinstance(m, BaseTunerLayer) for m in part.modules()):
                continue  # a frozen part
            weights = gathered_state_dict(part, trainable_only=True)
            for key, tensor in get_peft_model_state_dict(part, weights, adapter_name="default").items():
                tensor = tensor.detach() * scale if ".lora_B." in key else tensor.detach()
                out[part_prefix(name) + key] = tensor.to(dtype or tensor.dtype).contiguous()
        return out


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: Optional[torch.Tensor] = None,
                 loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The mean over samples of each sample's MSE, times its weight when the schedule gives weights. With a
    `loss_mask` [B, h, w] (dataset.mask_path, on the latent grid; every channel and frame alike), each sample's
    MSE is its mask-weighted mean: an all-black mask makes it 0, with no gradient. A mask with more trailing dims
    ([B, F, h, w]: LTX-Video's first-frame conditioning) weights those too."""
    errors = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if loss_mask is None:
        per_sample = errors.flatten(1).mean(1)
    else:
        mask = loss_mask.to(errors).view(len(errors), *[1] * (errors.ndim - loss_mask.ndim), *loss_mask.shape[1:])
        mask = mask.expand_as(errors).flatten(1)
        per_sample = (errors.flatten(1) * mask).sum(1) / mask.sum(1).clamp(min=1e-8)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()


def skeleton(model_cls: type, config: dict) -> torch.nn.Module:
    """A diffusers model class built from its config with every weight on the meta device."""
    with init_empty_weights():
        return model_cls.from_config(config)


def pad_sequences(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[L_i, ...] tensors -> (zero-padded [B, max L_i, ...], bool mask [B, max L_i], True at the real entries)."""
    padded = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)
    lengths = torch.tensor([len(t) for t in tensors])
    return padded, torch.arange(padded.shape[1]) < lengths[:, None]


def _param_groups(part: torch.nn.Module, lr: Optional[float]) -> list[dict[str, Any]]:
    """A part's trainable parameters: decayed matrices, undecayed biases and norms, at the part's lr if set."""
    own_lr = {} if lr is None else {"lr": lr}
    params = [p for p in part.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], **own_lr},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, **own_lr}]

