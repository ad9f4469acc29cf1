"""adapter=lokr, adapter=loha and adapter.use_dora=true through PEFT, exported in the family's LoRA format with the
suffixes ComfyUI reads and loaded back by our reader; adapter.init_path. One family per export format: Flux
(diffusers names), SDXL (kohya names), Chroma (ComfyUI native names, with fused qkv / linear1)."""
import re
from pathlib import Path

import pytest
import torch
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
from safetensors import safe_open
from safetensors.torch import load_file

from difftrain.config.errors import ConfigError
from difftrain.modules.adapters import adapter_layers, file_layout, read_adapter_file
from difftrain.training import build_module, run
from tests.conftest import compose_config

FLUX = ("model=flux_tiny", "dataset.resolutions=[64]")
SDXL = ("model=sdxl_tiny", "dataset.resolutions=[64]")
CHROMA = ("model=chroma", "model.tiny=true", "model.dtype=float32", "model.max_sequence_length=64",
          "dataset.resolutions=[64]")
TRAIN = ("adapter.rank=2", "adapter.alpha=4", "optimizer.lr=1e-2", "trainer.max_steps=2")
RUNS = {  # name: (overrides, the LoRA file of the family's export)
    "flux_lokr": ((*FLUX, "adapter=lokr", "adapter.decompose_both=true"), "pytorch_lora_weights.safetensors"),
    "sdxl_loha": ((*SDXL, "adapter=loha"), "lora.safetensors"),
    "chroma_dora": ((*CHROMA, "adapter=lora", "adapter.use_dora=true"), "adapter_model.safetensors"),
}
# ComfyUI's native Chroma block linears (lora-formats.md, layer 2), under its diffusion_model. prefix.
CHROMA_NATIVE = re.compile(r"diffusion_model\.(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])"
                           r"|single_blocks\.\d+\.linear[12])")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    runs = {}

    def get(name: str):
        if name not in runs:
            runs[name] = run(compose_config(tmp_path_factory.mktemp(name) / "run", *RUNS[name][0], *TRAIN))
        return runs[name]
    return get


def exported_file(name: str, trained) -> Path:
    return trained(name).final_export / RUNS[name][1]


def fresh_module(overrides: tuple[str, ...], tmp_path: Path, *more: str):
    """The family's untrained base read from disk with a new adapter, as a new run starts."""
    module = build_module(compose_config(tmp_path / "fresh", *overrides, *TRAIN, *more))
    module.configure_model()
    return module.eval()


@torch.no_grad()
def prediction(module, batch: dict) -> torch.Tensor:
    latents = batch["latents"]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    return module.denoise(batch, torch.full((latents.shape[0],), 0.6), noise)[0]


@torch.no_grad()
def prediction_without_adapter(module, batch: dict) -> torch.Tensor:
    layers = adapter_layers(module).values()
    for layer in layers:
        layer.enable_adapters(False)
    try:
        return prediction(module, batch)
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def stems(path: Path) -> dict[str, set[str]]:
    """The file's key stems and the suffixes each has (suffixes without dots but lora_A/B.weight)."""
    found: dict[str, set[str]] = {}
    for key in load_file(path):
        stem, suffix = re.fullmatch(r"(.+?)\.((?:lora_[AB]|lora_down|lora_up)\.weight|[a-z0-9_]+)", key).groups()
        found.setdefault(stem, set()).add(suffix)
    return found


def lora_stems(module, tmp_path: Path) -> set[str]:
    """The stems the family's plain LoRA export gives the same modules."""
    lora = {}
    for name, layer in adapter_layers(module).items():
        base = layer.get_base_layer()
        lora[f"{name}.lora_A.weight"] = torch.ones(1, base.in_features)
        lora[f"{name}.lora_B.weight"] = torch.ones(base.out_features, 1)
    folder = tmp_path / "plain"
    folder.mkdir()
    module.export_lora(lora, folder)
    return set(stems(next(folder.glob("*.safetensors"))))


@pytest.mark.parametrize("name", list(RUNS))
def test_adapter_export_loads_back_onto_the_untrained_base_and_reproduces_the_trained_output(name, trained, tmp_path):
    run_ = trained(name)
    ours = run_.module.eval()
    batch = next(iter(run_.datamodule.train_dataloader()))
    our_output = prediction(ours, batch)
    assert not torch.allclose(our_output, prediction_without_adapter(ours, batch), atol=1e-4), "the adapter did nothing"

    reloaded = fresh_module(RUNS[name][0], tmp_path, f"adapter.init_path={exported_file(name, trained)}")
    torch.testing.assert_close(prediction(reloaded, batch), our_output, rtol=1e-5, atol=1e-5)


def test_lokr_file_has_comfyui_suffixes_on_the_family_stems_and_comfyui_math_gives_peft_delta(trained, tmp_path):
    module = trained("flux_lokr").module
    layers = adapter_layers(module)
    assert all(isinstance(layer, LoKrLayer) for layer in layers.values())
    path = exported_file("flux_lokr", trained)
    found = stems(path)
    assert set(found) == lora_stems(module, tmp_path)
    assert any({"lokr_w1_a", "lokr_w1_b"} <= suffixes for suffixes in found.values()), "decompose_both unused"
    tensors = load_file(path)
    for stem, suffixes in found.items():
        assert suffixes <= {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}
        # ComfyUI's LoKr rule: kron(w1, w2), times alpha / rank only when the file has an alpha (it has none).
        w1, w2 = (tensors[f"{stem}.{w}"] if f"{stem}.{w}" in tensors else
                  tensors[f"{stem}.{w}_a"] @ tensors[f"{stem}.{w}_b"] for w in ("lokr_w1", "lokr_w2"))
        layer = layers[stem.removeprefix("transformer.")]
        torch.testing.assert_close(torch.kron(w1, w2), layer.get_delta_weight("default"), rtol=1e-5, atol=1e-7)


