import re

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from difftrain.formats.flux import bfl_to_diffusers, diffusers_to_bfl, load_bfl_transformer, save_bfl_transformer
from difftrain.tiny.flux import TRANSFORMER_CONFIG

# The 12B sizes, which diffusers' own converter hard-codes, with one block of each kind.
REAL_CONFIG = dict(
    num_attention_heads=24,
    attention_head_dim=128,
    num_layers=1,
    num_single_layers=1,
    in_channels=64,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)

# ComfyUI's native names for the Linears inside blocks.
BLOCK_LINEAR = re.compile(
    r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02]|mod\.lin)|single_blocks\.\d+\.(linear[12]|modulation\.lin))$"
)
BLOCK_NORM = re.compile(r"^(double_blocks\.\d+\.(img|txt)_attn|single_blocks\.\d+)\.norm\.(query|key)_norm$")
TOP_LEVEL_MODULES = {
    "img_in",
    "txt_in",
    "time_in.in_layer",
    "time_in.out_layer",
    "vector_in.in_layer",
    "vector_in.out_layer",
    "guidance_in.in_layer",
    "guidance_in.out_layer",
    "final_layer.linear",
    "final_layer.adaLN_modulation.1",
}


@pytest.fixture(params=[True, False], ids=["guidance", "no_guidance"])
def config(request):
    return {**TRANSFORMER_CONFIG, "guidance_embeds": request.param}


@pytest.fixture
def model(config):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**config).eval()
    # Random values everywhere, so that norm gains (ones by default) or a missed swap would show.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    return model


def assert_same_tensors(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].shape == tensor.shape, key
        assert torch.equal(actual[key], tensor), key


def forward(model):
    generator = torch.Generator().manual_seed(1)
    image_tokens, text_tokens = 6, 4
    inputs = dict(
        hidden_states=torch.randn(1, image_tokens, 64, generator=generator),
        encoder_hidden_states=torch.randn(1, text_tokens, 32, generator=generator),
        pooled_projections=torch.randn(1, 32, generator=generator),
        timestep=torch.tensor([0.5]),
        img_ids=torch.randn(image_tokens, 3, generator=generator),
        txt_ids=torch.zeros(text_tokens, 3),
    )
    if model.config.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5])
    with torch.no_grad():
        return model(**inputs).sample


def test_round_trip_is_exact(model):
    state_dict = model.state_dict()
    assert_same_tensors(bfl_to_diffusers(diffusers_to_bfl(state_dict)), state_dict)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_bfl_prefix_is_stripped(model, prefix):
    bfl = diffusers_to_bfl(model.state_dict())
    prefixed = {prefix + key: tensor for key, tensor in bfl.items()}
    assert_same_tensors(bfl_to_diffusers(prefixed), model.state_dict())


def test_bfl_names_match_comfyui(model, config):
    bfl = diffusers_to_bfl(model.state_dict())
    modules = {key.rsplit(".", 1)[0] for key in bfl}
    for key in bfl:
        module, param = key.rsplit(".", 1)
        if module.startswith(("double_blocks.", "single_blocks.")):
            pattern = BLOCK_NORM if param == "scale" else BLOCK_LINEAR
            assert pattern.match(module), key
    top_level = {module for module in modules if not module.startswith(("double_blocks.", "single_blocks."))}
    guidance = {"guidance_in.in_layer", "guidance_in.out_layer"}
    assert top_level == (TOP_LEVEL_MODULES if config["guidance_embeds"] else TOP_LEVEL_MODULES - guidance)
    assert {int(m.split(".")[1]) for m in modules if m.startswith("double_blocks.")} == {0, 1}
    assert {int(m.split(".")[1]) for m in modules if m.startswith("single_blocks.")} == {0, 1}


def test_save_then_load_reproduces_the_model(model, config, tmp_path):
    path = tmp_path / "flux.safetensors"
    save_bfl_transformer(model, str(path))
    assert load_file(path).keys() == diffusers_to_bfl(model.state_dict()).keys()
    assert [p.name for p in tmp_path.iterdir()] == ["flux.safetensors"]  # no temp file left behind

    loaded = load_bfl_transformer(str(path), config, torch.float32).eval()
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    assert torch.equal(forward(loaded), forward(model))


