"""What is special to Qwen-Image (the conformance suite checks LoRA in QwenImagePipeline / QwenImageEditPipeline,
full fine-tune, fp8, resume, previews): the transformer gets what diffusers' pipelines feed it (text through the
pipelines' own template, unpadded and masked per batch; Edit: control tokens, img_shapes and the VL encoder's view
of the control), the single-file layouts load, the refused ones are refused clearly, and the 24 GB recipe trains."""
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from difftrain.datamodules.media import load_image
from difftrain.modules.qwen_image import condition_area, to_pil
from difftrain.tiny import qwen_image as tiny_qwen
from difftrain.training import build_module, run
from tests.conftest import ROOT, compose_config

TINY = ("model.tiny=true", "model.dtype=float32", "adapter=none")
CONTROL = ROOT / "data" / "examples" / "edit" / "control"
PROMPT = "make the circle red"


def qwen_module(tmp_path, *overrides):
    module = build_module(compose_config(tmp_path / "run", *overrides))
    module.configure_model()
    return module.eval()


def recorder(model: torch.nn.Module) -> dict:
    """Records the keyword arguments of the model's first call."""
    seen = {}

    def record(_, args, kwargs) -> None:
        seen.setdefault("inputs", kwargs)

    model.register_forward_pre_hook(record, with_kwargs=True)
    return seen


def pipeline_transformer_inputs(module, prompt: str, **call) -> dict:
    pipe = module.inference_pipeline()
    seen = recorder(pipe.transformer)
    with condition_area(64 * 64):
        pipe(prompt=prompt, width=64, height=64, num_inference_steps=1, true_cfg_scale=1.0, output_type="latent",
             **call)
    return seen["inputs"]


def control_pixels(tmp_path, count: int) -> torch.Tensor:
    """Control images as the datamodule gives them: scaled and centre-cropped to the target's bucket,
    [1, count, 3, H, W]."""
    controls = []
    for i, source in enumerate(sorted(CONTROL.iterdir())[:count]):
        control_file = tmp_path / f"control{i}.png"
        Image.open(source).convert("RGB").resize((48, 80)).save(control_file)
        controls.append(load_image(control_file, (64, 64)))
    return torch.stack(controls)[None]


@pytest.mark.parametrize("model,references", [("qwen_image_edit", 1), ("qwen_image_edit_plus", 2)])
@torch.no_grad()
def test_edit_transformer_inputs_equal_the_pipelines(tmp_path, model, references):
    module = qwen_module(tmp_path, f"model={model}", *TINY, "dataset=edit_example")
    controls = control_pixels(tmp_path, references)
    images = [to_pil(control) for control in controls[0]]
    fed = pipeline_transformer_inputs(module, PROMPT, image=images if references > 1 else images[0])

    encoders = module.load_cache_encoders()
    encoded = encoders.encode_images(torch.zeros(1, 3, 64, 64), controls=controls)
    text = encoders.encode_captions([PROMPT], images=[controls[0]])[0]
    assert encoded["control_latents"].shape == (1, references, 4, 16, 16)  # the tiny VAE's factor is 4
    ours = recorder(module.denoiser)
    module.predict(torch.randn(1, 4, 16, 16), torch.tensor([0.5]), {"prompt_embeds": text["prompt_embeds"][None]},
                   cond={"control_latents": encoded["control_latents"]})
    ours = ours["inputs"]

    count = 64  # the target's 8 x 8 tokens come first
    torch.testing.assert_close(ours["hidden_states"][:, count:], fed["hidden_states"][:, count:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["encoder_hidden_states"], fed["encoder_hidden_states"], rtol=1e-5, atol=1e-5)
    assert ours["img_shapes"] == [list(shape) for shape in fed["img_shapes"]] == [[(1, 8, 8)] * (1 + references)]
    plain = encoders.encode_captions([PROMPT])[0]["prompt_embeds"]
    assert plain.shape != text["prompt_embeds"].shape or not torch.allclose(plain, text["prompt_embeds"]), \
        "the control image did not reach the text encoder"


@torch.no_grad()
def test_text_is_cached_unpadded_and_masked_per_batch(tmp_path):
    module = qwen_module(tmp_path, "model=qwen_image", *TINY)
    captions = ["a cat", "a photo of a dog running on the beach at sunset"]
    texts = module.load_cache_encoders().encode_captions(captions)
    for caption, text in zip(captions, texts):
        fed = pipeline_transformer_inputs(module, caption)
        torch.testing.assert_close(text["prompt_embeds"][None], fed["encoder_hidden_states"], rtol=1e-5, atol=1e-5)
    batch = module.collate_text(texts)
    assert batch["prompt_embeds_mask"].sum(1).tolist() == [len(t["prompt_embeds"]) for t in texts]

    noisy, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.7])
    together = module.predict(noisy, t, batch)
    for i, text in enumerate(texts):
        alone = module.predict(noisy[i:i + 1], t[i:i + 1], {"prompt_embeds": text["prompt_embeds"][None]})
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_comfyui_single_files_load_as_the_folder(tmp_path):
    folder_module = qwen_module(tmp_path, "model=qwen_image", *TINY)
    root = folder_module.model_dir
    files = qwen_module(tmp_path, "model=qwen_image", *TINY, f"model.transformer_path={root / tiny_qwen.COMFY_TRANSFORMER}",
                        f"model.text_encoder_path={root / tiny_qwen.COMFY_TEXT_ENCODER}",
                        f"model.vae_path={root / tiny_qwen.VAE_FILE}")
    for load in ("load_text_encoder", "load_vae"):
        expected, actual = getattr(folder_module, load)().state_dict(), getattr(files, load)().state_dict()
        assert expected.keys() == actual.keys() and all(torch.equal(actual[k], v) for k, v in expected.items()), load
    expected, actual = folder_module.denoiser.state_dict(), files.denoiser.state_dict()
    assert expected.keys() == actual.keys() and all(torch.equal(actual[k], v) for k, v in expected.items())


