"""Importing a diffusion-pipe config (scripts/import_diffusion_pipe.py): the fixtures under
tests/data/diffusion_pipe/ are configs written from diffusion-pipe's documented keys; expected values are read
from them, and the imported Flux config trains."""
import json
import runpy
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from difftrain.config.diffusion_pipe import import_config, main, model_config
from difftrain.config.errors import ConfigError
from difftrain.training import run
from tests.conftest import EXAMPLE_IMAGES, ROOT

FIXTURES = ROOT / "tests" / "data" / "diffusion_pipe"


def read(name: str) -> dict:
    return tomllib.loads((FIXTURES / name).read_text())


def imported(config: Path) -> tuple[dict, list[str]]:
    """The imported experiment as data, and its comment lines listing what was not imported."""
    text = import_config(config)
    return yaml.safe_load(text), [line for line in text.splitlines() if line.startswith("#   ")]


def groups(experiment: dict) -> dict:
    return {k.removeprefix("override /"): v for entry in experiment["defaults"] for k, v in entry.items()}


def test_script_prints_the_experiment_reading_the_dataset_named_beside_the_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the dataset file is found beside the config, not in the current directory
    monkeypatch.setattr(sys, "argv", ["import_diffusion_pipe.py", str(FIXTURES / "flux.toml")])
    runpy.run_path(str(ROOT / "scripts" / "import_diffusion_pipe.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert printed.startswith("# @package _global_\n")
    assert yaml.safe_load(printed)["dataset"]["directories"] == read("images.toml")["directory"]


def test_write_puts_the_experiment_file_in_place_and_keeps_an_existing_one(tmp_path, capsys):
    target = tmp_path / "experiment" / "mine.yaml"
    main([str(FIXTURES / "wan.toml"), str(FIXTURES / "images.toml"), "--write", "mine",
          "--experiment-dir", str(target.parent)])
    assert target.read_text() == import_config(FIXTURES / "wan.toml", FIXTURES / "images.toml")
    assert [p.name for p in target.parent.iterdir()] == ["mine.yaml"]  # no temp file left beside it
    with pytest.raises(SystemExit, match="mine.yaml exists.*--overwrite"):
        main([str(FIXTURES / "flux.toml"), "--write", "mine", "--experiment-dir", str(target.parent)])
    main([str(FIXTURES / "flux.toml"), "--write", "mine", "--experiment-dir", str(target.parent), "--overwrite"])
    assert yaml.safe_load(target.read_text())["model"]["diffusers_path"] == read("flux.toml")["model"]["diffusers_path"]


def test_flux_lora_keys_land_in_our_groups():
    source, dataset = read("flux.toml"), read("images.toml")
    experiment, _ = imported(FIXTURES / "flux.toml")
    assert groups(experiment) == {"model": "flux", "optimizer": "adamw_optimi", "adapter": "lora", "dataset": "images"}
    assert experiment["model"] == {**{k: v for k, v in source["model"].items() if k != "type"},
                                   "activation_checkpointing": source["activation_checkpointing"]}
    assert experiment["adapter"] == {k: v for k, v in source["adapter"].items() if k != "type"}
    assert experiment["optimizer"] == {k: v for k, v in source["optimizer"].items() if k != "type"}
    assert experiment["trainer"] == {"max_epochs": source["epochs"], "gradient_clip_val": source["gradient_clipping"],
                                     "accumulate_grad_batches": source["gradient_accumulation_steps"]}
    assert experiment["scheduler"] == {"warmup_steps": source["warmup_steps"]}
    assert experiment["dataset"]["batch_size"] == source["micro_batch_size_per_gpu"]
    for key in ("save_every_n_epochs", "save_dtype", "eval_every_n_epochs", "eval_before_first_step"):
        assert experiment[key] == source[key]
    for key in ("resolutions", "enable_ar_bucket", "min_ar", "max_ar", "num_ar_buckets", "frame_buckets"):
        assert experiment["dataset"][key] == dataset[key]


def test_sdxl_full_finetune_with_prodigy_cosine_eval_set_and_wandb():
    source = read("sdxl.toml")
    experiment, left_out = imported(FIXTURES / "sdxl.toml")
    assert groups(experiment) == {"model": "sdxl", "optimizer": "prodigy", "adapter": "none", "scheduler": "cosine",
                                  "logger": "wandb", "dataset": "images"}
    assert experiment["model"] == {k: v for k, v in source["model"].items() if k != "type"}
    assert experiment["optimizer"] == {k: v for k, v in source["optimizer"].items() if k != "type"}
    eval_toml = read("eval_dataset.toml")
    entry = {"resolutions": eval_toml["resolutions"], **eval_toml["directory"][0]}
    assert experiment["eval_datasets"] == [{"name": "held_out", **entry}, {"name": "eval1", **entry}]
    assert experiment["save_every_n_steps"] == source["save_every_n_steps"]
    assert experiment["save_every_n_epochs"] is None  # only the step schedule, as in diffusion-pipe
    assert experiment["dataset"]["enable_ar_bucket"] is False  # diffusion-pipe's default when unset
    monitoring = source["monitoring"]
    assert experiment["logger"] == {"wandb": {"project": monitoring["wandb_tracker_name"],
                                              "name": monitoring["wandb_run_name"]}}
    assert not any(monitoring["wandb_api_key"] in line for line in left_out)


def test_wan_video_config_picks_the_variant_and_keeps_both_directories():
    source, dataset = read("wan.toml"), read("videos.toml")
    experiment, left_out = imported(FIXTURES / "wan.toml")
    assert groups(experiment)["model"] == "wan22_high"  # Wan2.2-T2V-A14B, the high-noise expert's file
    assert groups(experiment)["optimizer"] == "adamw8bit_kahan"
    model = experiment["model"]
    for key in ("ckpt_path", "transformer_path", "llm_path", "transformer_dtype", "min_t", "max_t"):
        assert model[key] == source["model"][key]
    assert model["activation_checkpointing"] == "offload"  # diffusion-pipe's 'unsloth'
    assert model["blocks_to_swap"] == source["blocks_to_swap"]
    assert experiment["checkpoint_every_n_minutes"] == source["checkpoint_every_n_minutes"]
    assert experiment["optimizer"]["stabilize"] == source["optimizer"]["stabilize"]
    assert experiment["dataset"]["video_clip_mode"] == source["video_clip_mode"]
    for key in ("frame_buckets", "shuffle_tags", "cache_shuffle_num"):
        assert experiment["dataset"][key] == dataset[key]
    assert experiment["dataset"]["directories"] == dataset["directory"]  # path, num_repeats, mask_path, buckets
    assert any(line.startswith("#   [model] cache_text_embeddings = false: not a key of model=wan22_high")
               for line in left_out)


def test_lokr_adapter_on_chroma():
    source = read("chroma_lokr.toml")
    experiment, _ = imported(FIXTURES / "chroma_lokr.toml")
    assert groups(experiment)["model"] == "chroma"
    assert groups(experiment)["adapter"] == "lokr"
    adapter = source["adapter"]
    assert experiment["adapter"] == {"rank": int(adapter["rank"]), "decompose_factor": adapter["decompose_factor"],
                                     "dtype": adapter["dtype"]}


@pytest.mark.parametrize("model, expected", [
    ({"type": "flux", "diffusers_path": "/m/FLUX.1-dev"}, "flux"),
    ({"type": "flux", "diffusers_path": "/m/FLUX.1-dev", "transformer_path": "/m/flux1-kontext-dev.safetensors"},
     "flux_kontext"),
    ({"type": "qwen_image", "diffusers_path": "/m/Qwen-Image"}, "qwen_image"),
    ({"type": "qwen_image", "transformer_path": "/c/qwen_image_edit_bf16.safetensors"}, "qwen_image_edit"),
    ({"type": "qwen_image", "diffusers_path": "/m/Qwen-Image-Edit-2509"}, "qwen_image_edit_plus"),
    ({"type": "sdxl", "checkpoint_path": "/m/sd_xl_base_1.0.safetensors"}, "sdxl"),
    ({"type": "wan", "ckpt_path": "/m/Wan2.1-T2V-1.3B"}, "wan21_t2v"),
    ({"type": "wan", "ckpt_path": "/m/Wan2.1-I2V-14B-480P"}, "wan21_i2v"),
    ({"type": "wan", "ckpt_path": "/m/Wan2.2-TI2V-5B"}, "wan22_5b"),
    ({"type": "wan", "ckpt_path": "/m/Wan2.2-T2V-A14B", "transformer_path": "/m/Wan2.2-T2V-A14B/low_noise_model"},
     "wan22_low"),
    ({"type": "wan", "ckpt_path": "/m/Wan2.2-I2V-A14B",
      "transformer_path": "/c/wan2.2_i2v_high_noise_14B_fp16.safetensors"}, "wan22_high_i2v"),
])
def test_model_config_follows_the_type_and_the_weights_names(model, expected):
    assert model_config(model, Path("config.toml")) == expected


def test_wan_variant_from_the_checkpoints_config_json(tmp_path):
    experts = tmp_path / "my_wan" / "low_noise_model"
    experts.mkdir(parents=True)
    (experts / "config.json").write_text(json.dumps({"model_type": "i2v", "dim": 5120}))
    assert model_config({"type": "wan", "ckpt_path": str(experts.parent)}, Path("config.toml")) == "wan22_low_i2v"


@pytest.mark.parametrize("table, value, message", [
    ("model", "hidream", r'\[model\] type = "hidream" .* Supported diffusion-pipe types: chroma, flux, qwen_image'),
    ("optimizer", "automagic", r'\[optimizer\] type = "automagic" has no difftrain equivalent: use one of adamw'),
])
def test_unsupported_types_are_one_line_errors(tmp_path, table, value, message):
    config = tmp_path / "config.toml"
    config.write_text((FIXTURES / "flux.toml").read_text().replace(
        "type = 'flux'" if table == "model" else "type = 'adamw_optimi'", f"type = '{value}'"))
    shutil.copy(FIXTURES / "images.toml", tmp_path)
    with pytest.raises(ConfigError, match=message) as error:
        import_config(config)
    assert "\n" not in str(error.value)


def test_keys_without_an_equivalent_are_listed_with_what_to_use_instead(tmp_path):
    _, left_out = imported(FIXTURES / "sdxl.toml")
    assert "#   pipeline_stages = 2: trainer=fsdp trainer.devices=N" in "\n".join(left_out)
    config, dataset = tmp_path / "config.toml", tmp_path / "images.toml"
    tables = ("[model]", "[adapter]", "[optimizer]")
    text = (FIXTURES / "flux.toml").read_text()
    for table in tables:
        text = text.replace(table, f"{table}\nmade_up_{table[1:-1]} = 3")
    config.write_text("made_up_top = 3\n" + text)
    dataset.write_text("made_up_dataset = 3\n" + (FIXTURES / "images.toml").read_text() + "made_up_directory = 3\n")
    _, left_out = imported(config)
    listed = {line.split(" = ")[0].split()[-1] for line in left_out}
    assert {"made_up_top", "made_up_model", "made_up_adapter", "made_up_optimizer", "made_up_dataset",
            "made_up_directory"} <= listed


def test_imported_flux_config_trains_through_hydra(make_config, tmp_path):
    experiments = tmp_path / "configs" / "experiment"
    main([str(FIXTURES / "flux.toml"), "--write", "from_diffusion_pipe", "--experiment-dir", str(experiments)])
    cfg = make_config(f"hydra.searchpath=[file://{experiments.parent}]", "experiment=from_diffusion_pipe",
                      # its weights and images are not on this machine: the tiny Flux and the bundled images
                      "model.tiny=true", "model.diffusers_path=null", f"dataset.directories.0.path={EXAMPLE_IMAGES}",
                      "model.dtype=float32", "adapter.dtype=float32", "model.transformer_dtype=null",
                      "model.max_sequence_length=64", "dataset.resolutions=[64]", "trainer.max_steps=2",
                      "checkpoint_every_n_steps=null")
    assert cfg.optimizer._target_ == "optimi.AdamW"
    assert cfg.trainer.accumulate_grad_batches == read("flux.toml")["gradient_accumulation_steps"]
    result = run(cfg)
    assert result.trainer.global_step == 2
    assert any(result.final_export.glob("*.safetensors"))
