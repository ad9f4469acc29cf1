"""A fresh machine (empty tiny-model cache): the step that runs before Lightning starts other processes builds every
tiny model a family reads, so nothing is built inside a process group (issue 13)."""
import pytest

from difftrain.tiny import CACHE_ENV, without_building
from difftrain.training import build_module
from tests.conftest import ROOT

FAMILY_CONFIGS = sorted(path.stem for path in (ROOT / "conf" / "model").glob("*.yaml"))


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_building_before_spawn_covers_everything_the_family_reads(family, make_config, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty-tiny-cache"))
    module = build_module(make_config(f"model={family}", "model.tiny=true"))
    module.build_tiny_models()
    with without_building():  # from here on, a tiny model not built yet raises
        module.cache_fingerprints()
        module.load_cache_encoders()
        module.load_denoiser()
