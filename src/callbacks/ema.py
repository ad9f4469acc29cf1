"""EMA of the trainable weights (`ema_decay`, `ema_every_n_steps`): torch's AveragedModel with its EMA update, over
the trainable parameters only (a LoRA's, not the frozen base). Every `ema_every_n_steps` optimizer steps
ema = decay * ema + (1 - decay) * weights; the first update copies the weights, as AveragedModel does. The average
keeps the weights' dtype and device.

The export callback writes the average beside the raw weights, in the same format. Its state is saved in every
checkpoint, so a resumed run continues the same average."""
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from lightning import Callback, LightningModule, Trainer
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class EMACallback(Callback):
    def __init__(self, decay: float, every_n_steps: int = 1):
        self.decay = decay
        self.every_n_steps = every_n_steps
        self.weights: Optional[torch.nn.ParameterList] = None  # the module's trainable parameters, not copies
        self.average: Optional[AveragedModel] = None
        self._checkpoint_state: Optional[dict[str, Any]] = None  # a resumed run's, loaded once the weights exist
        self._last_update_step = 0

    def on_train_start(self, trainer: Trainer, module: LightningModule) -> None:
        self._start(module)
        self._last_update_step = trainer.global_step  # a resumed run's checkpoint holds that step's update

    def _start(self, module: LightningModule) -> None:
        """After the weights are on their device and, when resuming, restored."""
        if self.average is not None:
            return
        self.weights = torch.nn.ParameterList(module.trainable_parameters())
        self.average = AveragedModel(self.weights, multi_avg_fn=get_ema_multi_avg_fn(self.decay))
        if self._checkpoint_state is not None:
            self.average.load_state_dict(self._checkpoint_state)

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, *args) -> None:
        step = trainer.global_step  # on_train_batch_end runs per micro-batch: update once per optimizer step
        if step % self.every_n_steps == 0 and step != self._last_update_step:
            self._last_update_step = step
            self.average.update_parameters(self.weights)

    def state_dict(self) -> dict[str, Any]:
        return self.average.state_dict() if self.average is not None else (self._checkpoint_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._checkpoint_state = state_dict

    def export_weights(self, module: LightningModule, save_dtype: Optional[str] = None) -> dict[str, torch.Tensor]:
        """What module.export_weights gives with the average in place of the weights."""
        self._start(module)  # a finished run resumed exports without training
        with self._swapped_in():
            return module.export_weights(save_dtype)

    @contextmanager
    def _swapped_in(self) -> Iterator[None]:
        pairs = list(zip(self.weights, self.average.module))
        for weight, average in pairs:
            weight.data, average.data = average.data, weight.data
        try:
            yield
        finally:
            for weight, average in pairs:
                weight.data, average.data = average.data, weight.data
