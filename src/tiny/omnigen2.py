"""Tiny random-weight OmniGen2 in the original checkpoint folder's layout (VectorSpaceLab's OmniGen2/OmniGen2):

    <root>/model_index.json          the upstream pipeline's components
    <root>/transformer/              our OmniGen2Transformer2DModel (config.json + weights under the checkpoint's keys)
    <root>/vae/                      the Flux VAE (diffusers AutoencoderKL), as upstream's
    <root>/mllm/                     Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)
    <root>/processor/                its processor: the tokenizer with a Qwen2-style chat template
    <root>/scheduler/                upstream's flow-matching Euler scheduler config (dynamic time shift)

Text width 16 = the transformer's text_feat_dim; 2 heads over 1 key/value head (grouped-query, as the real
21 over 7); the tiny Qwen-Image tokenizer and MLLM, the tiny Flux VAE."""
import json
from pathlib import Path

import torch
from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

from difftrain.models.omnigen2 import OmniGen2Transformer2DModel
from difftrain.tiny import flux, qwen_image

SEED = 0
TRANSFORMER_CONFIG = dict(patch_size=2, in_channels=16, hidden_size=16, num_layers=2, num_refiner_layers=1,
                          num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=[4, 2, 2],
                          axes_lens=[1024, 256, 256], text_feat_dim=qwen_image.TEXT_WIDTH, timestep_scale=1000.0)
# Qwen2's chat format: <|im_start|>role\ncontent<|im_end|>\n per message
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MODEL_INDEX = {
    "_class_name": "OmniGen2Pipeline",
    "mllm": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "processor": ["transformers", "Qwen2_5_VLProcessor"],
    "scheduler": ["omnigen2.schedulers.scheduling_flow_match_euler_discrete", "FlowMatchEulerDiscreteScheduler"],
    "transformer": ["omnigen2.models.transformers.transformer_omnigen2", "OmniGen2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                    "dynamic_time_shift": True}


def transformer() -> OmniGen2Transformer2DModel:
    torch.manual_seed(SEED)
    model = OmniGen2Transformer2DModel(**TRANSFORMER_CONFIG)
    with torch.no_grad():  # random, not upstream's zero-initialised output layers: the tiny model's output varies
        for param in model.parameters():
            param.normal_(0, 0.3)
    return model.eval()


def build(out_dir: Path) -> None:
    out_dir = Path(out_dir)
    tok = qwen_image.tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    transformer().save_pretrained(out_dir / "transformer")
    flux.vae().save_pretrained(out_dir / "vae")
    qwen_image.text_encoder(tok).save_pretrained(out_dir / "mllm")
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                     chat_template=CHAT_TEMPLATE).save_pretrained(out_dir / "processor")
    (out_dir / "scheduler").mkdir()
    (out_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    (out_dir / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))


TINY_MODELS = {"omnigen2": build}
