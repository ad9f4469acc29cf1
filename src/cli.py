"""The `difftrain` command (and train.py, which calls it): `difftrain model=flux model.diffusers_path=...
dataset.path=...`. With no arguments: the built-in demo (LoRA on a tiny Flux, bundled images, CPU)."""
import os
from typing import Optional

import hydra
from hydra.errors import CompactHydraException, ConfigCompositionException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from difftrain.config import CONFIG_DIR
from difftrain.config.validate import ConfigError, unknown_key_error
from difftrain.training import TrainingRun, run
from difftrain.utils.sweep_jobs import require_objective, single_run_command


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def train(cfg: DictConfig) -> Optional[float]:
    """Returns the eval loss: the objective a sweeper minimises (`hparams_search=lora_optuna`)."""
    try:
        require_objective(cfg)
        with single_run_command():
            result = run(cfg)
    except ConfigError as error:  # the user's to fix: the message alone, no traceback
        raise SystemExit(f"Error: {error}") from None
    return eval_loss(result) if result else None


def eval_loss(result: TrainingRun) -> Optional[float]:
    """The mean loss over the eval datasets at their last evaluation; None without eval_datasets."""
    metrics = result.trainer.callback_metrics
    losses = [float(metrics[f"{name}/loss"]) for name in result.datamodule.eval_names if f"{name}/loss" in metrics]
    return sum(losses) / len(losses) if losses else None


def main() -> None:
    """`train`, with the errors Hydra finds in the command line shown as ours: an override of a key the config does
    not have (`model.diffuser_path=/x`) gets the "did you mean" of an unknown key in a config file."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors to us instead of printing them itself
    try:
        train()
    except CompactHydraException as error:
        raise SystemExit(f"Error: {_command_line_error(error)}") from None


def _command_line_error(error: CompactHydraException) -> str:
    cause = error.__cause__
    if isinstance(error, ConfigCompositionException) and isinstance(cause, (ConfigAttributeError, ConfigKeyError)) \
            and cause.parent_node is not None:
        return str(unknown_key_error(cause.parent_node, cause.full_key))
    return f"{error}\n{cause}" if isinstance(cause, OmegaConfBaseException) else str(error)  # as Hydra prints it
