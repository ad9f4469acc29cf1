"""The folder src/ installs as the package `difftrain`; conf/ and data/ ship inside it (difftrain/conf,
difftrain/data), where `difftrain.config.PROJECT_ROOT` finds them. Everything else is in pyproject.toml."""
from setuptools import find_packages, setup

setup(
    packages=["difftrain", *(f"difftrain.{name}" for name in find_packages("src")), "difftrain.conf", "difftrain.data"],
    package_dir={"difftrain": "src", "difftrain.conf": "conf", "difftrain.data": "data"},
)
