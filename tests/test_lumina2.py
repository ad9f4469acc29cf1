"""What is special to Lumina Image 2.0 (the conformance suite checks its LoRA through our reader, the full
fine-tune's native file, resume and previews): ComfyUI's single files load the Diffusers folder's weights, and alone
(configs read off their shapes, the tokenizer from the Gemma file) encode, denoise and train as the folder; the
size-agnostic key map and config reading agree with the released configs at the real size; captions carry the reference's system
prompt, cached unpadded and collated with their mask, and condition the transformer as Lumina2Pipeline does;
lumina_shift is the reference's formula; the LoRA file's keys are the native transformer's; the 24 GB recipe trains."""
import inspect
import json
import math

import pytest
import torch
from diffusers import AutoencoderKL, Lumina2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers
from safetensors.torch import load_file, save_file
from transformers import Gemma2Config, Gemma2Model

from difftrain.config.errors import ConfigError
from difftrain.formats import lumina2 as formats
from difftrain.modules.base import skeleton
from difftrain.optim.adamw8bit_kahan import AdamW8bitKahan
from difftrain.optim.gradient_release import GradientReleaseOptimizer
from difftrain.tiny import lumina2 as tiny_lumina2
from difftrain.tiny import tiny_model
from difftrain.training import build_module, run
from tests.conftest import compose_config

LUMINA2 = ("model=lumina2", "model.dtype=float32", "dataset.resolutions=[64]")
TINY = (*LUMINA2, "model.tiny=true")
# Lumina-Image-2.0's released transformer (Alpha-VLLM/Lumina-Image-2.0 transformer/config.json).
REAL_CONFIG = dict(sample_size=128, patch_size=2, in_channels=16, hidden_size=2304, num_layers=26,
                   num_refiner_layers=2, num_attention_heads=24, num_kv_heads=8, multiple_of=256,
                   ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=[32, 32, 32],
                   axes_lens=[300, 512, 512], cap_feat_dim=2304)
# The released Flux VAE (black-forest-labs/FLUX.1-dev vae/config.json), the keys shapes and constants decide.
REAL_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                       layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4,
                       up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, sample_size=1024,
                       use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
# Gemma 2 2B's shapes (google/gemma-2-2b config.json; its other values are formats.GEMMA2_CONSTANTS).
REAL_GEMMA_SHAPES = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                         num_attention_heads=8, num_key_value_heads=4)
# The caption_prefix of the reference trainer's examples/recommended_lumina_dataset_config.toml.
REFERENCE_CAPTION_PREFIX = ("You are an assistant designed to generate high-quality images based on user prompts. "
                            "<Prompt Start> ")
PROMPTS = ["a cat", "a red cat sits on the mat"]


def loaded(tmp_path, *overrides: str):
    module = build_module(compose_config(tmp_path / "run", *LUMINA2, "adapter=none", *overrides))
    module.configure_model()
    return module.eval()


def shapes(state_dict) -> dict:
    return {key: tuple(tensor.shape) for key, tensor in state_dict.items()}


def comfyui_files(llm_path=None) -> tuple[str, ...]:
    root = tiny_model("lumina2")
    return (f"model.transformer_path={root / tiny_lumina2.COMFY_TRANSFORMER}",
            f"model.llm_path={llm_path or root / tiny_lumina2.COMFY_TEXT_ENCODER}",
            f"model.vae_path={root / tiny_lumina2.COMFY_VAE}")


def test_comfyui_single_files_load_the_diffusers_folders_weights(tmp_path):
    root = tiny_model("lumina2")
    folder = loaded(tmp_path, f"model.diffusers_path={root}")
    single_files = loaded(tmp_path, f"model.diffusers_path={root}", *comfyui_files())
    expected, actual = folder.pipeline(folder.denoiser), single_files.pipeline(single_files.denoiser)
    for part in ("transformer", "text_encoder", "vae"):
        ours, theirs = getattr(actual, part).state_dict(), getattr(expected, part).state_dict()
        assert ours.keys() == theirs.keys(), part
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), f"{part} differs from the folder's"