def test_load_from_diffusers_folder_casts_dtype(model, tmp_path):
    path = tmp_path / "flux.safetensors"
    save_bfl_transformer(model.state_dict(), str(path))
    model.save_config(tmp_path / "base" / "transformer")

    loaded = load_bfl_transformer(str(path), str(tmp_path / "base"), torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert all(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.proj_out.weight, model.proj_out.weight.to(torch.bfloat16))


def test_matches_diffusers_converter_at_real_size():
    with torch.device("meta"):
        meta_model = FluxTransformer2DModel(**REAL_CONFIG)
    # Real shapes at almost no memory: each row holds one random int8, broadcast along the row,
    # so values check the row order of every concat, split and swap.
    generator = torch.Generator().manual_seed(0)
    state_dict = {
        key: torch.randint(-128, 128, (meta.shape[0], 1), dtype=torch.int8, generator=generator).expand(meta.shape)
        if meta.dim() == 2
        else torch.randint(-128, 128, meta.shape, dtype=torch.int8, generator=generator)
        for key, meta in meta_model.state_dict().items()
    }
    bfl = diffusers_to_bfl(state_dict)

    checkpoint = {"model.diffusion_model." + key: tensor for key, tensor in bfl.items()}
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    assert checkpoint == {}  # diffusers' converter consumed every BFL key
    assert_same_tensors(converted, state_dict)
    assert_same_tensors(bfl_to_diffusers(bfl), state_dict)


def test_meta_tensors_at_real_size():
    with torch.device("meta"):
        state_dict = FluxTransformer2DModel(**REAL_CONFIG).state_dict()
    bfl = diffusers_to_bfl(state_dict)
    shapes = {key: tensor.shape for key, tensor in state_dict.items()}
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert {key: tensor.shape for key, tensor in converted.items()} == shapes
    assert {key: tensor.shape for key, tensor in bfl_to_diffusers(bfl).items()} == shapes


def test_truncated_file_names_the_path(model, config, tmp_path):
    path = tmp_path / "flux.safetensors"
    save_bfl_transformer(model, str(path))
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_bfl_transformer(str(path), config, torch.float32)


def test_fp8_scaled_file_is_refused(model, config, tmp_path):
    path = tmp_path / "flux_fp8_scaled.safetensors"
    bfl = diffusers_to_bfl(model.state_dict())
    bfl["double_blocks.0.img_attn.qkv.scale_weight"] = torch.ones(())
    save_file({key: tensor.contiguous() for key, tensor in bfl.items()}, str(path))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*fp8-scaled.*img_attn\.qkv\.scale_weight"):
        load_bfl_transformer(str(path), config, torch.float32)
    with pytest.raises(ValueError, match="fp8-scaled"):
        bfl_to_diffusers({"model.diffusion_model.single_blocks.0.linear1.scale_input": torch.ones(())})


def test_file_not_matching_config_names_both(model, config, tmp_path):
    path = tmp_path / "flux.safetensors"
    save_bfl_transformer(model, str(path))
    fewer_blocks = {**config, "num_layers": 1}
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} does not match.*unexpected \[transformer_blocks\.1\."):
        load_bfl_transformer(str(path), fewer_blocks, torch.float32)
    wider = {**config, "joint_attention_dim": 48}
    with pytest.raises(ValueError, match=r"wrong shape.*context_embedder\.weight \(32, 32\) vs \(32, 48\)"):
        load_bfl_transformer(str(path), wider, torch.float32)


def test_unmapped_keys_are_named(model):
    state_dict = {**model.state_dict(), "transformer_blocks.0.attn.extra.weight": torch.ones(1)}
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn\.extra\.weight"):
        diffusers_to_bfl(state_dict)

    incomplete = dict(model.state_dict())
    del incomplete["single_transformer_blocks.1.proj_mlp.bias"]
    with pytest.raises(ValueError, match=r"single_transformer_blocks\.1\.attn\.to_q\.bias"):
        diffusers_to_bfl(incomplete)

    bfl = {**diffusers_to_bfl(model.state_dict()), "first_stage_model.decoder.conv_in.weight": torch.ones(1)}
    with pytest.raises(ValueError, match=r"first_stage_model\.decoder\.conv_in\.weight"):
        bfl_to_diffusers(bfl)
