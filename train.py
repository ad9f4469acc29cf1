"""Train a diffusion model: `python train.py model=flux model.diffusers_path=... dataset.path=...`.
With no arguments: the built-in demo (LoRA on a tiny Flux, bundled images, CPU)."""
import os

import hydra
from hydra.errors import CompactHydraException, ConfigCompositionException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

import src.config  # noqa: F401  (registers the ${project_root:} resolver)
from src.config.validate import ConfigError, unknown_key_error
from src.training import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as error:  # the user's to fix: the message alone, no traceback
        raise SystemExit(f"Error: {error}") from None


def cli() -> None:
    """`main`, with the errors Hydra finds in the command line shown as ours: an override of a key the config does
    not have (`model.diffuser_path=/x`) gets the "did you mean" of an unknown key in a config file."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors to us instead of printing them itself
    try:
        main()
    except CompactHydraException as error:
        raise SystemExit(f"Error: {_command_line_error(error)}") from None


def _command_line_error(error: CompactHydraException) -> str:
    cause = error.__cause__
    if isinstance(error, ConfigCompositionException) and isinstance(cause, (ConfigAttributeError, ConfigKeyError)) \
            and cause.parent_node is not None:
        return str(unknown_key_error(cause.parent_node, cause.full_key))
    return f"{error}\n{cause}" if isinstance(cause, OmegaConfBaseException) else str(error)  # as Hydra prints it


if __name__ == "__main__":
    cli()
