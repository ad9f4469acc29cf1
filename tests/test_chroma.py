"""What is special to Chroma (the conformance suite checks its LoRA through our reader, full fine-tune, fp8,
resume, previews): cached T5 embeddings and their mask, collated in a batch of captions of different lengths,
condition the transformer exactly as ChromaPipeline's do; the exported LoRA uses ComfyUI's native names."""
import re

import torch
from safetensors.torch import load_file

from difftrain.training import build_module, run
from tests.conftest import compose_config

CHROMA = ("model=chroma", "model.tiny=true", "model.dtype=float32", "model.max_sequence_length=32",
          "dataset.resolutions=[64]")
NATIVE_LORA = re.compile(r"^diffusion_model\.(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])"
                         r"|single_blocks\.\d+\.linear[12])\.lora_[AB]\.weight$")
PROMPTS = ["a cat", "a red cat sits"]


def transformer_inputs_of_a_pipeline_call(pipe, prompt: str) -> dict:
    seen = {}

    def record(_, args, kwargs) -> None:
        seen.setdefault("inputs", kwargs)

    pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    pipe(prompt=prompt, width=64, height=64, num_inference_steps=1, guidance_scale=1.0, max_sequence_length=32,
         output_type="latent")
    return seen["inputs"]


@torch.no_grad()
def test_cached_text_and_mask_condition_the_transformer_as_the_pipeline(tmp_path):
    module = build_module(compose_config(tmp_path / "run", *CHROMA, "adapter=none"))
    module.configure_model()
    module.eval()
    cached = module.load_cache_encoders().encode_captions(PROMPTS)
    lengths = [int(c["prompt_embeds_mask"].sum()) for c in cached]
    assert lengths[0] < lengths[1] < 32, lengths
    text = module.collate_text(cached)
    pipe = module.inference_pipeline()
    for i, prompt in enumerate(PROMPTS):
        fed = transformer_inputs_of_a_pipeline_call(pipe, prompt)
        one = {key: value[i:i + 1] for key, value in text.items()}
        ours = module.denoise_tokens(fed["hidden_states"], fed["img_ids"], fed["timestep"], one)
        theirs = module.denoiser(**{**fed, "return_dict": False})[0]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_lora_uses_comfyui_native_names_with_fused_qkv(tmp_path):
    result = run(compose_config(tmp_path / "run", *CHROMA, "adapter.rank=4", "trainer.max_steps=1",
                                "checkpoint_every_n_steps=null"))
    lora = load_file(result.final_export / "adapter_model.safetensors")
    assert lora and all(NATIVE_LORA.match(key) for key in lora), sorted(lora)[:5]
    assert lora["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"].shape[0] == 3 * 4
    assert lora["diffusion_model.single_blocks.0.linear1.lora_A.weight"].shape[0] == 4 * 4
