"""Lightning checkpoints written through the project's one atomic writer, and read without running pickled code."""
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from difftrain.utils.atomic import replacing


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        """A crash or a full disk never truncates a good checkpoint nor leaves a partial temp file."""
        with replacing(Path(path)) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, *args, weights_only=None, **kwargs):
        """Always weights_only: a checkpoint is data (tensors, numbers, strings), never code to run, whatever
        TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says."""
        return super().load_checkpoint(path, *args, weights_only=True, **kwargs)
