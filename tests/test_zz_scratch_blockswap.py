import pytest, torch
from src.training import run
from tests.test_wan import FAST as WAN_FAST
SDXL_FAST = ("model=sdxl_tiny", "dataset.resolutions=[64]", "trainer.max_steps=2", "checkpoint_every_n_steps=null")

@pytest.mark.parametrize("mode", ["true", "offload"])
def test_sdxl_checkpointing(make_config, mode):
    r = run(make_config(*SDXL_FAST, f"model.activation_checkpointing={mode}"))
    assert torch.isfinite(r.trainer.callback_metrics["train/loss"])

def test_wan_swap_and_offload(make_config):
    a = run(make_config("model=wan21_t2v", *WAN_FAST, "model.activation_checkpointing=offload", "model.blocks_to_swap=1", run_name="a"))
    b = run(make_config("model=wan21_t2v", *WAN_FAST, run_name="b"))
    assert torch.equal(a.trainer.callback_metrics["train/loss"], b.trainer.callback_metrics["train/loss"])