@torch.no_grad()
def test_edit_from_a_qwen_image_folder_and_the_edit_single_file(tmp_path):
    """A Qwen-Image folder has no processor/: the Edit model builds Qwen2.5-VL's own from the tokenizer."""
    tiny = qwen_module(tmp_path, "model=qwen_image_edit", *TINY, "dataset=edit_example")
    folder = tmp_path / "Qwen-Image"
    shutil.copytree(tiny.model_dir, folder, ignore=shutil.ignore_patterns("processor", "comfyui"))
    module = qwen_module(tmp_path, "model=qwen_image_edit", *TINY, "model.tiny=false", f"model.diffusers_path={folder}",
                         f"model.transformer_path={tiny.model_dir / tiny_qwen.COMFY_TRANSFORMER}")
    controls = control_pixels(tmp_path, 1)
    expected = tiny.load_cache_encoders().encode_captions([PROMPT], images=[controls[0]])[0]["prompt_embeds"]
    actual = module.load_cache_encoders().encode_captions([PROMPT], images=[controls[0]])[0]["prompt_embeds"]
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(module.denoiser.state_dict().values(),
                                                 tiny.denoiser.state_dict().values()))


def test_comfyui_vae_and_fp8_scaled_files_are_refused(tmp_path):
    root = qwen_module(tmp_path, "model=qwen_image", *TINY).model_dir
    comfy_vae = tmp_path / "qwen_image_vae.safetensors"
    save_file({"encoder.conv1.weight": torch.zeros(1), "decoder.conv1.weight": torch.zeros(1)}, comfy_vae)
    module = build_module(compose_config(tmp_path / "vae", "model=qwen_image", *TINY, f"model.vae_path={comfy_vae}"))
    with pytest.raises(ValueError, match="ComfyUI's Qwen-Image VAE.*not supported.*diffusers VAE file"):
        module.load_vae()

    scaled = tmp_path / "qwen_image_fp8_e4m3fn_scaled.safetensors"
    weights = load_file(root / tiny_qwen.COMFY_TRANSFORMER)
    save_file({**weights, "model.diffusion_model.img_in.scale_weight": torch.ones(1)}, scaled)
    module = build_module(compose_config(tmp_path / "fp8", "model=qwen_image", *TINY, f"model.transformer_path={scaled}"))
    with pytest.raises(ValueError, match="fp8-scaled"):
        module.load_denoiser()


def test_24gb_recipe_trains_at_tiny_size(make_config):
    # the tiny Qwen-Image has 4 blocks, so at most 2 swap
    result = run(make_config("experiment=qwen_image_24gb", "model.tiny=true", "dataset.resolutions=[64]",
                             "trainer.max_steps=2", "model.blocks_to_swap=2"))
    assert result.trainer.global_step == 2
    assert torch.isfinite(result.trainer.callback_metrics["train/loss"])
