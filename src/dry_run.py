"""`python train.py ... dry_run=true`: what a run would do, in seconds, without loading (or building) any model.

It scans and buckets the dataset as training would (the datamodule's own plan), counts the cache entries present and
missing under the family's encoder fingerprints (computed from file sizes and samples), lists every skipped file
with its reason, derives the steps from the trainer keys, and estimates the denoiser's weight memory from its
skeleton on the meta device (config and safetensors headers only) for the chosen dtype, fp8 storage and block swap.
"""
import math
import re
from collections import defaultdict
from typing import Any

import torch
from omegaconf import DictConfig

from difftrain.datamodules.buckets import padding
from difftrain.datamodules.datamodule import Sample
from difftrain.tiny import without_building

# The layers diffusers' layerwise casting stores in fp8 (model.transformer_dtype); all else stays in the compute dtype.
FP8_STORED_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
                     torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
DEFAULT_MAX_EPOCHS = 1000  # Lightning's, when neither max_steps nor max_epochs is set


def dry_run(cfg: DictConfig) -> str:
    """The report of a validated config (printed by train.py)."""
    from hydra.utils import instantiate

    from difftrain.training import build_module

    with without_building():
        module = build_module(cfg)
        datamodule = instantiate(cfg.dataset, eval_datasets=cfg.eval_datasets, seed=cfg.seed, _convert_="all")
        fingerprints, unknown_cache = cache_fingerprints(module)
        train, evals = datamodule.plan(module, fingerprints, save_probes=False)
        memory = weight_memory_line(module)
    world = _world_size(cfg.trainer)
    global_batch = cfg.dataset.batch_size * world
    lines = [f"Dry run of {module.family_name} (no model loaded)", *bucket_table(train, global_batch),
             padding_line(train, global_batch)]
    lines += schedule_lines(cfg.trainer, cfg.dataset.batch_size, world, _batches(train, global_batch))
    lines += [f"Eval set {name}: {len(samples)} samples" for name, samples in evals.items()]
    lines += cache_lines(datamodule.cache_root / module.cache_name, [s for ss in (train, *evals.values()) for s in ss],
                         unknown_cache)
    lines += [f"Skipped {len(datamodule.skipped)} file(s)" + (":" if datamodule.skipped else "")]
    lines += [f"  {skip.path}: {skip.reason}" for skip in datamodule.skipped]
    return "\n".join([*lines, memory])


def cache_fingerprints(module) -> tuple[tuple[str, str], str]:
    """The family's encoder fingerprints, or placeholders (nothing counts as cached) and why they are unknown."""
    try:
        return module.cache_fingerprints(), ""
    except (FileNotFoundError, OSError, ValueError) as error:
        return ("unknown", "unknown"), str(error)


def _by_bucket(samples: list[Sample]) -> dict[tuple, list[Sample]]:
    by_bucket = defaultdict(list)
    for sample in samples:
        by_bucket[sample.bucket].append(sample)
    return by_bucket


def bucket_table(samples: list[Sample], global_batch: int) -> list[str]:
    by_bucket = _by_bucket(samples)
    items = len({s.item.path for s in samples})
    rows = [f"Dataset: {items} items, {len(samples)} samples (repeats included), {len(by_bucket)} bucket(s)",
            f"  {'bucket WxH':>12} {'frames':>6} {'controls':>8} {'items':>6} {'repeats':>7} {'samples':>7} "
            f"{'batches':>7}"]
    for (width, height, frames, controls), bucket in sorted(by_bucket.items()):
        distinct = len({s.item.path for s in bucket})
        rows.append(f"  {f'{width}x{height}':>12} {frames:>6} {controls:>8} {distinct:>6} {len(bucket) / distinct:>7g} "
                    f"{len(bucket):>7} {math.ceil(len(bucket) / global_batch):>7}")
    return rows


def padding_line(samples: list[Sample], global_batch: int) -> str:
    """How many samples repeat to fill whole batches (BucketBatchSampler's padding), and in how many buckets a
    batch must hold a sample twice."""
    buckets = _by_bucket(samples).values()
    repeated = sum(padding(len(bucket), global_batch) for bucket in buckets)
    too_few = sum(len({s.latent_path for s in bucket}) < global_batch for bucket in buckets)
    line = f"Padding: {repeated} sample(s) repeated to fill whole batches of {global_batch}"
    if too_few:
        line += f"; {too_few} bucket(s) hold fewer than {global_batch} distinct samples, so their batches repeat some"
    return line


