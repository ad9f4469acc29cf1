"""Tiny random-weight HiDream-I1 in the layouts the family reads:

    <root>/HiDream-I1-Full/   a HiDreamImagePipeline Diffusers folder without its Llama (text_encoder_4 and
                              tokenizer_4 null, as the real HiDream-I1-Full folder)
    <root>/Llama-3.1-8B-Instruct/   a LlamaForCausalLM folder with its tokenizer

Sizes follow diffusers' HiDream pipeline tests (caption_channels = [T5 width, Llama width], text_emb_dim = the two
CLIP projections), with 2 + 2 blocks so block swap has some to move, the tiny Flux VAE (HiDream uses Flux's: 16
channels, spatial factor 8, the same scale and shift) and CLIP tokenizers padding to 128 as HiDream's do."""
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    PreTrainedTokenizerBase,
)

from difftrain.tiny import flux
from difftrain.tiny.tokenizers import clip_tokenizer, t5_tokenizer

DIFFUSERS_DIR = "HiDream-I1-Full"
LLAMA_DIR = "Llama-3.1-8B-Instruct"
SEED = 0
TEXT_TOKENS = 128  # HiDream's CLIP tokenizers pad to 128, so its CLIPs have 128 positions
LLAMA_WIDTH = 16
LLAMA_LAYERS = 2
# One Llama layer per block (2 double-stream + 2 single-stream), indexing the LLAMA_LAYERS hidden states.
TRANSFORMER_CONFIG = dict(
    patch_size=2, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
    num_attention_heads=4, caption_channels=[32, LLAMA_WIDTH], text_emb_dim=64, num_routed_experts=4,
    num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=[0, 1, 1, 0])


def transformer() -> HiDreamImageTransformer2DModel:
    torch.manual_seed(SEED)
    return HiDreamImageTransformer2DModel(**TRANSFORMER_CONFIG).eval()


def clip_text_encoder() -> CLIPTextModelWithProjection:
    """The CLIPTextConfig of diffusers' pipeline tests, with HiDream's 128 positions; projection 32."""
    torch.manual_seed(SEED)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000, hidden_act="gelu",
        projection_dim=32, max_position_embeddings=TEXT_TOKENS)).eval()


def llama_tokenizer() -> LlamaTokenizer:
    """BPE with byte fallback standing in for Llama 3's tokenizer: <unk>, <s>, </s>, <pad>, the 256 byte tokens,
    ASCII characters and a few merges."""
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", "<pad>"])}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in "\u2581" + "".join(chr(c) for c in range(ord("!"), ord("~") + 1)):
        vocab.setdefault(char, len(vocab))
    merges = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ("i", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return LlamaTokenizer(vocab=vocab, merges=merges, pad_token="<pad>")


def llama(tok: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=LLAMA_WIDTH, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
        num_hidden_layers=LLAMA_LAYERS, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval()


def build(out_dir: Path) -> None:
    out_dir = Path(out_dir)
    tokenizer_3 = t5_tokenizer()
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=flux.vae(), text_encoder=clip_text_encoder(),
        tokenizer=clip_tokenizer(TEXT_TOKENS), text_encoder_2=clip_text_encoder(),
        tokenizer_2=clip_tokenizer(TEXT_TOKENS), text_encoder_3=flux.t5_text_encoder(len(tokenizer_3)),
        tokenizer_3=tokenizer_3, text_encoder_4=None, tokenizer_4=None, transformer=transformer())
    pipe.save_pretrained(out_dir / DIFFUSERS_DIR)
    tok = llama_tokenizer()
    llama(tok).save_pretrained(out_dir / LLAMA_DIR)
    tok.save_pretrained(out_dir / LLAMA_DIR)


TINY_MODELS = {"hidream": build}
