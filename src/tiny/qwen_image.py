"""Tiny random-weight Qwen-Image in every layout the family reads:

    <root>/                                   a Qwen-Image-Edit Diffusers folder (transformer, vae, text_encoder,
                                              tokenizer, processor, scheduler; a Qwen-Image folder lacks processor/)
    <root>/comfyui/qwen_image_bf16.safetensors    the transformer under `model.diffusion_model.`
    <root>/comfyui/qwen_2.5_vl_7b.safetensors     the Qwen2.5-VL text encoder in its original checkpoint names

The VAE single file is the folder's own vae/diffusion_pytorch_model.safetensors. Sizes follow diffusers' Qwen-Image
pipeline tests (in 16 = 4 latent channels x 2x2, text width 16; 4 blocks, so block swap has some to move); the tokenizer is an offline byte-level
BPE with Qwen2's special tokens, wired into the text encoder's config."""
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from difftrain.tiny.tokenizers import byte_chars

COMFY_TRANSFORMER = "comfyui/qwen_image_bf16.safetensors"
COMFY_TEXT_ENCODER = "comfyui/qwen_2.5_vl_7b.safetensors"
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"
SEED = 0
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
            "<|video_pad|>"]
TEXT_WIDTH = 16
LATENT_CHANNELS = 4
TRANSFORMER_CONFIG = dict(patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=4,
                          attention_head_dim=16, num_attention_heads=3, joint_attention_dim=TEXT_WIDTH,
                          guidance_embeds=False, axes_dims_rope=(8, 4, 4))


def tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE standing in for Qwen2's; <|endoftext|> is unk/eos/pad, the chat/vision specials are added."""
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n")]
    vocab = {c: i for i, c in enumerate(byte_chars())}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    return tok


def text_encoder(tok: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    """mrope_section sums to head_dim / 2 (16 / 2 heads / 2); vision output width = text width."""
    ids = {s: tok.convert_tokens_to_ids(s) for s in ["<|endoftext|>", *SPECIALS]}
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": TEXT_WIDTH, "intermediate_size": TEXT_WIDTH, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tok),
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]},
        vision_config={"depth": 2, "hidden_size": TEXT_WIDTH, "intermediate_size": TEXT_WIDTH, "num_heads": 2,
                       "out_hidden_size": TEXT_WIDTH},
        hidden_size=TEXT_WIDTH, vocab_size=len(tok),
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"])
    torch.manual_seed(SEED)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def vae() -> AutoencoderKLQwenImage:
    torch.manual_seed(SEED)
    return AutoencoderKLQwenImage(base_dim=6 * LATENT_CHANNELS, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 4],
                                  num_res_blocks=1, temperal_downsample=[False, True],
                                  latents_mean=[0.1, -0.2, 0.05, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0])


def transformer() -> QwenImageTransformer2DModel:
    torch.manual_seed(SEED)
    return QwenImageTransformer2DModel(**TRANSFORMER_CONFIG)


def build(out_dir: Path) -> None:
    from diffusers import QwenImageEditPipeline

    from difftrain.formats.qwen_image import save_transformer, text_encoder_to_original
    from difftrain.formats.single_file import save_native

    out_dir = Path(out_dir)
    tok = tokenizer()
    pipe = QwenImageEditPipeline(
        transformer=transformer(), vae=vae(), text_encoder=text_encoder(tok), tokenizer=tok,
        processor=Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok,
                                   video_processor=Qwen2VLVideoProcessor()),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192))
    pipe.save_pretrained(out_dir)
    save_transformer(pipe.transformer.state_dict(), out_dir / COMFY_TRANSFORMER)
    save_native(text_encoder_to_original(pipe.text_encoder.state_dict()), out_dir / COMFY_TEXT_ENCODER)


TINY_MODELS = {"qwen_image": build}
