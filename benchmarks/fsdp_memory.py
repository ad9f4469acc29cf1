"""Parameter + optimizer-state bytes per rank of a full fine-tune: trainer=fsdp (FSDP2) vs DDP, in one run.

Two processes on CPU (gloo) each build the module twice through its real configure_model: as DDP keeps it (whole
weights on every rank) and as trainer=fsdp shards it (the strategy's one-dimensional data-parallel mesh). Both
get AdamW (the default optimizer) and one step on zero gradients, which creates its states; then each rank counts
the bytes it holds of trainable weights and optimizer states (a DTensor's local shard). Gradients are not counted.
Expect FSDP/DDP ~= 1/ranks (0.5 at 2 ranks), a little above from the padding of uneven shards. See
benchmarks/README.md."""
import argparse
import os
import socket
import tempfile
from pathlib import Path

from _common import compose_config, instantiate_module, print_table, quiet, verdict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from difftrain.tiny import flux as tiny_flux
from difftrain.tiny import tiny_model_dir

TARGET_RATIO = 0.55  # 1/2 at 2 ranks, with room for shard padding


def held_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes this rank stores: a DTensor's local shard, any other tensor whole."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def weights_and_optimizer_bytes(module) -> int:
    params = module.trainable_parameters()
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer = torch.optim.AdamW(params)
    optimizer.step()
    states = [t for state in optimizer.state.values() for t in state.values() if t.ndim > 0]
    return held_bytes(params) + held_bytes(states)


def measure(rank: int, world: int, port: int, overrides: list[str], results) -> None:
    quiet()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(Path(tmp) / "run", "adapter=none", *overrides)
        ddp = instantiate_module(cfg)
        ddp.configure_model()
        fsdp = instantiate_module(cfg)
        fsdp._device_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))  # as the strategy
        fsdp.configure_model()
        results[rank] = (weights_and_optimizer_bytes(ddp), weights_and_optimizer_bytes(fsdp))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="config overrides (default: the tiny test Flux)")
    args = parser.parse_args()
    tiny_model_dir("flux", tiny_flux.build)  # built once here, not by every rank at once
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(measure, args=(args.ranks, free_port(), args.overrides, results), nprocs=args.ranks)
        rows = [(rank, ddp, fsdp, fsdp / ddp) for rank, (ddp, fsdp) in sorted(results.items())]
    print_table(f"Trainable weights + AdamW states per rank, full fine-tune, {args.ranks} ranks",
                ["rank", "DDP bytes", "FSDP bytes", "FSDP/DDP"], rows)
    ratio = max(row[3] for row in rows)
    print(f"\nratio FSDP/DDP (largest rank): {ratio:.3f} {verdict(ratio, TARGET_RATIO)}")


if __name__ == "__main__":
    main()
