"""Config composition helpers shared by train.py, scripts and tests: the `${project_root:}` resolver and
validation of the composed config against typed schemas (see `schema.py`)."""
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


register_resolvers()
