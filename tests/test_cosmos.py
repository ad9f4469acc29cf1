"""What is special to the Cosmos families (the conformance suite covers the rest): Cosmos-Predict2's original
files (a pickle read with weights_only only, the OLD T5 v1.0), its fp8 choice (e5m2; e4m3 warned) and LoRA names;
Cosmos 1.0's tokenizer file, EDM objective (against hand-computed values), its only sizes and frame counts, and
its LoRA names."""
import logging
import re

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import CosmosTransformer3DModel
from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file
from transformers import T5Config, T5EncoderModel

from difftrain.config.errors import ConfigError
from difftrain.formats.cosmos import load_vae
from difftrain.formats.cosmos_common import read_original
from difftrain.formats.cosmos_predict2 import PREDICT2
from difftrain.formats.old_t5 import load_old_t5
from difftrain.formats.single_file import save_native
from difftrain.modules.cosmos import TINY_FRAMES, TINY_SIZES
from difftrain.modules.noise_schedules import EDM
from difftrain.tiny import cosmos as tiny_cosmos
from difftrain.tiny import tiny_model
from difftrain.training import build_module, run
from tests.conftest import compose_config

PREDICT2_RUN = ("model=cosmos_predict2", "model.tiny=true", "model.dtype=float32", "model.max_sequence_length=16",
            "dataset.resolutions=[32]")
# lora-formats.md: the LoRA-targeted native Linears of Cosmos-Predict2's blocks, as ComfyUI names them
PREDICT2_LORA_KEY = re.compile(r"^diffusion_model\.blocks\.\d+\.((self|cross)_attn\.(q|k|v|output)_proj|mlp\.layer[12]"
                               r"|adaln_modulation_(self_attn|cross_attn|mlp)\.[12])\.lora_[AB]\.weight$")
COSMOS1_RUN = ("model=cosmos", "model.tiny=true", "model.dtype=float32", "model.max_sequence_length=16", "dataset=videos",
           "dataset.resolutions=[32]", "dataset.enable_ar_bucket=false", "dataset.frame_buckets=[9]")
COSMOS1_LORA_KEY = re.compile(r"^diffusion_model\.blocks\.block\d+\.blocks\.\d+\.(block\.(attn\.(to_[qkv]\.0|to_out\.0)"
                              r"|layer[12])|adaLN_modulation\.[12])\.lora_[AB]\.weight$")


@pytest.fixture(scope="module")
def e5m2_lora_run(tmp_path_factory):
    return run(compose_config(tmp_path_factory.mktemp("predict2") / "run", *PREDICT2_RUN,
                              "model.transformer_dtype=float8_e5m2", "trainer.max_steps=2", "adapter.rank=4"))


def test_predict2_trains_on_an_e5m2_base_and_exports_comfyui_native_lora_names(e5m2_lora_run):
    module = e5m2_lora_run.module
    stored = {layer.weight.dtype for name, layer in module.denoiser.named_modules()
              if isinstance(layer, torch.nn.Linear) and name.startswith("transformer_blocks") and "lora_" not in name}
    assert stored == {torch.float8_e5m2}
    lora = load_file(e5m2_lora_run.final_export / "adapter_model.safetensors")
    assert lora and all(PREDICT2_LORA_KEY.match(key) for key in lora), sorted(lora)[:5]
    original = read_original(tiny_model("cosmos_predict2") / "model.pt")
    modules = {key.removeprefix("diffusion_model.").rsplit(".lora_", 1)[0] for key in lora}
    assert all(f"{m}.weight" in original for m in modules)  # every LoRA module is a weight of the original file


def test_predict2_e4m3_base_is_warned_about_in_one_line(make_config, caplog):
    with caplog.at_level(logging.WARNING):
        build_module(make_config(*PREDICT2_RUN, "model.transformer_dtype=float8"))
    warnings = [r.getMessage() for r in caplog.records if "float8_e5m2" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]


def test_predict2_map_names_what_diffusers_converter_names_at_real_size():
    """The 2B model's weights (meta tensors) in the original layout, through diffusers' own Cosmos 2.0 converter."""
    with init_empty_weights():
        model = CosmosTransformer3DModel(num_attention_heads=16, num_layers=28, rope_scale=(1.0, 4.0, 4.0),
                                         extra_pos_embed_type=None)
    original = {f"net.{key}": tensor for key, tensor in PREDICT2.to_native(model.state_dict(), "2B").items()}
    assert convert_cosmos_transformer_checkpoint_to_diffusers(original).keys() == model.state_dict().keys()


def test_predict2_pickle_is_read_with_weights_only(tmp_path):
    pickled = tmp_path / "model.pt"
    torch.save({"net.x_embedder.proj.1.weight": torch.zeros(2, 2), "config": logging.getLogger("any object")}, pickled)
    with pytest.raises(ValueError, match=r"weights_only=True") as error:
        read_original(pickled)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="model.pt or a .safetensors"):
        read_original(tmp_path / "model.ckpt")


def test_a_t5_v11_file_is_refused_asking_for_the_old_t5(tmp_path):
    torch.manual_seed(0)
    config = T5Config(d_model=8, d_ff=16, d_kv=4, num_heads=2, num_layers=1, vocab_size=32,
                      feed_forward_proj="gated-gelu")
    state = T5EncoderModel(config).state_dict()
    save_native({k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}, tmp_path / "t5xxl.safetensors")
    with pytest.raises(ValueError, match="OLD T5 v1.0 XXL, ComfyUI's oldt5_xxl_fp16"):
        load_old_t5(tmp_path / "t5xxl.safetensors", torch.float32)


