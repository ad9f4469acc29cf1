"""HiDream beyond the conformance suite: its keys, the Llama as a frozen in-loop encoder built as the pipeline
builds its hidden states and never saved, and NF4 storage of the base (bitsandbytes runs on the CPU). The 24 GB
recipe trains in tests/test_memory_optimizers.py."""
import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

from difftrain.config.validate import ConfigError, validate
from difftrain.training import build_module, run
from tests.test_conformance import prediction, untrained_module

TINY = ("model=hidream", "model.tiny=true", "model.dtype=float32", "dataset.resolutions=[64]")
CAPTION = "a photo of the cat in a garden"


def test_missing_llama3_path_is_one_line_naming_the_key(make_config, tmp_path):
    models = tmp_path / "HiDream-I1-Full"
    models.mkdir()
    with pytest.raises(ConfigError, match="model.llama3_path"):
        validate(make_config("model=hidream", f"model.diffusers_path={models}"))


@pytest.mark.parametrize("max_llama_tokens", [128, 32])
def test_cached_text_and_in_loop_llama_equal_the_pipelines_encode_prompt(make_config, max_llama_tokens):
    """CLIP x2 and T5 embeddings are cached, the Llama only as token ids (`max_llama3_sequence_length` of them);
    its hidden states, computed at the step, are HiDreamImagePipeline.encode_prompt's."""
    module = build_module(make_config(*TINY, f"model.max_llama3_sequence_length={max_llama_tokens}"))
    cached = module.load_cache_encoders().encode_captions([CAPTION])
    assert sorted(cached[0]) == ["llama_attention_mask", "llama_input_ids", "pooled_prompt_embeds",
                                 "prompt_embeds_t5"]
    assert cached[0]["llama_input_ids"].shape == (max_llama_tokens,)

    module.loop_encoders["llama"] = module.load_llama()
    ours = module.conditioning({"text": module.collate_text(cached)})
    pipe = module.pipeline(transformer=None, text_encoder_4=module.loop_encoders["llama"])
    t5, _, llama, _, pooled, _ = pipe.encode_prompt(CAPTION, do_classifier_free_guidance=False)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["prompt_embeds_t5"], t5, rtol=1e-5, atol=1e-6)
    _, _, llama, _, _, _ = pipe.encode_prompt(CAPTION, do_classifier_free_guidance=False,
                                              max_sequence_length=max_llama_tokens)
    torch.testing.assert_close(ours["llama_hidden_states"], llama, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory):
    """A 2-step LoRA run on an NF4 base with the Llama in 4-bit, checkpointed at each step."""
    from tests.conftest import compose_config

    return run(compose_config(tmp_path_factory.mktemp("nf4") / "run", *TINY, "model.transformer_dtype=nf4",
                              "model.llama3_4bit=true", "trainer.max_steps=2", "checkpoint_every_n_steps=1",
                              "adapter.rank=4", "optimizer.lr=1e-2"))


def test_llama_is_in_neither_checkpoint_optimizer_nor_export(nf4_run):
    module = nf4_run.module
    llama = module.loop_encoders["llama"]
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in llama.modules()), "llama3_4bit loaded no 4-bit layer"
    lora = {f"denoiser.{n}" for n, p in module.denoiser.named_parameters() if "lora_" in n}

    checkpoint = torch.load(nf4_run.final_export.parents[1] / "checkpoints" / "last.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == lora
    optimized = {id(p) for group in nf4_run.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in module.named_parameters() if n in lora}
    assert not optimized & {id(p) for p in llama.parameters()}
    assert len(checkpoint["optimizer_states"][0]["state"]) == len(lora)
    exported = load_file(nf4_run.final_export / "adapter_model.safetensors")
    assert {key.removeprefix("diffusion_model.") for key in exported} == {
        key.removeprefix("denoiser.").replace(".default", "") for key in lora}


def test_nf4_base_trains_a_lora_that_reproduces_in_the_consumer(nf4_run, tmp_path):
    module = nf4_run.module.eval()
    stored = {type(m.base_layer if hasattr(m, "base_layer") else m) for n, m in module.denoiser.named_modules()
              if isinstance(m, torch.nn.Linear) and ".lora_" not in n and "lora_" not in n.rsplit(".", 1)[-1]}
    assert bnb.nn.Linear4bit in stored
    kept = [m for n, m in module.denoiser.named_modules() if n.startswith("x_embedder.")]
    assert all(type(m) is not bnb.nn.Linear4bit for m in kept), "the keep-list was quantized"

    batch = next(iter(nf4_run.datamodule.train_dataloader()))
    consumer = untrained_module("hidream", tmp_path, "model.transformer_dtype=nf4", "model.llama3_4bit=true")
    base_output = prediction(consumer, batch)
    consumer.load_exported_lora(nf4_run.final_export / "adapter_model.safetensors")
    ours = prediction(module, batch)
    assert not torch.allclose(ours, base_output, atol=1e-4), "the LoRA changed nothing"
    torch.testing.assert_close(prediction(consumer, batch), ours, rtol=1e-5, atol=1e-5)


def test_nf4_base_refuses_block_swap(make_config):
    module = build_module(make_config(*TINY, "model.transformer_dtype=nf4", "model.blocks_to_swap=2"))
    with pytest.raises(ConfigError, match="model.blocks_to_swap=2: block swap cannot move weights stored in NF4"):
        module.configure_model()

