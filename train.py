"""Train a diffusion model: `python train.py model=flux model.diffusers_path=... dataset.path=...`.
With no arguments: the built-in demo (LoRA on a tiny Flux, bundled images, CPU)."""
import hydra
from omegaconf import DictConfig

import src.config  # noqa: F401  (registers the ${project_root:} resolver)
from src.config.validate import ConfigError
from src.training import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as error:  # the user's to fix: the message alone, no traceback
        raise SystemExit(f"Error: {error}") from None


if __name__ == "__main__":
    main()
