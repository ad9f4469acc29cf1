"""Block swap and activation checkpointing on CPU, with the tiny Flux (2 double + 2 single blocks; one test uses
a variant with 6 single blocks): the swap schedule (which block is loaded and evicted when, forward and
backward), unchanged numbers (loss, LoRA gradients, the trained export) with swapping and with plain or offloaded
checkpointing, and the config mistakes they refuse. Without CUDA every copy is a no-op;
tests/test_block_swap_gpu.py checks the real moves."""
import pytest
import torch
from diffusers import FluxTransformer2DModel
from hydra.utils import instantiate
from safetensors.torch import load_file
from torch.autograd.graph import register_multi_grad_hook

from difftrain.config.validate import ConfigError, validate
from difftrain.modules.block_swap import tensors_in
from difftrain.modules.flux import FluxModule
from difftrain.training import run
from tests.conftest import EXAMPLE_IMAGES

FAST = ("dataset.resolutions=[64]", "trainer.max_steps=3", "checkpoint_every_n_steps=null")
BASES = {"float32": ("model.dtype=float32",), "bfloat16": ("model.dtype=bfloat16",),
         "fp8": ("model.dtype=float32", "model.transformer_dtype=float8")}

# Blocks 2 and 3 (the single blocks) are swapped. While block i runs, block i+1 is loaded; a swapped block is
# evicted once it has run, except the last, which backward needs first; backward loads in reverse, and evicts a
# block when it reaches the one before.
TRAIN_SCHEDULE = [("forward", "run", 0), ("forward", "load", 2), ("forward", "run", 1), ("forward", "load", 3),
                  ("forward", "run", 2), ("forward", "evict", 2), ("forward", "run", 3),
                  ("backward", "load", 2), ("backward", "run", 3), ("backward", "evict", 3), ("backward", "run", 2),
                  ("backward", "evict", 2), ("backward", "run", 1), ("backward", "run", 0)]
EVAL_SCHEDULE = [("forward", "run", 0), ("forward", "load", 2), ("forward", "run", 1), ("forward", "load", 3),
                 ("forward", "run", 2), ("forward", "evict", 2), ("forward", "run", 3), ("forward", "evict", 3)]


class FluxWithoutBlockList(FluxModule):
    """A family that does not declare its blocks."""
    block_lists = ()


class DeeperTinyFluxModule(FluxModule):
    """The tiny Flux with 6 single blocks instead of 2 (8 blocks in all), random weights."""

    def load_denoiser(self) -> FluxTransformer2DModel:
        config = FluxTransformer2DModel.load_config(self.model_dir, subfolder="transformer")
        torch.manual_seed(0)
        return FluxTransformer2DModel.from_config({**config, "num_single_layers": 6}).to(self.compute_dtype)


def build_module(make_config, *overrides, target=None):
    """The module as src/training.py builds it from the composed config, with its model configured."""
    cfg = make_config(*overrides)
    extra = {"_target_": target} if target else {}
    module = instantiate(cfg.model, adapter=cfg.adapter, optimizer=cfg.optimizer, scheduler=cfg.scheduler,
                         seed=cfg.seed, _recursive_=False, **extra)
    module.configure_model()
    return module


def tiny_batch():
    g = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(1, 16, 8, 8, generator=g),
            "text": {"prompt_embeds": torch.randn(1, 8, 32, generator=g),
                     "pooled_prompt_embeds": torch.randn(1, 32, generator=g)}}


def loss_of(module):
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    return module.forward_loss(tiny_batch(), torch.tensor([0.6]), noise)


def train_step(module):
    """(loss, LoRA gradients) of one forward and backward."""
    loss = loss_of(module)
    loss.backward()
    grads = {n: p.grad for n, p in module.denoiser.named_parameters() if "lora_" in n}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), {n: g.clone() for n, g in grads.items()}


