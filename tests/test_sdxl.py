"""What is special to SDXL (the conformance suite checks the LoRA in diffusers' loader, the full fine-tune reload,
resume): the kohya keys and metadata, the full fine-tune read back by diffusers' from_single_file, the DDPM objectives
against values computed by hand, the SGM names against the reference layout of SDXL base."""
import os
import re
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from difftrain.config.validate import ConfigError
from difftrain.datamodules.datamodule import Sample, collate
from difftrain.datamodules.media import MediaItem, load_image
from difftrain.formats.sdxl import SDXL_BASE_CONFIG_DIR, kohya_module_name, unet_block_map, unet_to_sgm, vae_to_ldm
from difftrain.modules.base import DiffusionModule
from difftrain.modules.sdxl import SDXLModule
from difftrain.tiny import sdxl as tiny_sdxl
from difftrain.tiny import tiny_model_dir
from difftrain.training import run
from tests.conftest import ROOT, compose_config

FAST = ("model=sdxl_tiny", "dataset.resolutions=[64]", "trainer.max_steps=3", "checkpoint_every_n_steps=null")
RANK, ALPHA = 4, 8
PARTS = {"denoiser": "unet", "text_encoder_1": "text_encoder", "text_encoder_2": "text_encoder_2"}
# kohya's SDXL naming rule (lora-formats.md §1.1): SGM UNet paths, HF CLIP paths for both encoders.
KOHYA_KEY = re.compile(
    r"^lora_(unet_(input_blocks|output_blocks)_\d+_1|unet_middle_block_1|te[12]_text_model_encoder_layers_\d+)"
    r"_(proj_in|proj_out|transformer_blocks_\d+_(attn[12]_to_(q|k|v|out_0)|ff_net_(0_proj|2))"
    r"|self_attn_(q|k|v|out)_proj|mlp_fc[12])\.(lora_down\.weight|lora_up\.weight|alpha)$")


def tiny_pipeline() -> StableDiffusionXLPipeline:
    """The untrained tiny SDXL as a user would load it: diffusers' single-file loader, offline, local config."""
    folder = tiny_model_dir("sdxl", tiny_sdxl.build)
    return StableDiffusionXLPipeline.from_single_file(str(folder / tiny_sdxl.CHECKPOINT_FILE), config=str(folder),
                                                      local_files_only=True)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One LoRA training run shared by the tests that inspect its result."""
    run_dir = tmp_path_factory.mktemp("sdxl-lora") / "run"
    return run(compose_config(run_dir, *FAST, f"adapter.rank={RANK}", f"adapter.alpha={ALPHA}", "optimizer.lr=1e-2"))


def lora_file(result):
    return result.final_export / "lora.safetensors"


def test_lora_trains_unet_and_both_text_encoders(lora_run):
    for part in PARTS:
        module = lora_run.module.model_parts()[part]
        lora_b = [p for n, p in module.named_parameters() if "lora_B" in n and p.requires_grad]
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b), f"training left a lora_B of {part} at zero"
    # Text encoder 1 is read at its penultimate layer: its last layer cannot learn, so it does not train.
    last_layer = lora_run.module.model_parts()["text_encoder_1"].encoder.layers[-1]
    assert not any(p.requires_grad for p in last_layer.parameters())


def test_two_process_ddp_trains_every_part(tmp_path):
    """DDP fails on a trainable parameter that gets no gradient; every part must train on both ranks."""
    result = subprocess.run(
        [sys.executable, "train.py", "model=sdxl_tiny", "trainer.devices=2", "trainer.strategy=ddp",
         "trainer.accelerator=cpu", "trainer.max_steps=2", "dataset.resolutions=[64]", "logger=none",
         f"hydra.run.dir={tmp_path / 'run'}", f"dataset.cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    keys = load_file(tmp_path / "run" / "exports" / "final" / "lora.safetensors")
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}


def test_kohya_keys_names_alpha_and_metadata(lora_run):
    path = lora_file(lora_run)
    tensors = load_file(path)
    bad = [k for k in tensors if not KOHYA_KEY.match(k)]
    assert not bad, bad[:5]
    bases = {k.split(".")[0] for k in tensors}
    assert {b.split("_")[1] for b in bases} == {"unet", "te1", "te2"}
    for base in bases:
        down, up = tensors[f"{base}.lora_down.weight"], tensors[f"{base}.lora_up.weight"]
        assert down.shape[0] == up.shape[1] == RANK, base
        assert tensors[f"{base}.alpha"].ndim == 0 and tensors[f"{base}.alpha"].item() == ALPHA, base
    assert len(tensors) == 3 * len(bases)  # nothing but down, up and alpha per module

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (str(RANK), str(ALPHA))
    assert metadata["ss_steps"] == "3" and metadata["format"] == "pt"


def test_full_finetune_exports_the_original_checkpoint_that_loads_back(tmp_path):
    first = run(compose_config(tmp_path / "first", *FAST, "trainer.max_steps=2", "adapter=none",
                               "optimizer.lr=1e-3"))
    exported = first.final_export / "model.safetensors"
    assert {k.split(".")[0] for k in load_file(exported)} == {"model", "conditioner", "first_stage_model"}

    original, trained = tiny_pipeline(), first.module.model_parts()
    folder = tiny_model_dir("sdxl", tiny_sdxl.build)
    reloaded = StableDiffusionXLPipeline.from_single_file(str(exported), config=str(folder), local_files_only=True)
    for part, name in PARTS.items():
        ours, theirs, before = (m.state_dict() for m in (trained[part], getattr(reloaded, name),
                                                          getattr(original, name)))
        assert ours.keys() == theirs.keys(), part
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part
        assert any(not torch.equal(ours[k], before[k]) for k in ours), f"full fine-tune left {part} unchanged"
    vae, vae_before = reloaded.vae.state_dict(), original.vae.state_dict()
    assert vae.keys() == vae_before.keys() and all(torch.equal(vae[k], vae_before[k]) for k in vae)


def test_part_learning_rates_and_freezing(tmp_path):
    result = run(compose_config(tmp_path / "run", *FAST, "trainer.max_steps=2", "optimizer.lr=1e-2",
                                "model.unet_lr=1e-3", "model.text_encoder_1_lr=0"))
    groups = result.trainer.optimizers[0].param_groups
    lrs = {id(p): group["initial_lr"] for group in groups for p in group["params"]}
    parts = result.module.model_parts()
    assert {lrs[id(p)] for p in parts["denoiser"].parameters() if p.requires_grad} == {1e-3}
    assert {lrs[id(p)] for p in parts["text_encoder_2"].parameters() if p.requires_grad} == {1e-2}
    assert not any(p.requires_grad for p in parts["text_encoder_1"].parameters())
    assert not any(hasattr(m, "lora_A") for m in parts["text_encoder_1"].modules())
    keys = load_file(lora_file(result))
    assert not any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)


# --- the DDPM objectives, by hand
def hand_alphas_cumprod(zero_terminal_snr: bool) -> torch.Tensor:
    """SDXL's scaled_linear schedule; with zero terminal SNR rescaled as in Lin et al. / sd-scripts."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    if zero_terminal_snr:
        root = alphas_cumprod.sqrt()
        root = (root - root[-1]) * root[0] / (root[0] - root[-1])
        alphas_cumprod = root ** 2
    return alphas_cumprod


