"""Tiny random-weight Lumina Image 2.0 in every layout the family reads:

    <root>/                                          a Lumina2Pipeline Diffusers folder
    <root>/comfyui/lumina_2_model_bf16.safetensors   the transformer in native (NextDiT) names
    <root>/comfyui/gemma_2_2b_fp16.safetensors       Gemma 2 under `model.`
    <root>/comfyui/flux_vae.safetensors              the VAE in the original LDM names

The single files are made from the folder's models through the family's key maps. The VAE is the tiny Flux one
(four blocks: the spatial factor 8 that Lumina2Pipeline hard-codes); 2 heads over 1 key/value head, so the fused
qkv has unequal parts as the real model's (24 over 8)."""
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

from difftrain.tiny import flux

COMFY_TRANSFORMER = "comfyui/lumina_2_model_bf16.safetensors"
COMFY_TEXT_ENCODER = "comfyui/gemma_2_2b_fp16.safetensors"
COMFY_VAE = "comfyui/flux_vae.safetensors"
SEED = 0
TEXT_WIDTH = 16
TRANSFORMER_CONFIG = dict(sample_size=8, patch_size=2, in_channels=16, hidden_size=16, num_layers=2,
                          num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                          ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=[4, 2, 2],
                          cap_feat_dim=TEXT_WIDTH)


def tokenizer() -> GemmaTokenizer:
    """SentencePiece-style BPE standing in for Gemma's: its special tokens, byte fallback, letters, a few merges."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    symbols = [*specials, *(f"<0x{b:02X}>" for b in range(256)), "\u2581",
               *(chr(c) for c in range(33, 127))]
    merges = [("\u2581", "a"), ("\u2581", "t"), ("h", "e"), ("i", "n")]
    vocab = {symbol: i for i, symbol in enumerate(dict.fromkeys(symbols + [a + b for a, b in merges]))}
    return GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=512)


def text_encoder(tok: GemmaTokenizer) -> Gemma2Model:
    torch.manual_seed(SEED)
    config = Gemma2Config(head_dim=8, hidden_size=TEXT_WIDTH, intermediate_size=16, num_attention_heads=2,
                          num_hidden_layers=2, num_key_value_heads=1, sliding_window=8, vocab_size=len(tok),
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return Gemma2Model(config).eval()


def transformer() -> Lumina2Transformer2DModel:
    torch.manual_seed(SEED)
    return Lumina2Transformer2DModel(**TRANSFORMER_CONFIG).eval()


def build(out_dir: Path) -> None:
    from difftrain.formats.lumina2 import gemma_to_comfyui, save_transformer, vae_to_comfyui
    from difftrain.formats.single_file import save_native

    out_dir = Path(out_dir)
    tok = tokenizer()
    pipe = Lumina2Pipeline(transformer=transformer(), vae=flux.vae(), text_encoder=text_encoder(tok),
                           tokenizer=tok, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.save_pretrained(out_dir)
    save_transformer(pipe.transformer.state_dict(), pipe.transformer.config, out_dir / COMFY_TRANSFORMER)
    save_native(gemma_to_comfyui(pipe.text_encoder.state_dict()), out_dir / COMFY_TEXT_ENCODER)
    save_native(vae_to_comfyui(pipe.vae), out_dir / COMFY_VAE)


TINY_MODELS = {"lumina2": build}