def record_schedule(module):
    """The swap's own trace, with each block's runs written into it: forward, after the swap's pre-hook, and
    backward, when backward reaches the block (a gradient hook on its outputs, after the swap's)."""
    trace = module.block_swap.trace = []

    def on_backward(output, i):
        outputs = [t for t in tensors_in(output) if t.requires_grad]
        if outputs:
            register_multi_grad_hook(outputs, lambda _: trace.append(("backward", "run", i)), mode="any")

    for i, block in enumerate(module.blocks()):
        block.register_forward_pre_hook(lambda *_, i=i: trace.append(("forward", "run", i)))
        block.register_forward_hook(lambda _block, _args, output, i=i: on_backward(output, i))
    return trace


def most_resident(trace, swapped) -> int:
    """The most swapped blocks loaded at once; checks that each swapped block is loaded whenever it runs and that
    none is left loaded."""
    loaded, most = set(), 0
    for phase, action, index in trace:
        if action == "load":
            loaded.add(index)
        elif action == "evict":
            loaded.remove(index)
        else:
            assert index not in swapped or index in loaded, (phase, index)
        most = max(most, len(loaded))
    assert not loaded
    return most


def swap_events(trace):
    return [event for event in trace if event[1] != "run"]


# --- the schedule
def test_training_steps_follow_the_swap_schedule(make_config):
    module = build_module(make_config, "model.blocks_to_swap=2")
    trace = record_schedule(module)
    train_step(module)
    assert trace == TRAIN_SCHEDULE
    train_step(module)  # every swapped block was evicted by the end of the first step
    assert trace == TRAIN_SCHEDULE * 2


def test_a_deeper_model_keeps_at_most_two_swapped_blocks_loaded(make_config):
    module = build_module(make_config, "model.blocks_to_swap=5", target=f"{__name__}.DeeperTinyFluxModule")
    trace = record_schedule(module)
    train_step(module)
    assert most_resident(trace, swapped={3, 4, 5, 6, 7}) == 2
    runs, loads = ({phase: [i for p, a, i in trace if p == phase and a == action] for phase in ("forward", "backward")}
                   for action in ("run", "load"))
    assert runs == {"forward": [0, 1, 2, 3, 4, 5, 6, 7], "backward": [7, 6, 5, 4, 3, 2, 1, 0]}
    assert loads == {"forward": [3, 4, 5, 6, 7], "backward": [6, 5, 4, 3]}  # 7 stays from its forward to its backward


def test_eval_evicts_each_swapped_block_once_it_has_run(make_config):
    module = build_module(make_config, "model.blocks_to_swap=2")
    trace = record_schedule(module)
    with torch.no_grad():
        loss_of(module)
    assert trace == EVAL_SCHEDULE


@pytest.mark.parametrize("checkpointing", ["true", "offload"])
def test_recompute_under_activation_checkpointing_moves_no_block(make_config, checkpointing):
    module = build_module(make_config, "model.blocks_to_swap=2", f"model.activation_checkpointing={checkpointing}")
    trace = record_schedule(module)
    train_step(module)
    assert swap_events(trace) == swap_events(TRAIN_SCHEDULE)


def test_only_base_weights_of_the_last_blocks_are_swapped(make_config):
    module = build_module(make_config, "model.blocks_to_swap=2")
    blocks = module.blocks()
    assert sorted(module.block_swap.swapped) == [2, 3]
    for index, swapped in module.block_swap.swapped.items():
        base = {id(p) for name, p in blocks[index].named_parameters() if "lora_" not in name}
        assert {id(s.tensor) for s in swapped} == base


def test_moving_the_module_leaves_swapped_base_weights_in_cpu_memory(make_config):
    module = build_module(make_config, "model.blocks_to_swap=2")
    module.to("meta")  # a real device move that works without an accelerator
    for index, block in enumerate(module.blocks()):
        for name, param in block.named_parameters():
            stays = index >= 2 and "lora_" not in name
            assert param.device.type == ("cpu" if stays else "meta"), (index, name)


