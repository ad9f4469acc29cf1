"""Train a diffusion model: `python train.py model=flux model.diffusers_path=... dataset.path=...`.
With no arguments: the built-in demo (LoRA on a tiny Flux, bundled images, CPU)."""
import hydra
from omegaconf import DictConfig

import src.config  # noqa: F401  (registers the ${project_root:} resolver)
from src.training import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
