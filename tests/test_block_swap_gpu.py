"""Block swap and offloaded checkpointing where they really move memory (CUDA): swapped blocks' base weights live
in pinned CPU memory between uses and on the GPU while their block runs, peak GPU memory falls, and the loss and
LoRA gradients stay those of the plain run. Skipped without CUDA; tests/test_block_swap.py covers the schedule."""
import gc

import pytest
import torch
from diffusers import FluxTransformer2DModel
from hydra.utils import instantiate

from difftrain.modules.flux import FluxModule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: block swap's copies, side stream and pinned memory run only there")

# A Flux with 1024-wide blocks (about 16M parameters per single block): weights dominate GPU memory.
WIDE_FLUX = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=8, attention_head_dim=64,
                 num_attention_heads=16, joint_attention_dim=1024, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=[16, 24, 24])
SWAPPED = 6  # of the 10 blocks
BASES = {"float32": (), "fp8": ("model.transformer_dtype=float8",)}


class WideFluxModule(FluxModule):
    """FluxModule whose denoiser is WIDE_FLUX with random weights, built in memory."""

    def load_denoiser(self) -> FluxTransformer2DModel:
        torch.manual_seed(0)
        return FluxTransformer2DModel(**WIDE_FLUX).to(self.compute_dtype)


def wide_module(make_config, *overrides, device: str = "cuda"):
    cfg = make_config("model.dtype=float32", "adapter.rank=4", *overrides)
    module = instantiate(cfg.model, adapter=cfg.adapter, optimizer=cfg.optimizer, scheduler=cfg.scheduler,
                         seed=cfg.seed, _recursive_=False, _target_=f"{__name__}.WideFluxModule")
    module.configure_model()
    return module.to(device)


def train_step(module, latent_size: int = 32):
    """(loss, LoRA gradients on the CPU, peak GPU bytes allocated) of one forward and backward."""
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(1, 16, latent_size, latent_size, generator=g).cuda(),
             "text": {"prompt_embeds": torch.randn(1, 64, 1024, generator=g).cuda(),
                      "pooled_prompt_embeds": torch.randn(1, 768, generator=g).cuda()}}
    noise = torch.randn(1, 16, latent_size, latent_size, generator=g)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    loss = module.forward_loss(batch, torch.tensor([0.6]), noise)
    loss.backward()
    torch.cuda.synchronize()
    grads = {n: p.grad.cpu() for n, p in module.denoiser.named_parameters() if "lora_" in n}
    return loss.detach().cpu(), grads, torch.cuda.max_memory_allocated()


def measure(make_config, *overrides, latent_size: int = 32):
    """train_step of a fresh module, which is freed before the next one is built."""
    module = wide_module(make_config, *overrides)
    result = train_step(module, latent_size)
    del module
    gc.collect()
    torch.cuda.empty_cache()
    return result


def assert_same_step(loss, grads, expected_loss, expected_grads) -> None:
    torch.testing.assert_close(loss, expected_loss)
    for name, grad in expected_grads.items():
        # float32 attention backward on GPU may sum in a different order from run to run.
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def base_weights(block: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in block.named_parameters() if "lora_" not in name}


def test_swapped_weights_live_in_pinned_cpu_memory_between_uses(make_config):
    module = wide_module(make_config, f"model.blocks_to_swap={SWAPPED}")
    blocks = module.blocks()
    swapped = range(len(blocks) - SWAPPED, len(blocks))
    before = {i: {n: p.detach().clone() for n, p in base_weights(blocks[i]).items()} for i in swapped}
    on_gpu_while_running = []
    for i in swapped:
        blocks[i].register_forward_pre_hook(lambda block, _: on_gpu_while_running.append(
            all(p.is_cuda for p in base_weights(block).values())))

    for _ in range(2):
        for index, block in enumerate(blocks):
            for name, param in block.named_parameters():
                on_cpu = index in swapped and "lora_" not in name
                assert param.is_cuda != on_cpu, (index, name)
                assert not on_cpu or param.is_pinned(), (index, name)
        train_step(module)
    assert on_gpu_while_running == [True] * SWAPPED * 2
    for i in swapped:
        for name, param in base_weights(blocks[i]).items():
            assert torch.equal(param, before[i][name]), (i, name)


@pytest.mark.parametrize("base", BASES)
def test_swapping_lowers_peak_memory_and_changes_no_number(make_config, base):
    loss, grads, peak = measure(make_config, *BASES[base])
    swapped_loss, swapped_grads, swapped_peak = measure(make_config, *BASES[base], f"model.blocks_to_swap={SWAPPED}")
    assert_same_step(swapped_loss, swapped_grads, loss, grads)
    block = wide_module(make_config, *BASES[base], device="cpu").blocks()[-1]
    block_bytes = sum(p.numel() * p.element_size() for p in base_weights(block).values())
    # At most two swapped blocks are on the GPU at any moment.
    assert peak - swapped_peak >= (SWAPPED - 2) * block_bytes, (peak, swapped_peak, block_bytes)


def test_offloaded_checkpointing_lowers_peak_memory_and_keeps_gradients(make_config):
    plain_loss, plain_grads, plain_peak = measure(make_config, "model.activation_checkpointing=true",
                                                  latent_size=128)
    loss, grads, peak = measure(make_config, "model.activation_checkpointing=offload", latent_size=128)
    assert_same_step(loss, grads, plain_loss, plain_grads)
    hidden_bytes = (128 // 2) ** 2 * 1024 * 4  # one block input: 4096 image tokens x 1024 x float32
    assert plain_peak - peak >= 4 * hidden_bytes, (plain_peak, peak)