def test_loha_file_has_comfyui_suffixes_on_the_family_stems(trained, tmp_path):
    module = trained("sdxl_loha").module
    assert all(isinstance(layer, LoHaLayer) for layer in adapter_layers(module).values())
    path = exported_file("sdxl_loha", trained)
    found, tensors = stems(path), load_file(path)
    assert set(found) == lora_stems(module, tmp_path)
    assert all(suffixes == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} for suffixes in found.values())
    layers = adapter_layers(module)
    for stem, (part,) in file_layout(module).stems.items():
        # ComfyUI's LoHa rule: (w1_a @ w1_b) * (w2_a @ w2_b), times alpha / rank only when the file has an alpha.
        w1, w2 = (tensors[f"{stem}.hada_{w}_a"] @ tensors[f"{stem}.hada_{w}_b"] for w in ("w1", "w2"))
        torch.testing.assert_close(w1 * w2, layers[part.module].get_delta_weight("default"), rtol=1e-5, atol=1e-7)
    with safe_open(exported_file("sdxl_loha", trained), "pt") as file:
        assert file.metadata()["difftrain.adapter"] == "loha"


def test_dora_scale_sits_beside_the_lora_weights_in_comfyui_shape_fused_like_them(trained, tmp_path):
    module = trained("chroma_dora").module
    path = exported_file("chroma_dora", trained)
    found, tensors = stems(path), load_file(path)
    assert set(found) == lora_stems(module, tmp_path)
    assert all(CHROMA_NATIVE.fullmatch(stem) for stem in found)
    for stem, suffixes in found.items():
        assert suffixes == {"lora_A.weight", "lora_B.weight", "dora_scale"}
        assert tensors[f"{stem}.dora_scale"].shape == (tensors[f"{stem}.lora_B.weight"].shape[0], 1)
    attention = module.denoiser.transformer_blocks[0].attn
    qkv = [getattr(attention, name) for name in ("to_q", "to_k", "to_v")]
    stem = "diffusion_model.double_blocks.0.img_attn.qkv"
    # DoRA decomposed on the output axis (a dora_scale of one row per output row): each row of W + B @ A rescaled
    # to the norm dora_scale gives it; the fused weight stacks q, k and v.
    base = torch.cat([layer.get_base_layer().weight for layer in qkv])
    adapted = base + tensors[f"{stem}.lora_B.weight"] @ tensors[f"{stem}.lora_A.weight"]
    comfyui = tensors[f"{stem}.dora_scale"] * adapted / adapted.norm(dim=1, keepdim=True)
    torch.testing.assert_close(comfyui, torch.cat([effective_weight(layer) for layer in qkv]), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def effective_weight(layer) -> torch.Tensor:
    """The weight a PEFT layer applies, adapter included, read from its output on the identity."""
    base = layer.get_base_layer()
    return (layer(torch.eye(base.in_features)) - base.bias).T


def test_lokr_on_a_family_that_fuses_lora_parts_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"adapter=lokr: .*double_blocks\.0\.img_attn\.qkv.*adapter=lora"):
        fresh_module(CHROMA, tmp_path, "adapter=lokr")


def test_init_path_starts_training_from_the_file_and_training_continues(trained, tmp_path):
    start = exported_file("flux_lokr", trained)
    lr = 1e-3
    continued = run(compose_config(tmp_path / "continued", *RUNS["flux_lokr"][0], *TRAIN, f"adapter.init_path={start}",
                                   f"optimizer.lr={lr}", "trainer.max_steps=1"))
    module = continued.module
    before, after = read_adapter_file(module, start), read_adapter_file(module, continued.final_export / RUNS["flux_lokr"][1])
    moved = max((after[key] - before[key]).abs().max().item() for key in before)
    # One AdamW step moves each weight by about lr: training went on from the file's weights, not from a new init.
    assert 0 < moved <= 2 * lr


def test_init_path_whose_keys_do_not_match_the_model_is_one_config_error_naming_it(trained, tmp_path):
    other_family = exported_file("sdxl_loha", trained)
    with pytest.raises(ConfigError, match=re.escape(str(other_family))) as error:
        fresh_module(FLUX, tmp_path, "adapter=loha", f"adapter.init_path={other_family}")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("overrides, message", [
    (("adapter=lokr", "+adapter.use_dora=true"), "adapter.use_dora=true is an option of adapter=lora"),
    (("adapter=loha", "adapter.init_path=/nowhere/lora.safetensors"), "adapter.init_path=/nowhere/lora.safetensors"),
    (("adapter=none", "+adapter.init_path=/nowhere/lora.safetensors"), "full fine-tune"),
    (("adapter.use_dora=true", "model.transformer_dtype=float8"), "no use_dora"),
])
def test_adapter_settings_that_cannot_work_are_one_config_error_before_loading(overrides, message, make_config):
    with pytest.raises(ConfigError, match=message):
        run(make_config(*FLUX, *overrides))


def test_init_path_of_another_adapter_kind_is_one_config_error_naming_it(trained, tmp_path):
    lokr_file = exported_file("flux_lokr", trained)
    with pytest.raises(ConfigError, match=re.escape(f"{lokr_file} holds another kind of adapter than adapter=lora")):
        fresh_module(FLUX, tmp_path, f"adapter.init_path={lokr_file}")
