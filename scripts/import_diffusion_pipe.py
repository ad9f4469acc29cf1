"""Print (or write as conf/experiment/NAME.yaml) the Hydra experiment equivalent to a diffusion-pipe config:
`python scripts/import_diffusion_pipe.py config.toml [dataset.toml] [--write NAME]`. The logic lives in
src/config/diffusion_pipe.py."""
from difftrain.config.diffusion_pipe import main

if __name__ == "__main__":
    main()
