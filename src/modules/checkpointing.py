"""Activation checkpointing per block, installed as diffusers' `gradient_checkpointing_func` (the model calls it as
`func(block, *args)` for each block while gradients are on).

`true`: torch's non-reentrant checkpoint; a block keeps only its inputs and recomputes the rest in backward.
'offload': the same, and the inputs it keeps wait in CPU memory until the recompute (the reference trainer's
'unsloth' mode). Non-reentrant checkpoint saves a block's positional tensor inputs as saved tensors of the
enclosing scope, so torch's `save_on_cpu` hooks around it move exactly those, and nothing saved inside the
block, which is recomputed."""
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch
from torch.autograd.graph import save_on_cpu
from torch.utils.checkpoint import checkpoint


def checkpoint_block(block: torch.nn.Module, *args: Any, offload: bool = False,
                     recompute_context: Callable[[], AbstractContextManager] = nullcontext) -> Any:
    """block(*args) under activation checkpointing; its recompute in backward runs inside `recompute_context()`."""
    saved_inputs = save_on_cpu(pin_memory=torch.cuda.is_available()) if offload else nullcontext()
    with saved_inputs:
        return checkpoint(block, *args, use_reentrant=False,
                          context_fn=lambda: (nullcontext(), recompute_context()))