# --- the numbers
@pytest.mark.parametrize("checkpointing", ["false", "true", "offload"])
@pytest.mark.parametrize("base", BASES)
def test_swapping_leaves_loss_and_lora_gradients_unchanged(make_config, base, checkpointing):
    common = (*BASES[base], f"model.activation_checkpointing={checkpointing}")
    loss, grads = train_step(build_module(make_config, *common))
    swapped_loss, swapped_grads = train_step(build_module(make_config, *common, "model.blocks_to_swap=2"))
    assert torch.equal(swapped_loss, loss)
    for name, grad in grads.items():
        assert torch.equal(swapped_grads[name], grad), name


def test_offloaded_checkpointing_gives_the_gradients_of_plain_and_of_none(make_config):
    results = {mode: train_step(build_module(make_config, f"model.activation_checkpointing={mode}"))
               for mode in ("false", "true", "offload")}
    loss, grads = results["false"]
    for mode in ("true", "offload"):
        mode_loss, mode_grads = results[mode]
        torch.testing.assert_close(mode_loss, loss)
        for name, grad in grads.items():
            torch.testing.assert_close(mode_grads[name], grad, msg=f"{mode}: {name}")


def test_training_run_with_swapped_blocks_exports_the_same_lora(make_config):
    common = (*FAST, "adapter.rank=4", "optimizer.lr=1e-2", "model.activation_checkpointing=true",
              f"eval_datasets=[{{name:heldout,path:{EXAMPLE_IMAGES}}}]", "eval_every_n_steps=2")
    plain = run(make_config(*common, run_name="plain"))
    swapped = run(make_config(*common, "model.blocks_to_swap=2", run_name="swapped"))
    assert swapped.trainer.global_step == 3
    expected = load_file(plain.final_export / "pytorch_lora_weights.safetensors")
    actual = load_file(swapped.final_export / "pytorch_lora_weights.safetensors")
    assert expected.keys() == actual.keys()
    assert any(t.abs().sum() > 0 for k, t in expected.items() if "lora_B" in k), "training changed no LoRA"
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    metrics = swapped.trainer.callback_metrics
    assert torch.equal(metrics["heldout/loss"], plain.trainer.callback_metrics["heldout/loss"])


# --- what it refuses
CONFIG_MISTAKES = {
    "negative": (["model.blocks_to_swap=-1"], "model.blocks_to_swap=-1 must be >= 0"),
    "full fine-tune": (["model.blocks_to_swap=2", "adapter=none"], "only works with a LoRA"),
    "several processes": (["model.blocks_to_swap=2", "trainer.devices=2"], "set trainer.devices=1"),
    "several nodes": (["model.blocks_to_swap=2", "trainer.num_nodes=2"], "trainer.num_nodes=1"),
    "unknown checkpointing mode": (["model.activation_checkpointing=unsloth"], "offload"),
}


@pytest.mark.parametrize("overrides, expected", CONFIG_MISTAKES.values(), ids=CONFIG_MISTAKES.keys())
def test_config_mistakes_are_refused_before_loading(make_config, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        validate(make_config(*overrides))


@pytest.mark.parametrize("checkpointing", ["true", "offload", "false"])
def test_valid_checkpointing_modes_pass_validation(make_config, checkpointing):
    validate(make_config(f"model.activation_checkpointing={checkpointing}", "model.blocks_to_swap=2"))


def test_more_blocks_than_the_model_can_spare_is_refused(make_config):
    with pytest.raises(ConfigError, match=r"blocks_to_swap=3 is too large: .* 4 transformer blocks, and at most 2"):
        build_module(make_config, "model.blocks_to_swap=3")


def test_a_family_without_a_block_list_refuses_block_swap(make_config):
    with pytest.raises(ConfigError, match="FluxWithoutBlockList does not list its transformer blocks"):
        build_module(make_config, "model.blocks_to_swap=2", target=f"{__name__}.FluxWithoutBlockList")
