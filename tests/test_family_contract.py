"""A new family costs its module, its tiny builder and one yaml, and no edit of shared code. ToyModule below is
such a family, written here as a newcomer would write one: its own model code (no diffusers class or mixin), its
own config keys read from its constructor, its own tiny builder, variable-length text, and a frozen encoder that
runs in the loop. The config it trains with is one yaml in a folder Hydra is pointed at."""
from pathlib import Path
from typing import Annotated, Literal, Optional

import pytest
import torch
from safetensors.torch import load_file, save_file

from difftrain.config.keys import ModelPath
from difftrain.config.validate import ConfigError, validate
from difftrain.formats.single_file import NATIVE_PREFIX
from difftrain.modules.base import DiffusionModule
from difftrain.tiny import tiny_model_dir
from difftrain.training import run
from tests.conftest import compose_config

TEXT_WIDTH, LATENT_CHANNELS, FACTOR = 8, 4, 8


# --- the family's own model code
class ToyBlock(torch.nn.Module):
    forward_calls = 0  # recomputes under activation checkpointing count too

    def __init__(self, width: int):
        super().__init__()
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        ToyBlock.forward_calls += 1
        q, k, v = self.qkv(torch.cat([x, text], dim=1)).chunk(3, dim=-1)
        keys = torch.cat([torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), text_mask], dim=1)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, :])
        x = x + self.proj(attended[:, :x.shape[1]])
        return x + self.mlp(x)


class ToyDenoiser(torch.nn.Module):
    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__()
        self.proj_in = torch.nn.Linear(LATENT_CHANNELS, width)
        self.time_in = torch.nn.Linear(1, width)
        self.text_in = torch.nn.Linear(TEXT_WIDTH, width)
        self.blocks = torch.nn.ModuleList(ToyBlock(width) for _ in range(depth))
        self.proj_out = torch.nn.Linear(width, LATENT_CHANNELS)

    def forward(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor):
        x = self.proj_in(latents.flatten(2).transpose(1, 2)) + self.time_in(t[:, None, None])
        text = self.text_in(text)
        for block in self.blocks:
            x = block(x, text, text_mask)
        return self.proj_out(x).transpose(1, 2).reshape(latents.shape)