@torch.no_grad()
def test_comfyui_single_files_alone_encode_and_denoise_as_the_folder(tmp_path):
    folder = loaded(tmp_path, f"model.diffusers_path={tiny_model('lumina2')}")
    files_alone = loaded(tmp_path, *comfyui_files())
    assert files_alone.model_dir is None
    expected, actual = (module.load_cache_encoders().encode_captions(PROMPTS) for module in (folder, files_alone))
    for theirs, ours in zip(expected, actual):
        torch.testing.assert_close(ours["prompt_embeds"], theirs["prompt_embeds"], rtol=0, atol=1e-6)
    text = folder.collate_text(expected)
    latents, t = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.8])
    torch.testing.assert_close(files_alone.predict(latents, t, text), folder.predict(latents, t, text),
                               rtol=0, atol=1e-6)


def test_lora_trains_from_the_comfyui_single_files_alone(make_config):
    result = run(make_config(*LUMINA2, *comfyui_files(), "trainer.max_steps=2"))
    assert result.trainer.global_step == 2
    assert torch.isfinite(result.trainer.callback_metrics["train/loss"])


def test_without_folder_or_all_three_files_the_error_names_the_missing_files(tmp_path):
    config = compose_config(tmp_path / "run", *LUMINA2, comfyui_files()[0])
    with pytest.raises(ConfigError, match=r"diffusers_path is not set, nor model.llm_path and model.vae_path"):
        build_module(config)


def test_a_gemma_file_without_its_tokenizer_needs_the_folder(tmp_path):
    gemma = tmp_path / "gemma.safetensors"
    weights = load_file(tiny_model("lumina2") / tiny_lumina2.COMFY_TEXT_ENCODER)
    save_file({key: tensor for key, tensor in weights.items() if key != formats.COMFY_TOKENIZER_KEY}, gemma)
    module = build_module(compose_config(tmp_path / "run", *LUMINA2, *comfyui_files(gemma)))
    with pytest.raises(ConfigError, match=rf"{gemma} holds no tokenizer .*model.diffusers_path"):
        module.load_cache_encoders()


def test_key_map_and_config_reading_agree_with_the_released_transformer():
    """diffusers' converter hard-codes the released sizes, so it is the reference there (meta tensors: no memory);
    the config read off the native shapes is the released one (diffusers' defaults but the caption width)."""
    diffusers_state = skeleton(Lumina2Transformer2DModel, REAL_CONFIG).state_dict()
    native = formats.diffusers_to_native(diffusers_state, REAL_CONFIG)
    assert shapes(convert_lumina2_to_diffusers(dict(native))) == shapes(diffusers_state)
    assert shapes(formats.native_to_diffusers(native, REAL_CONFIG, "native")) == shapes(diffusers_state)
    defaults = {name: parameter.default for name, parameter
                in inspect.signature(Lumina2Transformer2DModel.__init__).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    as_json = lambda config: json.loads(json.dumps({**defaults, **config}))  # noqa: E731 (tuples as lists)
    assert as_json(formats.transformer_config(native)) == as_json(REAL_CONFIG)


def test_gemma_and_vae_configs_read_off_the_released_shapes():
    with torch.device("meta"):
        gemma = Gemma2Model(Gemma2Config(**REAL_GEMMA_SHAPES, **formats.GEMMA2_CONSTANTS))
    read = formats.gemma_config(formats.gemma_to_comfyui(gemma.state_dict(), spiece=b"model"))
    assert {key: getattr(read, key) for key in REAL_GEMMA_SHAPES} == REAL_GEMMA_SHAPES
    assert formats.vae_config(formats.vae_to_comfyui(skeleton(AutoencoderKL, REAL_VAE_CONFIG))) == REAL_VAE_CONFIG


def transformer_inputs_of_a_render(module, prompt: str) -> dict:
    seen = {}

    def record(_, args, kwargs) -> None:
        seen.setdefault("inputs", kwargs)

    handle = module.denoiser.register_forward_pre_hook(record, with_kwargs=True)
    module.render(prompt, width=64, height=64, steps=1, seed=0, guidance=1.0)
    handle.remove()
    return seen["inputs"]


@torch.no_grad()
def test_captions_carry_the_system_prompt_and_condition_the_transformer_as_the_pipeline(tmp_path):
    module = loaded(tmp_path, "model.tiny=true")
    encoders = module.load_cache_encoders()
    cached = encoders.encode_captions(PROMPTS)
    pipe = encoders.pipe
    for caption, entry in zip(PROMPTS, cached):  # unpadded: exactly the tokens of the prefixed caption
        ids = pipe.tokenizer(REFERENCE_CAPTION_PREFIX + caption, return_tensors="pt").input_ids
        expected = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2][0]
        torch.testing.assert_close(entry["prompt_embeds"], expected)
    text = module.collate_text(cached)
    lengths = text["prompt_embeds_mask"].sum(1).tolist()
    assert lengths == [len(entry["prompt_embeds"]) for entry in cached] and lengths[0] < lengths[1]
    for i, prompt in enumerate(PROMPTS):  # Lumina2Pipeline pads to 256 tokens and flips time and sign
        fed = transformer_inputs_of_a_render(module, prompt)
        one = {key: value[i:i + 1] for key, value in text.items()}
        ours = module.predict(fed["hidden_states"], 1 - fed["timestep"], one)
        theirs = -module.denoiser(**{**fed, "return_dict": False})[0]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [512, 1024])
