"""Regional compilation (model.compile=true): `torch.compile` of each transformer block's forward, as diffusers'
`compile_repeated_blocks`. Blocks of one class run the same code object, and torch inlines module attributes as
graph inputs, so they share one compiled graph: a compile costs a few blocks, not the whole denoiser. The
denoiser's other top-level modules (embedders, final norm; not single torch layers) are compiled as regions of
their own: small graphs, which took 1-5% off the step time of blocks alone on the small Flux of
benchmarks/compile_regions.py (measured while its single Linear layers were regions too).
model.compile=whole compiles the denoiser's forward as one graph instead: faster steps (0.94 of regional on that
Flux), a compile that traces every block, and no block swap, checkpointing or FSDP, which would be inside it.

The compiled forward is the block's innermost call: LoRA layers and fp8 casts (inside the block) are traced into
it; activation checkpointing (which wraps `block.forward` afterwards) and block swap (module hooks, run by
`block.__call__`) stay eager around it, so their device copies, grad hooks and recompute context never enter a
graph.

Shapes: torch's automatic dynamic shapes (`dynamic=True`): the sizes are symbolic from the first compile, so every
bucket reuses the graph it compiled.

fp8 storage: diffusers' layerwise casting swaps a layer's weights to the compute dtype and back around each call
(`module.to`); traced into a graph that swap is lost, and the compiled backward multiplies by the stored fp8
weight. Inside compiled blocks each layer instead keeps its fp8 weights and its forward casts copies of them, an
op the graph holds (`cast_in_graph`); layerwise casting handles the rest of the denoiser (none of it when the
whole denoiser is one graph)."""
import re
from functools import partial

import torch
import torch.nn.functional as F

CAST_IN_GRAPH = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
# What diffusers' layerwise casting would store in fp8 but a compiled block cannot (no forward written for it here)
OTHER_CAST_LAYERS = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d,
                     torch.nn.Embedding)


def compile_regions(regions: list[torch.nn.Module], autotune: bool = False) -> None:
    """`autotune` (model.compile=max-autotune): inductor also times candidate matmul kernels and keeps the fastest,
    without CUDA graphs (block swap moves weights between steps, and shapes change between buckets)."""
    mode = "max-autotune-no-cudagraphs" if autotune else None
    for region in regions:
        region.forward = torch.compile(region.forward, dynamic=True, mode=mode)


def regions_outside_blocks(denoiser: torch.nn.Module, blocks: list[torch.nn.Module],
                           keep_patterns: tuple[str, ...] | None) -> list[torch.nn.Module]:
    """The denoiser's top-level modules that hold no block and are not a single torch layer. With low-precision
    storage (`keep_patterns`: the names that stay in the compute dtype), only those whose weights all stay: the
    others' layerwise casting would be traced into the graph (see the module docstring)."""
    block_ids = {id(block) for block in blocks}
    regions = []
    for name, child in denoiser.named_children():
        if type(child).forward is torch.nn.Module.forward:  # a container (ModuleList, ModuleDict): never called
            continue
        # A torch layer (Linear, Conv2d, GroupNorm) runs one kernel, so a graph of its own fuses nothing; and
        # torch compiles every such layer's forward through one shared frame, which recompiles for each layer.
        if type(child).__module__.startswith("torch.nn."):
            continue
        layers = list(child.named_modules(prefix=name))
        if any(id(layer) in block_ids for _, layer in layers):
            continue
        if keep_patterns is None or not any(_cast_when_stored_low(*named, keep_patterns) for named in layers):
            regions.append(child)
    return regions


def _cast_when_stored_low(name: str, layer: torch.nn.Module, keep_patterns: tuple[str, ...]) -> bool:
    """Whether low-precision storage casts this layer: a layer type diffusers' layerwise casting handles, whose
    name matches no `keep_patterns` regex."""
    return (isinstance(layer, (*CAST_IN_GRAPH, *OTHER_CAST_LAYERS))
            and not any(re.search(pattern, name) for pattern in keep_patterns))


def cast_in_graph(denoiser: torch.nn.Module, blocks: list[torch.nn.Module], storage_dtype: torch.dtype,
                  compute_dtype: torch.dtype, keep_patterns: tuple[str, ...]) -> tuple[str, ...]:
    """Store the blocks' layers in `storage_dtype`, each computing in `compute_dtype` from a cast copy, except
    layers whose name matches a `keep_patterns` regex. Returns patterns matching exactly the blocks' names, for
    layerwise casting to skip."""
    wanted = {id(block) for block in blocks}
    names = [name for name, module in denoiser.named_modules() if id(module) in wanted]
    for block_name in names:
        for name, layer in denoiser.get_submodule(block_name).named_modules(prefix=block_name):
            if not _cast_when_stored_low(name, layer, keep_patterns):
                continue
            if isinstance(layer, OTHER_CAST_LAYERS):
                raise NotImplementedError(f"model.compile with fp8 storage: {name} ({type(layer).__name__}) "
                                          f"has no in-graph cast; set model.compile=false.")
            layer.to(storage_dtype)
            layer.forward = partial(_forward_from_cast_weights, layer, compute_dtype)
    return tuple(f"^{re.escape(name)}$" for name in names)


def _forward_from_cast_weights(layer: torch.nn.Module, compute_dtype: torch.dtype,
                               input: torch.Tensor) -> torch.Tensor:
    weight = layer.weight.to(compute_dtype)
    bias = None if layer.bias is None else layer.bias.to(compute_dtype)
    if isinstance(layer, torch.nn.Linear):
        return F.linear(input, weight, bias)
    return layer._conv_forward(input, weight, bias)
