"""Train a diffusion model: `python train.py model=flux model.diffusers_path=... dataset.path=...`, the same as the
installed `difftrain` command (src/cli.py). With no arguments: the built-in demo (LoRA on a tiny Flux, bundled
images, CPU)."""
from difftrain.cli import main

if __name__ == "__main__":
    main()
