"""Cosmos-Predict2's native names (NVIDIA's MiniTrainDIT, which ComfyUI keeps) <-> diffusers'
CosmosTransformer3DModel, as data (keymap.py). LoRAs export as `diffusion_model.blocks.N.self_attn.q_proj.lora_A.weight` (ComfyUI
format), full fine-tunes in the original layout (cosmos_common.py)."""
from __future__ import annotations

from .keymap import KeyMap, within

ATTENTION = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "output_proj": "to_out.0", "q_norm": "norm_q",
             "k_norm": "norm_k"}
PREDICT2 = KeyMap(modules={
    "x_embedder.proj.1": "patch_embed.proj",
    "t_embedder.1.linear_1": "time_embed.t_embedder.linear_1",
    "t_embedder.1.linear_2": "time_embed.t_embedder.linear_2",
    "t_embedding_norm": "time_embed.norm",
    "final_layer.linear": "proj_out",
    "final_layer.adaln_modulation.1": "norm_out.linear_1",
    "final_layer.adaln_modulation.2": "norm_out.linear_2",
    **within("blocks.{i}.", "transformer_blocks.{i}.", {
        **within("self_attn.", "attn1.", ATTENTION),
        **within("cross_attn.", "attn2.", ATTENTION),
        "mlp.layer1": "ff.net.0.proj", "mlp.layer2": "ff.net.2",
        **{f"adaln_modulation_{part}.{j}": f"norm{n}.linear_{j}"
           for n, part in enumerate(("self_attn", "cross_attn", "mlp"), start=1) for j in (1, 2)},
    }),
})


def rope_scale(inner_dim: int) -> tuple[float, float, float]:
    """Rotary scales of the released text-to-image models (2B and 14B alike), which no weight shape shows."""
    return (1.0, 4.0, 4.0)

