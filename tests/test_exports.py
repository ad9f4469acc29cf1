"""Exports a user drops into ComfyUI: flat LoRA files named for the run beside (or instead of) the export folders,
pruned to the newest save points, each carrying the run's metadata (base model, family, rank, alpha, steps, epochs,
sizes trained, dataset size) in every family's format; SDXL's kohya metadata names the size really trained."""
from safetensors import safe_open
from safetensors.torch import load_file

from difftrain.callbacks.export import export_name
from difftrain.training import run
from tests.conftest import EXAMPLE_IMAGES, compose_config

FAMILIES = {
    "flux": ("model=flux_tiny", "dataset.resolutions=[64]"),
    "sdxl": ("model=sdxl_tiny", "dataset.resolutions=[64]"),
}
LORA = ("adapter.rank=4", "adapter.alpha=8", "trainer.max_steps=2", "checkpoint_every_n_steps=null")


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_export_name_is_a_safe_file_name():
    assert export_name("lr=1e-4,rank=16") == "lr-1e-4_rank-16"
    assert export_name("my run/2") == "my_run_2"


def test_flat_files_beside_folders_pruned_to_the_newest_with_the_run_metadata(tmp_path):
    result = run(compose_config(tmp_path / "run", *FAMILIES["flux"], *LORA, "trainer.max_steps=3",
                                "save_every_n_steps=1", "keep_last_n_exports=2", "export_name=shapes v1"))
    exports = tmp_path / "run" / "exports"
    flat = sorted(p.name for p in exports.glob("*.safetensors"))
    assert flat == ["shapes_v1.safetensors", "shapes_v1_step00002.safetensors", "shapes_v1_step00003.safetensors"]
    assert sorted(p.name for p in exports.iterdir() if p.is_dir()) == ["final", "step2", "step3"]
    final_in_folder = result.final_export / "pytorch_lora_weights.safetensors"
    assert load_file(exports / "shapes_v1.safetensors").keys() == load_file(final_in_folder).keys()

    meta = metadata(exports / "shapes_v1.safetensors")
    images = len(list(EXAMPLE_IMAGES.glob("*.jpg")))
    assert meta["difftrain.family"] == "difftrain.modules.flux.FluxModule"
    assert (meta["difftrain.rank"], meta["difftrain.alpha"], meta["difftrain.steps"]) == ("4", "8", "3")
    assert meta["difftrain.dataset_size"] == str(images)
    assert meta["difftrain.resolutions"].split(", ")[0] == "64x64"
    assert meta["difftrain.base_model"] == str(result.module.model_dir)
    assert metadata(exports / "shapes_v1_step00002.safetensors")["difftrain.steps"] == "2"


def test_flat_layout_keeps_only_the_files_and_a_full_finetune_its_folder(tmp_path):
    run(compose_config(tmp_path / "lora", *FAMILIES["flux"], *LORA, "save_every_n_steps=1", "export_layout=flat"))
    assert sorted(p.name for p in (tmp_path / "lora" / "exports").iterdir()) == [
        "lora.safetensors", "lora_step00001.safetensors", "lora_step00002.safetensors"]
    run(compose_config(tmp_path / "full", *FAMILIES["flux"], "adapter=none", "trainer.max_steps=1", "export_layout=flat"))
    assert [p.name for p in (tmp_path / "full" / "exports").iterdir()] == ["final"]


def test_kohya_metadata_names_the_size_trained(tmp_path):
    """Beside the run metadata every family writes (tests/test_conformance.py): kohya's own keys, which name the
    size really trained rather than SDXL's native 1024x1024."""
    result = run(compose_config(tmp_path / "run", *FAMILIES["sdxl"], *LORA, "trainer.max_steps=1"))
    meta = metadata(tmp_path / "run" / "exports" / "run.safetensors")
    assert meta["modelspec.resolution"] == result.datamodule.trained_sizes()[0] == "64x64"
    assert meta["ss_resolution"] == "(64, 64)"