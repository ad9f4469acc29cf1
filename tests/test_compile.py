"""model.compile=true (src/modules/compile.py): the tiny Flux trained 2 steps with its blocks compiled, one step in
each of two buckets, with every block feature compile must combine with on at once (LoRA, fp8 storage, activation
checkpointing, block swap on the CPU), against the same run in eager mode; once more with
model.compile=max-autotune; and with model.compile=whole (one graph, with the features it combines with: LoRA
and fp8 storage). SDXL, whose UNet compiles its attention blocks, against its eager run.
One run per setting serves every assert: a first compile takes most of the test's time."""
import shutil

import pytest
import torch
from lightning import Callback
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from difftrain.config.errors import ConfigError
from difftrain.modules.compile import regions_outside_blocks
from difftrain.training import run
from tests.conftest import EXAMPLE_IMAGES, compose_config
from tests.test_block_swap import build_module

# Two buckets (80 and 112 px squares of one image: 25 and 49 image tokens, sizes no width of the tiny Flux shares,
# which would make torch specialise on them), one step each.
COMMON = ("trainer.max_steps=2", "checkpoint_every_n_steps=null", "dataset.resolutions=[80,112]",
          "adapter.rank=4", "optimizer.lr=1e-2", "model.transformer_dtype=float8",
          "model.activation_checkpointing=true", "model.blocks_to_swap=2",
          "+callbacks.graphs._target_=tests.test_compile.CompiledGraphs")


class CompiledGraphs(Callback):
    """Per training step: its latents' shape and the number of graphs torch has compiled so far."""

    def __init__(self):
        self.steps: list[tuple[tuple[int, ...], int]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append((tuple(batch["latents"].shape), counters["stats"]["unique_graphs"]))


# Run in this order: each run's graph count starts from the one before it
SETTINGS = {"eager": ("model.compile=false",), "compiled": ("model.compile=true",),
            "autotuned": ("model.compile=max-autotune",),
            # Block swap on the CPU and checkpointing change no number: the eager run stands for this one too
            "whole": ("model.compile=whole", "model.blocks_to_swap=0", "model.activation_checkpointing=false")}


@pytest.fixture(scope="module")
def one_image(tmp_path_factory):
    data = tmp_path_factory.mktemp("one-image")
    for name in ("02_blue_triangle.jpg", "02_blue_triangle.txt"):  # square: one bucket per resolution
        shutil.copy(EXAMPLE_IMAGES / name, data)
    return data


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_image):
    """{setting: run}: the same 2-step run with each of SETTINGS."""
    root = tmp_path_factory.mktemp("compile-runs")
    return {name: run(compose_config(root / name, *COMMON, f"dataset.path={one_image}", *overrides))
            for name, overrides in SETTINGS.items()}


def graphs_per_step(training_run) -> list[tuple[tuple[int, ...], int]]:
    # By name: Hydra instantiates the class from module tests.test_compile, pytest may import this file as another.
    callback = next(c for c in training_run.trainer.callbacks if type(c).__name__ == CompiledGraphs.__name__)
    return callback.steps


def assert_compiled_once_for_two_buckets(compiled_run, graphs_before: int) -> None:
    (first_shape, graphs_after_first), (second_shape, graphs_after_second) = graphs_per_step(compiled_run)
    assert first_shape != second_shape, "the two steps should come from two buckets"
    assert graphs_after_first > graphs_before, "nothing was compiled"
    assert graphs_after_second == graphs_after_first, "the second bucket recompiled"


def assert_same_lora(eager_run, compiled_run, file: str, atol: float) -> None:
    eager = load_file(eager_run.final_export / file)
    compiled = load_file(compiled_run.final_export / file)
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=atol, msg=key)