class ToyEncoders:
    """A fixed 8x patch projection for images and byte embeddings for captions (one token per character, so
    captions have different lengths)."""

    def __init__(self, folder: Path):
        self.patches = load_file(folder / "vae.safetensors")["patches"]
        self.bytes = load_file(folder / "text_encoder.safetensors")["bytes"]

    def to(self, device):
        return self

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = torch.nn.functional.unfold(pixels, FACTOR, stride=FACTOR)  # [B, 3*64, h*w]
        h, w = pixels.shape[-2] // FACTOR, pixels.shape[-1] // FACTOR
        return (self.patches @ patches).unflatten(-1, (h, w))

    def encode_captions(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        return [{"text": self.bytes[list(caption.encode()[:64])]} for caption in captions]


def build_toy(folder: Path) -> None:
    torch.manual_seed(0)
    save_file({f"{k}": v.contiguous() for k, v in ToyDenoiser().state_dict().items()}, folder / "denoiser.safetensors")
    save_file({"patches": torch.randn(LATENT_CHANNELS, 3 * FACTOR * FACTOR) / FACTOR}, folder / "vae.safetensors")
    save_file({"bytes": torch.randn(256, TEXT_WIDTH)}, folder / "text_encoder.safetensors")
    save_file({"weight": torch.randn(TEXT_WIDTH, TEXT_WIDTH) / TEXT_WIDTH ** 0.5}, folder / "refiner.safetensors")


class ToySampler:
    """Our own sampling loop with a pipeline's call: Euler steps of the flow from noise to latents."""

    def __init__(self, module: "ToyModule"):
        self.module = module

    @torch.no_grad()
    def __call__(self, prompt: str, width: int, height: int, num_inference_steps: int, generator, output_type: str):
        module = self.module
        text = ToyEncoders(module.folder).encode_captions([prompt])[0]["text"][None]
        x = torch.randn(1, LATENT_CHANNELS, height // FACTOR, width // FACTOR, generator=generator)
        for t in torch.linspace(1, 0, num_inference_steps + 1)[:-1]:
            x = x - module.predict(x, t[None], {"text": text}) / num_inference_steps
        return type("Output", (), {"images": torch.sigmoid(x[:, :3]).permute(0, 2, 3, 1).repeat_interleave(FACTOR, 1)
                                   .repeat_interleave(FACTOR, 2).numpy()})


# --- the family
class ToyModule(DiffusionModule):
    cache_name = "toy"
    lora_target_blocks = ("ToyBlock",)
    block_lists = ("blocks",)

    def __init__(self, checkpoint_dir: Annotated[Optional[str], ModelPath(
                     "a toy checkpoint folder", example="/models/toy", required=True)] = None,
                 width: int = 16, refine_text: Literal["never", "every_step"] = "every_step", **common):
        super().__init__(**common)
        self.checkpoint_dir = checkpoint_dir
        self.width = width
        self.refine_text = refine_text

    @property
    def folder(self) -> Path:
        return tiny_model_dir("toy", build_toy) if self.tiny else Path(self.checkpoint_dir)

    def base_model(self) -> str:
        return str(self.folder)

    def cache_fingerprints(self) -> tuple[str, str]:
        return "toy-vae", "toy-text"

    def load_cache_encoders(self) -> ToyEncoders:
        return ToyEncoders(self.folder)

    def load_denoiser(self) -> ToyDenoiser:
        denoiser = ToyDenoiser(self.width)
        denoiser.load_state_dict(load_file(self.folder / "denoiser.safetensors"))
        return denoiser

    def load_loop_encoders(self) -> dict[str, torch.nn.Module]:
        refiner = torch.nn.Linear(TEXT_WIDTH, TEXT_WIDTH, bias=False)
        refiner.load_state_dict(load_file(self.folder / "refiner.safetensors"))
        return {"refiner": refiner} if self.refine_text == "every_step" else {}

    def predict(self, noisy_latents, t, text, cond=None) -> torch.Tensor:
        embeds = text["text"]
        mask = text.get("text_mask", torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device))
        if self.loop_encoders:
            with self.loop_encoder("refiner") as refiner:
                embeds = refiner(embeds)
        return self.denoiser(noisy_latents, t, embeds, mask)

    def inference_pipeline(self) -> ToySampler:
        return ToySampler(self)

    def export_lora(self, lora_state_dict, out_dir: Path) -> None:
        save_file({NATIVE_PREFIX + k: v for k, v in lora_state_dict.items()}, out_dir / "adapter_model.safetensors")

    def export_full(self, state_dict, out_dir: Path) -> None:
        save_file(state_dict, out_dir / "denoiser.safetensors")


TOY_YAML = f"""_target_: {__name__}.ToyModule
tiny: true
dtype: float32
checkpoint_dir: null
width: 16
refine_text: every_step
"""


@pytest.fixture
def toy_config(tmp_path):
    """Configs composed with conf/model/toy.yaml living in a folder of its own (a plugin's, or a user's)."""
    (tmp_path / "extra" / "model").mkdir(parents=True)
    (tmp_path / "extra" / "model" / "toy.yaml").write_text(TOY_YAML)

    def make(*overrides: str, run_name: str = "run"):
        return compose_config(tmp_path / run_name, f"hydra.searchpath=[file://{tmp_path / 'extra'}]", "model=toy",
                              "dataset.resolutions=[32]", "trainer.max_steps=2", "checkpoint_every_n_steps=2",
                              *overrides)
    return make


def test_the_family_declares_its_keys_in_its_constructor(toy_config):
    validate(toy_config())
    for override, message in [("+model.widht=8", "Did you mean 'model.width'?"),
                              ("model.refine_text=sometimes", "model.refine_text=sometimes is not valid"),
                              ("model.tiny=false", "model.checkpoint_dir is not set"),
                              ("+model.flux_shift=true", None)]:  # inherited from DiffusionModule: valid
        if message is None:
            validate(toy_config(override))
            continue
        with pytest.raises(ConfigError, match=message):
            validate(toy_config(override))


def test_a_new_family_trains_exports_and_renders(toy_config):
    result = run(toy_config("adapter.rank=4", "optimizer.lr=1e-2"))
    lora = load_file(result.final_export / "adapter_model.safetensors")
    assert lora and all(k.startswith("diffusion_model.blocks.") for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    images = result.module.eval().render("a toy", width=32, height=32, steps=2, seed=0)
    assert images.shape == (1, 32, 32, 3)


def test_captions_of_different_lengths_are_padded_per_batch_with_a_mask(toy_config):
    result = run(toy_config("dataset.batch_size=4", "dataset.ar_buckets=[1.0]"))
    batch = next(iter(result.datamodule.train_dataloader()))
    mask = batch["text"]["text_mask"]
    assert mask.shape[0] == 4 and len(set(mask.sum(1).tolist())) > 1, "the captions should differ in length"
    assert (batch["text"]["text"][~mask] == 0).all()


def test_a_loop_encoder_runs_every_step_but_never_trains_nor_is_saved(toy_config):
    result = run(toy_config())
    module = result.module
    refiner = module.loop_encoders["refiner"]
    assert not any(p.requires_grad for p in refiner.parameters())
    assert all(p.device.type == "cpu" for p in refiner.parameters())
    optimized = {id(p) for group in result.trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in refiner.parameters()}
    checkpoint = torch.load(Path(module.trainer.checkpoint_callback.last_model_path), weights_only=True)
    assert checkpoint["state_dict"] and not any("refiner" in k for k in checkpoint["state_dict"])
    assert not any("refiner" in k for k in load_file(result.final_export / "adapter_model.safetensors"))
    without = run(toy_config("model.refine_text=never", run_name="without"))
    assert not torch.equal(without.trainer.callback_metrics["train/loss"], result.trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("mode", ["true", "offload"])
def test_activation_checkpointing_of_own_model_code_gives_the_same_gradients(toy_config, mode):
    ToyBlock.forward_calls = 0
    plain = run(toy_config("adapter=none", run_name="plain")).module
    plain_calls, ToyBlock.forward_calls = ToyBlock.forward_calls, 0
    checkpointed = run(toy_config("adapter=none", f"+model.activation_checkpointing={mode}", run_name=mode)).module
    assert ToyBlock.forward_calls == 2 * plain_calls, "every block should run again in backward"
    for (name, ours), theirs in zip(plain.denoiser.named_parameters(), checkpointed.denoiser.parameters()):
        torch.testing.assert_close(theirs, ours, msg=name)


@pytest.mark.parametrize("family", ["hidream", "omnigen2", "ltx_video", "hunyuan_video", "cosmos"])
def test_lora_only_families_refuse_a_full_fine_tune_before_caching(family, make_config, tmp_path):
    with pytest.raises(ConfigError, match=f"model={family} trains LoRAs only") as error:
        run(make_config(f"model={family}", "model.tiny=true", "adapter=none"))
    assert "\n" not in str(error.value)
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing cached