def test_lumina_shift_is_the_reference_formula(size, tmp_path):
    module = build_module(compose_config(tmp_path / "run", *TINY))
    latents = torch.zeros(1, 16, size // 8, size // 8)
    u = torch.tensor([0.1, 0.5, 0.9])
    base = torch.sigmoid(torch.special.ndtri(u.double()))
    h, w = latents.shape[-2:]
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * ((h // 2) * (w // 2) - 256)
    expected = math.exp(mu) / (math.exp(mu) + (1 / base - 1))
    torch.testing.assert_close(module.timesteps.at_quantiles(u, module.image_seq_len(latents)), expected.float())
    unshifted = build_module(compose_config(tmp_path / "off", *TINY, "model.lumina_shift=false"))
    torch.testing.assert_close(unshifted.timesteps.at_quantiles(u, module.image_seq_len(latents)), base.float())
    constant = build_module(compose_config(tmp_path / "constant", *TINY, "model.shift=3"))  # wins, as in the reference
    torch.testing.assert_close(constant.timesteps.at_quantiles(u, module.image_seq_len(latents)),
                               (3 * base / (1 + 2 * base)).float())


def test_lora_keys_are_the_native_transformers_weights(tmp_path):
    module = build_module(compose_config(tmp_path / "run", *TINY, "adapter.rank=4"))
    module.configure_model()
    module.export_lora(module.lora_state_dict(), tmp_path)
    lora = load_file(tmp_path / "adapter_model.safetensors")
    native = load_file(tiny_model("lumina2") / tiny_lumina2.COMFY_TRANSFORMER)
    modules = {key.removeprefix("diffusion_model.").rsplit(".lora_", 1)[0] for key in lora}
    assert {"layers.0.attention.qkv", "noise_refiner.0.adaLN_modulation.1", "context_refiner.0.feed_forward.w2"} <= modules
    for name in modules:
        rows, columns = native[f"{name}.weight"].shape
        down, up = lora[f"diffusion_model.{name}.lora_A.weight"], lora[f"diffusion_model.{name}.lora_B.weight"]
        assert (up.shape[0], down.shape[1]) == (rows, columns), name
    assert len(lora) == 2 * len(modules)


def test_fft_24gb_recipe_trains_at_tiny_size(make_config):
    result = run(make_config("experiment=lumina2_fft_24gb", "model.tiny=true", "dataset.resolutions=[64]",
                             "trainer.max_steps=2"))
    assert result.trainer.global_step == 2
    assert torch.isfinite(result.trainer.callback_metrics["train/loss"])
    optimizer = result.trainer.optimizers[0]
    assert isinstance(optimizer, GradientReleaseOptimizer)
    assert all(isinstance(inner, AdamW8bitKahan) for inner in optimizer.per_param.values())
