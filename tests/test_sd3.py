"""What is special to SD3 / SD3.5 (the conformance suite checks the LoRA in StableDiffusion3Pipeline, full fine-tune,
fp8, resume, previews): both transformer layouts load and train, the cache holds what StableDiffusion3Pipeline
encodes (three text encoders, the VAE's shifted and scaled 16-channel latents), and training's flow matching is the
one the pipeline's scheduler integrates."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from difftrain.datamodules.cache import EmbeddingCache
from difftrain.datamodules.media import load_image
from difftrain.tiny import sd3 as tiny_sd3
from difftrain.tiny import tiny_model
from difftrain.training import build_module, run
from tests.conftest import compose_config
from tests.test_conformance import parameters_without_gradient
from tests.test_qwen_image import recorder

TINY = ("model=sd3", "model.dtype=float32", "model.max_sequence_length=16", "dataset.resolutions=[64]")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short LoRA run on the tiny SD3.5 with the resolution-dependent shift."""
    return run(compose_config(tmp_path_factory.mktemp("sd3") / "run", *TINY, "model.tiny=true", "model.flux_shift=true",
                              "trainer.max_steps=1", "checkpoint_every_n_steps=null"))


def sd3_medium_folder(tmp_path):
    """The tiny folder with an SD3 Medium transformer: no dual attention layers, no qk-norm."""
    folder = tmp_path / "sd3-medium"
    folder.mkdir()
    for entry in tiny_model("sd3").iterdir():
        if entry.name != "transformer":
            (folder / entry.name).symlink_to(entry)
    tiny_sd3.transformer(tiny_sd3.SD3_TRANSFORMER_CONFIG).save_pretrained(folder / "transformer")
    return folder


@pytest.mark.parametrize("layout", ["sd3.5", "sd3"])
def test_both_transformer_layouts_load_and_every_weight_trains(layout, tmp_path):
    """Full fine-tune: every trainable weight gets a gradient (the last block's discarded text queries, which differ
    between the layouts, are frozen)."""
    model = ("model.tiny=true",) if layout == "sd3.5" else (f"model.diffusers_path={sd3_medium_folder(tmp_path)}",)
    module = build_module(compose_config(tmp_path / "run", *TINY, *model, "adapter=none"))
    module.configure_model()
    blocks = module.denoiser.transformer_blocks
    assert any(block.attn2 is not None for block in blocks) == (layout == "sd3.5")
    assert (blocks[0].attn.norm_q is not None) == (layout == "sd3.5")
    text = {"prompt_embeds": torch.randn(1, 77 + 16, tiny_sd3.T5_WIDTH),
            "pooled_prompt_embeds": torch.randn(1, tiny_sd3.CLIP_L_WIDTH + tiny_sd3.CLIP_G_WIDTH)}
    batch = {"latents": torch.randn(1, 16, 8, 8), "text": text}
    assert not parameters_without_gradient(module.train(), batch)


def test_cache_holds_what_the_pipeline_encodes(trained):
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model("sd3"), local_files_only=True)
    vae = pipe.vae
    samples = trained.datamodule.train_set.samples[:2]
    for sample in samples:
        text = EmbeddingCache.read(sample.text_path)
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(sample.item.caption, None, None, max_sequence_length=16,
                                                         do_classifier_free_guidance=False)
        torch.testing.assert_close(text["prompt_embeds"], prompt_embeds[0])  # batched vs alone: float rounding
        torch.testing.assert_close(text["pooled_prompt_embeds"], pooled[0])  # batched vs alone: float rounding

        latents = EmbeddingCache.read(sample.latent_path)["latents"]
        width, height = sample.size
        assert latents.shape == (16, height // 8, width // 8)  # SD3's 16 channels, the VAE's factor 8
        with torch.no_grad():
            encoded = vae.encode(load_image(sample.item.path, sample.size)[None]).latent_dist.mode()[0]
        # what the pipeline does to latents before decoding them
        torch.testing.assert_close(latents / vae.config.scaling_factor + vae.config.shift_factor, encoded)


@torch.no_grad()
def test_training_is_the_flow_matching_the_pipeline_samples(trained):
    """At the same noise level the denoiser gets the pipeline's timestep, and one step of the pipeline's scheduler
    with our target as the model output lands on the clean latents; flux_shift shifts by the tokens it sees."""
    module = trained.module.eval()
    pipe = module.inference_pipeline()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(sigmas=[0.7])  # the pipeline's noise level at its first (and only) step
    t = scheduler.sigmas[:1]
    batch = next(iter(trained.datamodule.train_dataloader()))
    latents, noise = batch["latents"], torch.randn(batch["latents"].shape)
    noisy = module.noise_schedule.add_noise(latents, noise, t)
    ours = recorder(module.denoiser)
    module.predict(noisy, t, module.conditioning(batch))

    fed = recorder(pipe.transformer)
    pipe(prompt="a red square", width=64, height=64, sigmas=[0.7], guidance_scale=1.0, output_type="latent")
    torch.testing.assert_close(ours["inputs"]["timestep"], fed["inputs"]["timestep"])
    target = module.noise_schedule.target(latents, noise, t)
    torch.testing.assert_close(scheduler.step(target, scheduler.timesteps[0], noisy).prev_sample, latents)

    patch, (h, w) = module.denoiser.config.patch_size, latents.shape[-2:]
    assert module.timesteps.flux_shift and module.image_seq_len(latents) == (h // patch) * (w // patch)
