"""Tiny random-weight Lumina Image 2.0 in every layout the family reads:

    <root>/                                          a Lumina2Pipeline Diffusers folder
    <root>/comfyui/lumina_2_model_bf16.safetensors   the transformer in native (NextDiT) names
    <root>/comfyui/gemma_2_2b_fp16.safetensors       Gemma 2 under `model.`, its SentencePiece model as `spiece_model`
    <root>/comfyui/flux_vae.safetensors              the VAE in the original LDM names

The single files are made from the folder's models through the family's key maps; the three alone load the same
model (their configs are read off their shapes with the published constants the builders share). The VAE has the
Flux VAE's four levels (the spatial factor 8 that Lumina2Pipeline hard-codes); 2 heads over 1 key/value head, so
the fused qkv has unequal parts as the real model's (24 over 8)."""
import io
from pathlib import Path

import sentencepiece
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

COMFY_TRANSFORMER = "comfyui/lumina_2_model_bf16.safetensors"
COMFY_TEXT_ENCODER = "comfyui/gemma_2_2b_fp16.safetensors"
COMFY_VAE = "comfyui/flux_vae.safetensors"
SEED = 0
TEXT_WIDTH = 16
TRANSFORMER_CONFIG = dict(patch_size=2, in_channels=16, hidden_size=24, num_layers=2, num_refiner_layers=1,
                          num_attention_heads=2, num_kv_heads=1, multiple_of=32, axes_dim_rope=[4, 4, 4],
                          cap_feat_dim=TEXT_WIDTH)
# What the tiny SentencePiece model learns its merges from (every other character falls back to bytes).
SPIECE_TEXT = ["You are an assistant designed to generate high-quality images based on user prompts. <Prompt Start>",
               "a red cat sits on the mat", "the quick brown fox jumps over the lazy dog"]


def spiece_model() -> bytes:
    """A serialised SentencePiece BPE model with Gemma's special tokens, ids and byte fallback."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SPIECE_TEXT), model_writer=model, model_type="bpe", vocab_size=320,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, num_threads=1, minloglevel=2,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>")
    return model.getvalue()


def text_encoder(tok: GemmaTokenizer) -> Gemma2Model:
    from difftrain.formats.lumina2 import GEMMA2_CONSTANTS

    torch.manual_seed(SEED)
    config = Gemma2Config(hidden_size=TEXT_WIDTH, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
                          num_key_value_heads=1, vocab_size=len(tok), **GEMMA2_CONSTANTS)
    return Gemma2Model(config).eval()


def transformer() -> Lumina2Transformer2DModel:
    torch.manual_seed(SEED)
    return Lumina2Transformer2DModel(**TRANSFORMER_CONFIG).eval()


def vae() -> AutoencoderKL:
    from difftrain.formats.lumina2 import FLUX_VAE_CONSTANTS

    torch.manual_seed(SEED)
    return AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                         block_out_channels=[32, 32, 32, 32], layers_per_block=1, latent_channels=16,
                         use_quant_conv=False, use_post_quant_conv=False, **FLUX_VAE_CONSTANTS)


def build(out_dir: Path) -> None:
    from difftrain.formats.lumina2 import gemma_to_comfyui, save_transformer, spiece_tokenizer, vae_to_comfyui
    from difftrain.formats.single_file import save_native

    out_dir = Path(out_dir)
    spiece = spiece_model()
    tok = spiece_tokenizer(spiece)
    pipe = Lumina2Pipeline(transformer=transformer(), vae=vae(), text_encoder=text_encoder(tok), tokenizer=tok,
                           scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.save_pretrained(out_dir)
    save_transformer(pipe.transformer.state_dict(), pipe.transformer.config, out_dir / COMFY_TRANSFORMER)
    save_native(gemma_to_comfyui(pipe.text_encoder.state_dict(), spiece), out_dir / COMFY_TEXT_ENCODER)
    save_native(vae_to_comfyui(pipe.vae), out_dir / COMFY_VAE)


TINY_MODELS = {"lumina2": build}