@pytest.fixture(scope="module")
def full_module():
    def make(**loss):
        module = SDXLModule(tiny=True, dtype="float32", **loss)
        module.configure_model()
        return module.eval()
    return make


def fixed_batch() -> tuple[dict, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    batch = {"latents": torch.randn(2, 4, 8, 8, generator=g),
             "text": {"input_ids_1": torch.randint(0, 500, (2, 77), generator=g),
                      "input_ids_2": torch.randint(0, 500, (2, 77), generator=g)},
             "original_size": torch.tensor([[64, 64], [80, 48]]), "crop_top_left": torch.tensor([[0, 0], [8, 0]]),
             "target_size": torch.tensor([[64, 64], [64, 64]])}
    return batch, torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.2505, 0.9])  # timesteps 250 and 900


@pytest.mark.parametrize("v_pred", [False, True])
@pytest.mark.parametrize("weighting", [None, "min_snr_gamma", "debiased_estimation_loss"])
def test_loss_matches_the_hand_computed_value(full_module, v_pred, weighting):
    extra = {"min_snr_gamma": 5.0} if weighting == "min_snr_gamma" else {weighting: True} if weighting else {}
    module = full_module(v_pred=v_pred, **extra)
    batch, noise, t = fixed_batch()
    index = torch.tensor([250, 900])
    alpha = hand_alphas_cumprod(v_pred)[index].view(-1, 1, 1, 1)
    x = batch["latents"].double()
    noisy = alpha.sqrt() * x + (1 - alpha).sqrt() * noise.double()
    target = alpha.sqrt() * noise.double() - (1 - alpha).sqrt() * x if v_pred else noise.double()
    snr = (alpha / (1 - alpha)).flatten()
    weights = {None: torch.ones(2, dtype=torch.float64),
               "min_snr_gamma": snr.clamp(max=5.0) / (snr + 1 if v_pred else snr),
               "debiased_estimation_loss": 1 / (snr + 1) if v_pred else 1 / snr.clamp(max=1000).sqrt()}[weighting]
    with torch.no_grad():
        prediction = module.predict(noisy.float(), index, module.conditioning(batch)).double()
        expected = (((prediction - target) ** 2).mean(dim=(1, 2, 3)) * weights).mean()
        loss = module.forward_loss(batch, t, noise)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)


def test_uniform_timesteps_cover_every_ddpm_step(full_module):
    module = full_module()
    t = module.timesteps.sample(200_000, 64, torch.Generator().manual_seed(0))
    steps = module.noise_schedule.denoiser_timesteps(t)
    assert steps.dtype == torch.int64 and steps.min() == 0 and steps.max() == 999
    counts = torch.bincount(steps, minlength=1000).float()
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()


