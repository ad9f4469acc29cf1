"""Tiny random-weight HunyuanVideo (T2V) in both layouts the family reads, written from tiny diffusers models through
our key map:

    <root>/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt   official: {"module": original keys}
    <root>/hunyuan-video-t2v-720p/vae/pytorch_model.pt                      official VAE (diffusers' names)
    <root>/text_encoder/      the Llama of llava-llama-3-8b (a LlamaForCausalLM folder with its tokenizer)
    <root>/text_encoder_2/    clip-vit-large-patch14's text model with its tokenizer
    <root>/comfyui/           ComfyUI files: the transformer (as trained and fp8 e4m3fn) and the VAE; ComfyUI's llm and
                              clip folders are the two text encoder folders above

Sizes follow diffusers' HunyuanVideo tests (2 heads x 10, rotary axes (2, 4, 4), one block of each kind) with 2x2
patches as the real model; the Llama and CLIP are HiDream's and Flux's tiny ones (widths 16 and 32), the Llama
tokenizer knows Llama 3's header tokens so the prompt template tokenizes as in the real one. The VAE keeps the real
structure and 32 group-norm groups (4 blocks of 32 channels, 4 latent channels)."""
from pathlib import Path

import torch
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
from transformers import LlamaTokenizer

from difftrain.formats.hunyuan_video import CLIP_DIR, LLM_DIR, TRANSFORMER_FILE, VAE_FILE, transformer_to_native
from difftrain.formats.single_file import save_native
from difftrain.tiny import flux, hidream
from difftrain.tiny.tokenizers import clip_tokenizer

SEED = 0
COMFY_TRANSFORMER = "comfyui/hunyuan_video_tiny.safetensors"
COMFY_TRANSFORMER_FP8 = "comfyui/hunyuan_video_tiny_fp8_e4m3fn.safetensors"
COMFY_VAE = "comfyui/hunyuan_video_vae_tiny.safetensors"
ROPE_AXES_DIM = (2, 4, 4)
CLIP_WIDTH = 32  # flux.clip_text_encoder's hidden size = the pooled projection
LLAMA3_HEADER_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def transformer() -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(SEED)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=hidream.LLAMA_WIDTH,
        pooled_projection_dim=CLIP_WIDTH, rope_axes_dim=ROPE_AXES_DIM).eval()


def vae() -> AutoencoderKLHunyuanVideo:
    torch.manual_seed(SEED)
    return AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(32, 32, 32, 32), layers_per_block=1).eval()


def llama_tokenizer() -> LlamaTokenizer:
    tokenizer = hidream.llama_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA3_HEADER_TOKENS})
    return tokenizer


def build(out_dir: Path) -> None:
    out_dir = Path(out_dir)
    native = transformer_to_native(transformer().state_dict())
    (out_dir / TRANSFORMER_FILE).parent.mkdir(parents=True)
    torch.save({"module": native}, out_dir / TRANSFORMER_FILE)
    save_native(native, out_dir / COMFY_TRANSFORMER)
    save_native({key: tensor.to(torch.float8_e4m3fn) if tensor.ndim == 2 else tensor for key, tensor in native.items()},
                out_dir / COMFY_TRANSFORMER_FP8)

    vae_state = vae().state_dict()
    (out_dir / VAE_FILE).parent.mkdir(parents=True)
    torch.save(vae_state, out_dir / VAE_FILE)
    save_native(vae_state, out_dir / COMFY_VAE)

    tokenizer = llama_tokenizer()
    hidream.llama(tokenizer).save_pretrained(out_dir / LLM_DIR)
    tokenizer.save_pretrained(out_dir / LLM_DIR)
    flux.clip_text_encoder().save_pretrained(out_dir / CLIP_DIR)
    clip_tokenizer().save_pretrained(out_dir / CLIP_DIR)


TINY_MODELS = {"hunyuan_video": build}
