"""Config composition helpers shared by train.py, scripts and tests: the `${project_root:}` resolver and
validation of the composed config against typed schemas (see `schema.py`)."""
from pathlib import Path

from omegaconf import OmegaConf

from .naming import path_name, sweep_job_name

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the `difftrain` package: src/ in a checkout
# The folder holding conf/ and data/examples/: the checkout beside src/, or inside an installed package (the wheel
# ships them there, see setup.py).
PROJECT_ROOT = PACKAGE_DIR if (PACKAGE_DIR / "conf").is_dir() else PACKAGE_DIR.parent
CONFIG_DIR = PROJECT_ROOT / "conf"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("sweep_job_name"):
        OmegaConf.register_new_resolver("sweep_job_name", lambda num, overrides: sweep_job_name(num, overrides))
        OmegaConf.register_new_resolver("path_name", path_name)


register_resolvers()
