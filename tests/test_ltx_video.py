"""LTX-Video: the single file read by diffusers' own loader, its frame rule, latents normalised and the
transformer called as LTXPipeline does, and first-frame (image-to-video) conditioning against hand-computed
timesteps and loss. The LoRA, fp8 base, resume and preview are the conformance suite's."""
import pytest
import torch
from diffusers import LTXPipeline
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors.torch import load_file

from difftrain.config.validate import ConfigError
from difftrain.datamodules.cache import EmbeddingCache
from difftrain.datamodules.datamodule import MediaToEncode
from difftrain.modules.base import weighted_mse
from difftrain.tiny.ltx_video import SINGLE_FILE
from difftrain.training import build_module, run
from tests.conftest import compose_config

FAST = ("model=ltx_video", "model.tiny=true", "model.dtype=float32", "model.max_sequence_length=16", "dataset=videos",
        "dataset.resolutions=[32]", "dataset.frame_buckets=[1,9]")
LATENT = (8, 3, 4, 4)  # channels, latent frames, h, w: 16 tokens per latent frame


def loaded(run_dir, *overrides: str):
    module = build_module(compose_config(run_dir, *FAST, "adapter=none", *overrides))
    module.configure_model()
    return module


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return loaded(tmp_path_factory.mktemp("ltx") / "run")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short image-to-video-mixed LoRA run on the bundled videos, at a size that is no multiple of 32."""
    return run(compose_config(tmp_path_factory.mktemp("ltx_run") / "run", *FAST, "dataset.resolutions=[48]",
                              "model.first_frame_conditioning_p=0.5", "trainer.max_steps=2",
                              "checkpoint_every_n_steps=null"))


def assert_same_weights(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, reference = ours.state_dict(), reference.state_dict()
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[key], reference[key]) for key in ours)


def test_single_file_gives_the_folders_transformer_and_vae(base, tmp_path):
    single_file = base.model_dir / SINGLE_FILE
    assert infer_diffusers_model_type(load_file(single_file)) == "ltx-video"  # diffusers knows it as LTX's own
    from_file = loaded(tmp_path / "run", f"model.single_file_path={single_file}")
    assert_same_weights(from_file.denoiser, base.denoiser)
    assert_same_weights(from_file._vae(), base._vae())
    assert from_file.cache_fingerprints()[0] != base.cache_fingerprints()[0]  # its VAE caches apart
    assert from_file.cache_fingerprints()[1] == base.cache_fingerprints()[1]  # the folder's T5 for both


def test_frame_buckets_must_be_8k_plus_1(make_config):
    with pytest.raises(ConfigError, match=r"\[5\] cannot be encoded; frame counts must be of the form 8k\+1"):
        run(make_config(*FAST, "dataset.frame_buckets=[1,5]", "trainer.max_steps=1"))


def test_cached_latents_are_normalised_as_ltx_pipeline_does_at_32_pixel_multiples(trained):
    pipe = trained.module.inference_pipeline()
    vae = pipe.vae
    samples = trained.datamodule.train_set.samples
    encode = MediaToEncode(samples)
    for i, sample in enumerate(samples):
        pixels = encode[i][1]
        assert pixels.shape[-1] % 32 == 0 and pixels.shape[-2] % 32 == 0
        video = pixels.unsqueeze(1) if pixels.ndim == 3 else pixels
        raw = vae.encode(video[None]).latent_dist.mode()
        cached = EmbeddingCache.read(sample.latent_path)["latents"]
        restored = pipe._denormalize_latents(cached[None], vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        torch.testing.assert_close(restored, raw, atol=1e-5, rtol=1e-5)
    assert trained.module.timesteps.method == "logit_normal"  # the family's default


@torch.no_grad()
def test_predict_is_the_transformer_call_of_ltx_pipeline(base):
    """LTXPipeline's own first denoising step (its packing, t * 1000, rope scale at 25 fps, text mask) against
    `predict` on the same input: the same prediction."""
    base.eval()
    calls = []
    hook = base.denoiser.register_forward_hook(lambda m, args, kwargs, out: calls.append((kwargs, out[0])),
                                               with_kwargs=True)
    try:
        base.inference_pipeline()(prompt="a dancing monkey", num_frames=9, height=32, width=32, num_inference_steps=1,
                                  guidance_scale=1.0, max_sequence_length=16, output_type="latent",
                                  generator=torch.Generator().manual_seed(0))
        inputs, expected = calls[0]
        frames, height, width = inputs["num_frames"], inputs["height"], inputs["width"]
        ours = base.predict(LTXPipeline._unpack_latents(inputs["hidden_states"], frames, height, width),
                            inputs["timestep"] / 1000, {"prompt_embeds": inputs["encoder_hidden_states"],
                                                        "prompt_attention_mask": inputs["encoder_attention_mask"]})
    finally:
        hook.remove()
    torch.testing.assert_close(ours, LTXPipeline._unpack_latents(expected, frames, height, width))


def training_step_inputs(module, p: float, num_frames: int = LATENT[1]):
    """forward_loss on two random samples at t = 0.3 and 0.7 with first_frame_conditioning_p=p: (the denoiser's
    hidden states, timesteps, output), the batch, the noise and the loss."""
    module.train()
    module.first_frame_conditioning_p = p
    generator = torch.Generator().manual_seed(0)
    shape = (2, LATENT[0], num_frames, *LATENT[2:])
    latents, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    text = {"prompt_embeds": torch.randn(2, 4, 32, generator=generator), "prompt_attention_mask": torch.ones(2, 4).bool()}
    calls = []
    hook = module.denoiser.register_forward_hook(lambda m, args, kwargs, out: calls.append((kwargs, out[0])),
                                                 with_kwargs=True)
    try:
        loss = module.forward_loss({"latents": latents, "text": text}, torch.tensor([0.3, 0.7]), noise)
    finally:
        hook.remove()
        module.eval()
    inputs, output = calls[0]
    return inputs["hidden_states"], inputs["timestep"], output, latents, noise, loss


@torch.no_grad()
def test_first_frame_conditioning_keeps_the_first_latent_frame_clean_and_out_of_the_loss(base):
    hidden, timestep, output, latents, noise, loss = training_step_inputs(base, p=1.0)
    tokens_per_frame = LATENT[2] * LATENT[3]
    t = torch.tensor([0.3, 0.7])[:, None]
    # tokens are frame-major: the first 16 of each sample are its first latent frame
    expected_timestep = torch.cat([torch.zeros(2, tokens_per_frame), (t * 1000).expand(2, 2 * tokens_per_frame)], 1)
    torch.testing.assert_close(timestep, expected_timestep)
    packed = LTXPipeline._pack_latents
    noisy = packed((1 - t[..., None, None, None]) * latents + t[..., None, None, None] * noise)
    torch.testing.assert_close(hidden[:, :tokens_per_frame], packed(latents)[:, :tokens_per_frame])
    torch.testing.assert_close(hidden[:, tokens_per_frame:], noisy[:, tokens_per_frame:])
    prediction = LTXPipeline._unpack_latents(output, *LATENT[1:])
    later_frames = ((prediction - (noise - latents))[:, :, 1:] ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss, later_frames)


@torch.no_grad()
def test_first_frame_conditioning_zero_trains_text_to_video(base):
    hidden, timestep, output, latents, noise, loss = training_step_inputs(base, p=0.0)
    t = torch.tensor([0.3, 0.7])
    torch.testing.assert_close(timestep, t * 1000)
    torch.testing.assert_close(hidden, LTXPipeline._pack_latents((1 - t.view(2, 1, 1, 1, 1)) * latents
                                                                 + t.view(2, 1, 1, 1, 1) * noise))
    torch.testing.assert_close(loss, weighted_mse(LTXPipeline._unpack_latents(output, *LATENT[1:]), noise - latents))


@torch.no_grad()
def test_images_and_eval_stay_text_to_video_whatever_the_probability(base):
    _, timestep, *_ = training_step_inputs(base, p=1.0, num_frames=1)  # an image: no frame left to train
    assert timestep.shape == (2,)
    base.first_frame_conditioning_p = 1.0
    assert not base.eval().draw_first_frame_conditioning(torch.zeros(2, *LATENT)).any()


def test_first_frame_conditioning_p_must_be_a_probability(make_config):
    with pytest.raises(ConfigError, match=r"model.first_frame_conditioning_p=1.5 is not a probability"):
        build_module(make_config(*FAST, "model.first_frame_conditioning_p=1.5"))