def test_micro_conditioning_describes_the_crop_the_datamodule_took(tmp_path, full_module):
    """A 120x40 image in a 64x64 bucket: scaled to 192x64, the centre crop starts 64 pixels in."""
    image = torch.randint(0, 256, (3, 40, 120), dtype=torch.uint8)
    path = tmp_path / "wide.png"
    F.to_pil_image(image).save(path)
    sample = Sample(MediaItem(path, "wide", 120, 40), (64, 64), tmp_path / "l", tmp_path / "t")
    geometry = sample.geometry()
    top, left = geometry["crop_top_left"].tolist()
    scaled = F.resize(image, [64, 192], interpolation=InterpolationMode.BICUBIC, antialias=True)
    expected = F.to_dtype(scaled[:, top:top + 64, left:left + 64], torch.float32, scale=True) * 2 - 1
    torch.testing.assert_close(load_image(path, (64, 64)), expected)

    batch = collate([{"latents": torch.zeros(4, 8, 8), "text": {}, **geometry}])
    time_ids = full_module().conditioning(batch)["time_ids"]
    assert time_ids.tolist() == [[40, 120, top, left, 64, 64]] and (top, left) == (0, 64)


# --- the maps at SDXL base size (meta tensors: names and shapes, no weights)
@pytest.fixture(scope="module")
def sdxl_base():
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_BASE_CONFIG_DIR / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL_BASE_CONFIG_DIR / "vae"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_BASE_CONFIG_DIR / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(SDXL_BASE_CONFIG_DIR / "text_encoder_2"))
    return unet, vae, te1, te2


def test_kohya_names_of_sdxl_base_follow_the_reference_layout(sdxl_base):
    """lora-formats.md §1.1: 722 UNet, 72 TE1 and 192 TE2 modules; transformer depth 2 in input_blocks 4-5 and
    output_blocks 3-5, 10 in input_blocks 7-8, middle_block 1 and output_blocks 0-2."""
    unet, _, te1, te2 = sdxl_base
    module = SDXLModule.__new__(SDXLModule)  # only the class's target list, no model loading
    blocks = unet_block_map(unet.config)
    names = {part: [kohya_module_name(part, m, blocks) for m in DiffusionModule.lora_target_modules(module, model)]
             for part, model in (("denoiser", unet), ("text_encoder_1", te1), ("text_encoder_2", te2))}
    assert {part: len(n) for part, n in names.items()} == {"denoiser": 722, "text_encoder_1": 72,
                                                           "text_encoder_2": 192}
    assert all(KOHYA_KEY.match(f"{n}.alpha") for part in names.values() for n in part)
    depth = {}
    for name in names["denoiser"]:
        if match := re.match(r"lora_unet_(\w+?_\d+_\d+|middle_block_1)_transformer_blocks_(\d+)_", name):
            depth[match.group(1)] = max(depth.get(match.group(1), 0), int(match.group(2)) + 1)
    assert depth == {**{f"input_blocks_{i}_1": 2 for i in (4, 5)}, **{f"input_blocks_{i}_1": 10 for i in (7, 8)},
                     "middle_block_1": 10, **{f"output_blocks_{i}_1": 10 for i in (0, 1, 2)},
                     **{f"output_blocks_{i}_1": 2 for i in (3, 4, 5)}}


def test_original_layout_of_sdxl_base_converts_back_with_diffusers(sdxl_base):
    """Our diffusers -> SGM/LDM maps at full size, read back by diffusers' own single-file converters."""
    unet, vae, _, _ = sdxl_base
    sgm = unet_to_sgm(unet.state_dict(), unet.config)
    back = convert_ldm_unet_checkpoint(sgm, dict(unet.config))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    ldm = vae_to_ldm(vae.state_dict(), vae.config)
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in vae.state_dict().items()}


# --- the tiny model and the config
def test_tiny_single_file_holds_the_diffusers_folder_weights():
    folder = tiny_model_dir("sdxl", tiny_sdxl.build)
    from_folder = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    from_file = tiny_pipeline()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected, actual = getattr(from_folder, name).state_dict(), getattr(from_file, name).state_dict()
        assert expected.keys() == actual.keys(), name
        assert all(torch.equal(expected[k], actual[k]) for k in expected), name


def test_tiny_build_is_byte_identical(tmp_path):
    tiny_sdxl.build(tmp_path / "a")
    tiny_sdxl.build(tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert tiny_sdxl.CHECKPOINT_FILE in {f.name for f in files}
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_missing_checkpoint_path_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="model.checkpoint_path is not set"):
        run(compose_config(tmp_path / "run", "model=sdxl"))
    with pytest.raises(ConfigError, match="model.min_snr_gamma=0"):
        SDXLModule(tiny=True, min_snr_gamma=0)


def test_a_file_that_is_not_sdxl_names_the_file(tmp_path):
    not_sdxl = tmp_path / "flux.safetensors"
    from safetensors.torch import save_file
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1)}, str(not_sdxl))
    with pytest.raises(ConfigError, match=f"checkpoint_path={not_sdxl}.*SDXL"):
        run(compose_config(tmp_path / "run", *FAST, f"model.checkpoint_path={not_sdxl}"))
