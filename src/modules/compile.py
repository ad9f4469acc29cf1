"""Regional compilation (model.compile=true): `torch.compile` of each transformer block's forward, as diffusers'
`compile_repeated_blocks`. Blocks of one class run the same code object, and torch inlines module attributes as
graph inputs, so they share one compiled graph: a compile costs a few blocks, not the whole denoiser.

The compiled forward is the block's innermost call: LoRA layers and fp8 casting hooks (inside the block) are
traced into it; activation checkpointing (which wraps `block.forward` afterwards) and block swap (module hooks,
run by `block.__call__`) stay eager around it, so their device copies, grad hooks and recompute context never
enter a graph.

Shapes: torch's automatic dynamic shapes (`dynamic=None`). The first bucket compiles a graph specialised to its
sizes; the first different bucket recompiles once with the sizes that changed made symbolic, and every later
bucket reuses that graph: at most two compiles per block class, however many buckets."""
import torch


def compile_blocks(blocks: list[torch.nn.Module]) -> None:
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=True)