def test_edm_loss_is_the_karras_weighted_denoising_loss_with_cosmos_preconditioning():
    """Hand-computed EDM (sigma_data 0.5, rho 7, sigma in [0.002, 80]): the loss our step takes on the denoiser's
    raw output F equals lambda(sigma) ||c_skip x_sigma + c_out F - x||^2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2,
    and the denoiser sees c_in x_sigma and log(sigma) / 4."""
    from difftrain.modules.base import weighted_mse

    sd, t = 0.5, torch.tensor([0.0, 0.3, 1.0])
    sigma = torch.tensor([(80 ** (1 / 7) + (1 - float(v)) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for v in t])
    assert sigma[0] == pytest.approx(0.002) and sigma[2] == pytest.approx(80.0)
    generator = torch.Generator().manual_seed(0)
    x, eps, output = (torch.randn(3, 4, 1, 2, 2, generator=generator, dtype=torch.float64) for _ in range(3))
    s = sigma.double().view(-1, 1, 1, 1, 1)
    noised = x + s * eps
    c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()
    edm = EDM()
    torch.testing.assert_close(edm.denoiser_timesteps(t).double(), 0.25 * sigma.double().log(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(edm.add_noise(x, eps, t).double(), c_in * noised, rtol=1e-5, atol=1e-6)
    weights = (sigma.double() ** 2 + sd**2) / (sigma.double() * sd) ** 2
    per_sample = ((c_skip * noised + c_out * output - x) ** 2).flatten(1).mean(1)
    ours = weighted_mse(output, edm.target(x, eps, t), edm.loss_weights(t))
    assert float(ours) == pytest.approx(float((weights * per_sample).mean()), rel=1e-4)


def test_cosmos1_trains_with_edm_and_exports_comfyui_native_lora_names(tmp_path):
    result = run(compose_config(tmp_path / "run", *COSMOS1_RUN, "trainer.max_steps=1", "adapter.rank=4"))
    assert isinstance(result.module.noise_schedule, EDM)
    lora = load_file(result.final_export / "adapter_model.safetensors")
    assert lora and all(COSMOS1_LORA_KEY.match(key) for key in lora), sorted(lora)[:5]
    original = read_original(tiny_model("cosmos") / tiny_cosmos.FILES["transformer_path"])
    assert all(f"{key.removeprefix('diffusion_model.').rsplit('.lora_', 1)[0]}.weight" in original for key in lora)


def test_cosmos1_tokenizer_file_loads_as_the_diffusers_vae_it_was_written_from():
    loaded = load_vae(tiny_model("cosmos") / tiny_cosmos.FILES["vae_path"], torch.float32)
    written = tiny_cosmos.vae()
    assert loaded.config.latents_mean == pytest.approx(written.config.latents_mean)
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(video).latent_dist.mode(), written.encode(video).latent_dist.mode())


@pytest.mark.parametrize(("override", "message"), [
    ("dataset.resolutions=[48]", r"48x48 bucket, but CosmosModule trains only at 32x32, 64x64, 80x48 \(width x height\)"),
    ("dataset.frame_buckets=[25]", r"\[25\] frames, but CosmosModule trains videos of \[9, 17, 33\] frames only"),
])
def test_cosmos1_datamodule_refuses_sizes_and_frame_counts_the_model_does_not_know(override, message, tmp_path):
    """The tiny model's allowed set (src/modules/cosmos.py TINY_SIZES, TINY_FRAMES) stands in for the released one
    (1280x704, 121 frames)."""
    with pytest.raises(ConfigError, match=message):
        run(compose_config(tmp_path / "run", *COSMOS1_RUN, override, "trainer.max_steps=1"))


def test_the_tiny_cosmos1_denoises_every_size_and_frame_count_it_allows(tmp_path):
    """model=cosmos model.tiny=true dataset=videos trains: the tiny transformer has positions for all of them."""
    module = build_module(compose_config(tmp_path / "run", *COSMOS1_RUN))
    module.configure_model()
    text = {"prompt_embeds": torch.randn(1, 16, module.denoiser.config.text_embed_dim)}
    for width, height in TINY_SIZES:
        for frames in TINY_FRAMES:
            latents = torch.randn(1, tiny_cosmos.LATENT_CHANNELS, (frames - 1) // 4 + 1, height // 4, width // 4)
            with torch.no_grad():
                output = module.run_denoiser(latents, torch.tensor([0.5]), text)
            assert output.shape == latents.shape, (width, height, frames)


def test_predict2_trains_on_the_inputs_and_timesteps_the_pipeline_gives_its_transformer(e5m2_lora_run):
    """Cosmos2TextToImagePipeline's first step at sigma = 80 (its latents x_sigma = 80 z): the transformer gets
    x_sigma / (1 + sigma) at t = sigma / (1 + sigma). Flow matching at that t, from clean latents 0 and noise z, gives
    the same input, and our predict the pipeline's transformer output."""
    module = e5m2_lora_run.module
    calls = []
    hook = module.denoiser.register_forward_hook(lambda _, args, kwargs, output: calls.append((kwargs, output[0])),
                                                 with_kwargs=True)
    z = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        module.inference_pipeline()(prompt="a cat", height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                                    latents=z, max_sequence_length=16, output_type="latent")
        hook.remove()
        inputs, output = calls[0]
        t = module._denoiser_timesteps(torch.tensor([80 / 81]))
        noisy = module.noise_schedule.add_noise(torch.zeros_like(z), z, t)
        torch.testing.assert_close(inputs["hidden_states"], noisy)
        torch.testing.assert_close(inputs["timestep"], t)
        ours = module.predict(noisy, t, {"prompt_embeds": inputs["encoder_hidden_states"]})
    torch.testing.assert_close(ours, output)
