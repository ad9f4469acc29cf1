"""The installable package: the `difftrain` command is `python train.py` from any directory, and the wheel carries
the package `difftrain` with its configs, the bundled examples and the command."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import ROOT

DIFFTRAIN = Path(sys.executable).with_name("difftrain")  # the console script this environment installed


def run_in(cwd: Path, *command: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_command_composes_what_train_py_composes(tmp_path):
    overrides = ("--cfg", "job", "adapter.rank=8", "optimizer=prodigy")
    command = run_in(tmp_path, str(DIFFTRAIN), *overrides).stdout
    script = run_in(tmp_path, sys.executable, str(ROOT / "train.py"), *overrides).stdout
    assert command == script
    assert "rank: 8" in command and "prodigy" in command.lower()


def test_command_from_another_directory_plans_the_demo_under_it(tmp_path):
    result = run_in(tmp_path, str(DIFFTRAIN), "dry_run=true")
    examples = ROOT / "data" / "examples" / "images"
    captioned = [f for f in examples.glob("*.jpg") if f.with_suffix(".txt").is_file()]
    assert f"{len(captioned)} item" in result.stdout, result.stdout  # the bundled images were found
    run_configs = list(tmp_path.glob("outputs/*/*/.hydra/config.yaml"))  # the run folder: under the cwd
    assert len(run_configs) == 1


def test_wheel_holds_the_package_configs_examples_and_command(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "multirun", "build",
                                                                "*.egg-info", "__pycache__", ".*cache"))
    run_in(source, sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "dist", ".")
    with zipfile.ZipFile(next((source / "dist").glob("difftrain-*.whl"))) as wheel:
        names = set(wheel.namelist())
        entry_points = "".join(wheel.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))

    def shipped(folder: str, pattern: str, prefix: str) -> set[str]:
        files = [p.relative_to(ROOT / folder) for p in (ROOT / folder).rglob(pattern) if p.is_file()]
        return {f"{prefix}/{f}" for f in files if not any(part.startswith((".", "__")) for part in f.parts[:-1])}

    assert shipped("src", "*.py", "difftrain") <= names  # every module, subpackages included
    assert shipped("conf", "*.yaml", "difftrain/conf") <= names
    assert shipped("data/examples", "*", "difftrain/data/examples") <= names
    assert shipped("src/formats/sdxl_configs", "*.json", "difftrain/formats/sdxl_configs") <= names
    assert "difftrain = difftrain.cli:main" in entry_points
    assert not any(n.startswith("src/") for n in names)