@pytest.mark.parametrize("setting", ["compiled", "autotuned", "whole"])
def test_compiled_training_exports_the_lora_of_eager_training(runs, setting):
    eager = load_file(runs["eager"].final_export / "pytorch_lora_weights.safetensors")
    assert any(t.abs().sum() > 0 for k, t in eager.items() if "lora_B" in k), "training changed no LoRA"
    # Inductor fuses and reorders fp32 reductions, and computes the timestep sinusoids (arguments up to 1000,
    # where one rounding moves the phase by ~1e-4) its own way: measured differences up to 5.4e-5 after 2 steps
    # at this learning rate, on weights of ~0.02-0.2.
    assert_same_lora(runs["eager"], runs[setting], "pytorch_lora_weights.safetensors", atol=1e-4)


@pytest.mark.parametrize("setting", ["compiled", "whole"])
def test_fp8_weights_stay_fp8_in_compiled_graphs(runs, setting):
    block = runs[setting].module.blocks()[0]
    base_layer = block.attn.to_q.base_layer  # the LoRA wraps the fp8 linear
    assert base_layer.weight.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("setting", ["compiled", "whole"])
def test_compiled_once_and_a_second_bucket_compiles_nothing(runs, setting):
    previous = list(SETTINGS)[list(SETTINGS).index(setting) - 1]
    assert_compiled_once_for_two_buckets(runs[setting], graphs_before=graphs_per_step(runs[previous])[-1][1])


def test_top_level_modules_outside_the_blocks_are_compiled_unless_stored_in_fp8_or_a_single_layer(runs):
    module = runs["compiled"].module
    # context_embedder, x_embedder and proj_out are single Linear layers: left eager.
    outside = ["pos_embed", "time_text_embed", "norm_out"]
    everything = regions_outside_blocks(module.denoiser, module.blocks(), keep_patterns=None)
    assert [module.denoiser.get_submodule(name) for name in outside] == everything
    # In fp8 storage a layer outside the patterns is cast by hooks that a graph would lose: its module stays eager.
    kept = regions_outside_blocks(module.denoiser, module.blocks(), keep_patterns=(r"^norm_out",))
    assert kept == [module.denoiser.pos_embed, module.denoiser.norm_out]


@pytest.mark.parametrize("feature", ["model.blocks_to_swap=2", "model.activation_checkpointing=offload"])
def test_whole_denoiser_compile_refuses_per_block_features_before_caching(tmp_path, feature):
    name, value = feature.split("=")
    with pytest.raises(ConfigError, match=rf"model.compile=whole with {name}={value}: .* Use model.compile=true"):
        run(compose_config(tmp_path / "run", "model=flux_tiny", "model.compile=whole", feature))
    assert not (tmp_path / "cache").exists()


def test_sdxl_compiles_its_unets_attention_blocks_as_eager_training(tmp_path, one_image):
    """SDXL's UNet has no transformer block list: model.compile=true compiles its attention blocks (diffusers'
    `_repeated_blocks`), inside the down/mid/up blocks that activation checkpointing wraps."""
    # Buckets of 192 and 320 px: the attention blocks' token counts (144 and 36, 400 and 100) match no width of
    # the tiny UNet, which would make torch specialise on them.
    sdxl = ("model=sdxl_tiny", "trainer.max_steps=2", "checkpoint_every_n_steps=null",
            "dataset.resolutions=[192,320]", "adapter.rank=4", "optimizer.lr=1e-2",
            "model.activation_checkpointing=true", f"dataset.path={one_image}",
            "+callbacks.graphs._target_=tests.test_compile.CompiledGraphs")
    eager = run(compose_config(tmp_path / "eager", *sdxl, "model.compile=false"))
    compiled = run(compose_config(tmp_path / "compiled", *sdxl, "model.compile=true"))
    assert_compiled_once_for_two_buckets(compiled, graphs_before=graphs_per_step(eager)[-1][1])
    # measured differences up to 1.1e-4 (see the Flux test above)
    assert_same_lora(eager, compiled, "lora.safetensors", atol=2e-4)


def test_a_family_that_lists_no_blocks_refuses_block_compile(make_config):
    with pytest.raises(ConfigError, match=r"model.compile=true: FluxWithoutBlockList lists no blocks to compile one "
                                          r"by one \(block_lists\). Use model.compile=whole or false."):
        build_module(make_config, "model.compile=true", target="tests.test_block_swap.FluxWithoutBlockList")
