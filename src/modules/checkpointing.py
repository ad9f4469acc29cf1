"""Activation checkpointing per block: each of the family's blocks (its `block_lists`, or
`checkpointed_blocks()`) gets a forward that runs under torch's checkpoint while gradients are on, so any model
works, diffusers' or our own, with no mixin.

`true`: torch's non-reentrant checkpoint; a block keeps only its inputs and recomputes the rest in backward.
'offload': the same, and the inputs it keeps wait in CPU memory until the recompute (the reference trainer's
'unsloth' mode). Non-reentrant checkpoint saves a block's positional tensor inputs as saved tensors of the
enclosing scope, so torch's `save_on_cpu` hooks around it move exactly those, and nothing saved inside the
block, which is recomputed. Keyword arguments are therefore bound to positions first."""
import inspect
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any, Callable, Optional

import torch
from torch.autograd.graph import save_on_cpu
from torch.utils.checkpoint import checkpoint


def checkpoint_blocks(blocks: list[torch.nn.Module], offload: bool = False,
                      recompute_context: Optional[Callable[[], AbstractContextManager]] = None) -> None:
    """Make every block recompute its activations in backward; the recompute runs inside `recompute_context()`
    where one is given. The block is still called through its module hooks (block swap's) on the first forward
    only."""
    for block in blocks:
        forward = block.forward
        block.forward = partial(_checkpointed, forward, inspect.signature(forward), offload, recompute_context)


def _checkpointed(forward: Callable, signature: inspect.Signature, offload: bool,
                  recompute_context: Optional[Callable[[], AbstractContextManager]], *args: Any,
                  **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    bound = signature.bind(*args, **kwargs)
    context = {} if recompute_context is None else {"context_fn": lambda: (nullcontext(), recompute_context())}
    saved_inputs = save_on_cpu(pin_memory=torch.cuda.is_available()) if offload else nullcontext()
    with saved_inputs:
        return checkpoint(forward, *bound.args, use_reentrant=False, **context, **bound.kwargs)
