"""Block swap: the last N transformer blocks keep their frozen base weights in (pinned) CPU memory and visit the
accelerator only around their own forward and backward, so a model larger than the GPU can train a LoRA.

Forward: while block i runs, block i+1's weights are copied in on a side CUDA stream; a swapped block's weights
are dropped as soon as it has run. Backward runs the same schedule in reverse: a tensor hook on block i's outputs
fires when backward reaches block i; it drops block i+1, makes block i resident and prefetches block i-1. The
last block stays resident from its forward to its backward, the first thing backward needs. LoRA weights (names
containing "lora_") never move. The CPU copy is the weights' truth: base weights are frozen, so dropping a device
copy needs no copy back (fp8 layerwise-casting hooks may replace a resident copy by a recast one of the same
values; it is dropped all the same).

Installed by DiffusionModule.configure_model, before Lightning moves the module to the device: a Lightning
Callback has no hook between the two, and the move itself must leave these weights in CPU memory
(see `kept_in_place`). Without CUDA the same schedule runs and each copy is a no-op, so it can be tested on CPU."""
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Optional

import torch
from torch.autograd.graph import register_multi_grad_hook


@dataclass
class SwappedTensor:
    """A base weight (or buffer) of a swapped block: `registry[name] is tensor`, its CPU copy in `cpu`."""
    registry: dict[str, Optional[torch.Tensor]]  # the owning module's _parameters or _buffers
    name: str
    tensor: torch.Tensor
    cpu: torch.Tensor


class BlockSwap:
    def __init__(self, blocks: list[torch.nn.Module], count: int):
        self.num_blocks = len(blocks)
        first_swapped = self.num_blocks - count
        self.swapped = {i: swapped_tensors(blocks[i]) for i in range(first_swapped, self.num_blocks)}
        self.loaded: dict[int, Optional[torch.cuda.Event]] = {}  # swapped blocks on the device; event: copy in flight
        self.device = torch.device("cpu")
        self.copy_stream: Optional[torch.cuda.Stream] = None
        self.compute_stream: Optional[torch.cuda.Stream] = None
        self.recomputing = False
        self.trace: Optional[list[tuple[str, str, int]]] = None  # a list: (phase, "load"/"evict", block) appended
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(partial(self._before_forward, i), with_kwargs=True)
            if i >= first_swapped - 1:  # the block before the first swapped one drops it in backward
                block.register_forward_hook(partial(self._after_forward, i))

    # --- forward
    def _before_forward(self, index: int, block: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self.recomputing:
            return
        if index == 0:
            # Weights left behind by a forward whose backward never came, or by a backward that ended before the
            # block ahead of the first swapped one (nothing before it trains).
            for loaded in list(self.loaded):
                self._evict(loaded, "forward")
        self._follow_device(tensors_in(args, kwargs)[0].device)
        self._make_resident(index, "forward")
        self._prefetch(index + 1, "forward")

    def _after_forward(self, index: int, block: torch.nn.Module, args: tuple, output: Any) -> None:
        if self.recomputing:
            return
        outputs = [t for t in tensors_in(output) if t.requires_grad]
        if outputs:
            register_multi_grad_hook(outputs, partial(self._before_backward, index), mode="any")
        if not (outputs and index == self.num_blocks - 1):
            self._evict(index, "forward")

    # --- backward
    def _before_backward(self, index: int, _grad: torch.Tensor) -> None:
        # The autograd engine runs ready nodes latest-created first, so backward reaches this block's first node
        # only once every node of the block after it is done.
        self._evict(index + 1, "backward")
        self._make_resident(index, "backward")
        self._prefetch(index - 1, "backward")

    @contextmanager
    def recompute(self) -> Iterator[None]:
        """Wraps an activation-checkpointed block's recompute in backward: its weights are already resident."""
        self.recomputing = True
        try:
            yield
        finally:
            self.recomputing = False

    # --- moves
    def _follow_device(self, device: torch.device) -> None:
        """Weights go where the activations are; a CUDA device gets its side stream once."""
        if device != self.device:
            self.device = device
            self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if device.type == "cuda":
            self.compute_stream = torch.cuda.current_stream(device)

    def _prefetch(self, index: int, phase: str) -> None:
        """Start copying block `index`'s weights to the device, if it is swapped and not there yet."""
        if index not in self.swapped or index in self.loaded:
            return
        if self.trace is not None:
            self.trace.append((phase, "load", index))
        if self.copy_stream is None:
            self.loaded[index] = None
            return
        # inference_mode(False): copies made during validation (inference mode) must stay usable by autograd.
        with torch.inference_mode(False), torch.cuda.stream(self.copy_stream):
            for swapped in self.swapped[index]:
                swapped.tensor.data = swapped.cpu.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        self.loaded[index] = copied

    def _make_resident(self, index: int, phase: str) -> None:
        self._prefetch(index, phase)
        copied = self.loaded.get(index)
        if copied is not None:
            self.compute_stream.wait_event(copied)
            for swapped in self.swapped[index]:
                # Allocated on the copy stream, used on the compute stream: not reusable before that use ends.
                swapped.tensor.data.record_stream(self.compute_stream)
            self.loaded[index] = None

    def _evict(self, index: int, phase: str) -> None:
        if index not in self.loaded:
            return
        if self.trace is not None:
            self.trace.append((phase, "evict", index))
        for swapped in self.swapped[index]:
            swapped.tensor.data = swapped.cpu
        del self.loaded[index]

    @contextmanager
    def kept_in_place(self) -> Iterator[None]:
        """Hides the swapped weights from their modules while the model around them is moved (module.to(device)),
        so they stay in CPU memory instead of all landing on the device at once."""
        every = [swapped for tensors in self.swapped.values() for swapped in tensors]
        for swapped in every:
            swapped.registry[swapped.name] = None
        try:
            yield
        finally:
            for swapped in every:
                swapped.registry[swapped.name] = swapped.tensor


def swapped_tensors(block: torch.nn.Module) -> list[SwappedTensor]:
    """The block's weights and buffers except LoRA's, each re-pointed at a CPU copy (pinned where CUDA is)."""
    found = []
    for module_name, module in block.named_modules():
        for registry in (module._parameters, module._buffers):
            for name, tensor in registry.items():
                if tensor is None or "lora_" in f"{module_name}.{name}":
                    continue
                if tensor.requires_grad:
                    raise ValueError(f"{module_name}.{name} is trainable: block swap only moves frozen base "
                                     f"weights (the base model under a LoRA).")
                cpu = tensor.detach().cpu()
                cpu = cpu.pin_memory() if torch.cuda.is_available() else cpu
                tensor.data = cpu
                found.append(SwappedTensor(registry, name, tensor, cpu))
    return found


def tensors_in(*values: Any) -> list[torch.Tensor]:
    """The tensors in (nested tuples, lists and dicts of) values, in order."""
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            found += tensors_in(*value)
        elif isinstance(value, dict):
            found += tensors_in(*value.values())
    return found