def _batches(samples: list[Sample], global_batch: int) -> int:
    """Batches per epoch, as BucketBatchSampler draws them (each bucket padded to whole global batches)."""
    counts = defaultdict(int)
    for sample in samples:
        counts[sample.bucket] += 1
    return sum(math.ceil(n / global_batch) for n in counts.values())


def schedule_lines(trainer: DictConfig, batch_size: int, world: int, batches: int) -> list[str]:
    accumulate = trainer.accumulate_grad_batches
    per_epoch = math.ceil(batches / accumulate)
    max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
    if max_steps is None and max_epochs is None:
        max_epochs = DEFAULT_MAX_EPOCHS
    limits = {f"trainer.max_steps={max_steps}": max_steps,
              f"trainer.max_epochs={max_epochs}": None if max_epochs is None else max_epochs * per_epoch}
    reason, total = min(((k, v) for k, v in limits.items() if v is not None), key=lambda kv: kv[1])
    return [f"Steps: {batches} batch(es) of {batch_size} x {world} process(es) per epoch, accumulate "
            f"{accumulate} -> {per_epoch} optimizer step(s) per epoch",
            f"Total: {total} step(s) = {total / per_epoch:.3g} epoch(s) (set by {reason})"]


def cache_lines(root, samples: list[Sample], unknown: str) -> list[str]:
    from difftrain.datamodules.cache import EmbeddingCache

    latents = {s.latent_path for s in samples}
    texts = {text.path for s in samples for text in s.texts}  # every shuffled variant
    cached_latents = sum(EmbeddingCache.has(p) for p in latents)
    cached_texts = sum(EmbeddingCache.has(p) for p in texts)
    lines = [f"Cache {root}: latents {cached_latents} cached, {len(latents) - cached_latents} to encode; "
             f"captions {cached_texts} cached, {len(texts) - cached_texts} to encode"]
    if unknown:
        lines.append(f"  (encoder fingerprints unknown, so everything counts as to encode: {unknown})")
    return lines


def weight_memory_line(module) -> str:
    try:
        denoiser = module.denoiser_skeleton()
    except (NotImplementedError, FileNotFoundError, OSError, ValueError, KeyError) as error:
        return f"Denoiser weights: no estimate ({error})"
    memory = weight_memory(module, denoiser)
    storage = f", fp8 storage {module.storage_dtype}".replace("torch.", "") if module.storage_dtype else ""
    swap = f", {module.blocks_to_swap} block(s) swapped" if module.blocks_to_swap else ""
    dtype = str(module.compute_dtype).removeprefix("torch.")
    return (f"Denoiser weights ({type(denoiser).__name__}, {memory['parameters'] / 1e6:.4g}M parameters, {dtype}"
            f"{storage}{swap}): {human_bytes(memory['total'])} in all, {human_bytes(memory['device'])} on the GPU, "
            f"{human_bytes(memory['cpu'])} in CPU memory")


def weight_memory(module, denoiser: torch.nn.Module) -> dict[str, Any]:
    """Bytes of the denoiser's weights as training stores them: the compute dtype, fp8 for the layers layerwise
    casting stores so (model.transformer_dtype, but the family's keep_in_high_precision), and the last
    `blocks_to_swap` blocks in CPU memory (one of them on the GPU at a time, while it runs)."""
    keep = [re.compile(pattern) for pattern in module.keep_in_high_precision]
    compute = torch.empty((), dtype=module.compute_dtype).element_size()
    stored = torch.empty((), dtype=module.storage_dtype).element_size() if module.storage_dtype else compute
    sizes = {}
    for name, layer in denoiser.named_modules():
        fp8 = isinstance(layer, FP8_STORED_LAYERS) and not any(p.search(name) for p in keep)
        for param in layer.parameters(recurse=False):
            sizes[id(param)] = param.numel() * (stored if fp8 else compute)
    blocks = [block for name in module.block_lists for block in getattr(denoiser, name)]
    swapped = [sum(sizes[id(p)] for p in block.parameters()) for block in blocks[len(blocks) - module.blocks_to_swap:]]
    total = sum(sizes.values())
    return {"parameters": sum(p.numel() for p in denoiser.parameters()), "total": total,
            "device": total - sum(swapped) + max(swapped, default=0), "cpu": sum(swapped)}


def human_bytes(count: int) -> str:
    unit = min(int(math.log(max(count, 1), 1024)), 3)
    return f"{count / 1024 ** unit:.3g} {('B', 'KiB', 'MiB', 'GiB')[unit]}"


def _world_size(trainer: DictConfig) -> int:
    devices = trainer.devices if isinstance(trainer.devices, int) and trainer.devices > 0 else 1
    return devices * (trainer.num_nodes or 1)
