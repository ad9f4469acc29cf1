"""Config composition helpers shared by train.py, scripts and tests: the `${project_root:}` resolver and
validation of the composed config against typed schemas (see `schema.py`)."""
from pathlib import Path

from omegaconf import OmegaConf

from .naming import path_name, sweep_job_name

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("sweep_job_name"):
        OmegaConf.register_new_resolver("sweep_job_name", lambda num, overrides: sweep_job_name(num, overrides))
        OmegaConf.register_new_resolver("path_name", path_name)


register_resolvers()
