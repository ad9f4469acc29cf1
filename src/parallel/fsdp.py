"""FSDP2 through Lightning's ModelParallelStrategy: every process keeps 1/world_size of each weight, its gradient
and its optimizer state; a block's weights are gathered just before it runs and freed after (forward and backward).

`FullyShardedStrategy` (trainer=fsdp) builds the device mesh; the module shards itself in configure_model with
`shard_parts`: each transformer block, then each part (denoiser, trained text encoders) as the root that holds
what no block does. A part left unsharded would train separately on every rank, so `shard_parts` refuses to
finish while any trainable weight is not sharded."""
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint import load as load_distributed
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from difftrain.utils.atomic import replace_directory, temp_sibling


class FullyShardedStrategy(ModelParallelStrategy):
    """ModelParallelStrategy with every process of every node on the data-parallel dimension of the mesh (no tensor
    parallelism). Checkpoints are sharded folders (one file per rank) holding the trainable weights only, like every
    other checkpoint of ours; resuming loads them into the sharded module and optimizer."""

    def __init__(self, **kwargs: Any):
        super().__init__(tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str, storage_options: Any = None) -> None:
        """Every rank writes its shard into one temp folder; once all have, rank 0 swaps it in whole. A crash
        mid-save leaves the previous checkpoint in place (and a stale temp the next start removes)."""
        path = Path(self.broadcast(str(filepath)))
        filling = Path(self.broadcast(str(temp_sibling(path))))
        super().save_checkpoint(checkpoint, filling, storage_options)
        self.barrier("checkpoint shards written")
        if self.is_global_zero:
            replace_directory(filling, path)
        self.barrier("checkpoint in place")

    def load_checkpoint(self, checkpoint_path: str, weights_only: Optional[bool] = None) -> dict[str, Any]:
        # Lightning's own loader asks the checkpoint for every weight, frozen base included (a LoRA's is not there).
        path = Path(self.broadcast(checkpoint_path))
        trainable_only = StateDictOptions(ignore_frozen_params=True)
        state = {"state_dict": get_model_state_dict(self.model, options=trainable_only),
                 **{f"optimizer_{i}": get_optimizer_state_dict(self.model, optimizer)
                    for i, optimizer in enumerate(self.optimizers)}}
        load_distributed(state, checkpoint_id=path)
        set_model_state_dict(self.model, state.pop("state_dict"), options=StateDictOptions(strict=False))
        for i, optimizer in enumerate(self.optimizers):
            set_optimizer_state_dict(self.model, optimizer, state[f"optimizer_{i}"])
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)


def shard_parts(parts: dict[str, torch.nn.Module], blocks: list[torch.nn.Module], mesh: DeviceMesh,
                compute_dtype: torch.dtype) -> None:
    """fully_shard each block, then each part. Weights are gathered in the compute dtype (model.dtype) and
    gradients reduced in float32, so the sharded master weights and optimizer keep their own precision."""
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    for part in parts.values():
        fully_shard(part, mesh=mesh, mp_policy=policy)
    unsharded = [f"{name}.{key}" for name, part in parts.items() for key, param in part.named_parameters()
                 if param.requires_grad and not isinstance(param, DTensor)]
    if unsharded:
        raise RuntimeError(f"FSDP left trainable weights unsharded (each rank would train its own copy): "
                           f"{unsharded[:5]}")


def gathered_state_dict(module: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with whole tensors. A sharded module's shards are gathered, a collective every rank
    must join; the whole tensors land in rank 0's CPU memory and the other ranks get an empty dict.
    `trainable_only` leaves frozen weights out of the gathering (a sharded module only)."""
    if not isinstance(module, FSDPModule):
        return module.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(module, options=options)


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) result gathered whole, e.g. a gradient norm; any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
