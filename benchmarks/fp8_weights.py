"""Bytes of the transformer's base weights with model.transformer_dtype=float8 and nf4 vs unset (bf16), all built
by the family's configure_model (fp8: LoRA added, then diffusers layerwise casting skipping keep_in_high_precision
and lora_; nf4: bitsandbytes NF4 linears but the keep-list, then LoRA). LoRA weights are excluded: they are
trainable and stay float32 either way. NF4 bytes = each 4-bit weight at the bytes per weight of one real NF4
quantization (packed codes + quantization state), so meta-device models count as if quantized.

Models: the tiny test Flux (the real on-disk folder and load path), and FLUX.1-dev's, Qwen-Image's (20B), SD3.5
Large's (8B) and HiDream-I1's (17B) architectures built on the meta device by their family modules (real shapes and
dtypes, no memory, no weights needed). See benchmarks/README.md."""
import argparse
import re
import tempfile
from collections import Counter
from pathlib import Path

from _common import compose_config, instantiate_module, print_table, quiet, verdict

import torch
from bitsandbytes.nn import Linear4bit
from diffusers import (FluxTransformer2DModel, HiDreamImageTransformer2DModel, QwenImageTransformer2DModel,
                       SD3Transformer2DModel)

from difftrain.modules.flux import FluxModule
from difftrain.modules.hidream import HiDreamModule
from difftrain.modules.nf4 import nf4_linear
from difftrain.modules.qwen_image import QwenImageModule
from difftrain.modules.sd3 import SD3Module

TARGET_RATIO = 0.55
# diffusers' FluxTransformer2DModel defaults are FLUX.1-dev's shapes, except that dev has a guidance embedding.
FLUX1_DEV = dict(guidance_embeds=True)
# stable-diffusion-3.5-large's transformer/config.json (qk-norm, no dual attention layers).
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm")


class MetaFlux1DevModule(FluxModule):
    """FluxModule whose denoiser is FLUX.1-dev's architecture on the meta device (shapes and dtypes only)."""

    def load_denoiser(self) -> FluxTransformer2DModel:
        with torch.device("meta"):
            return FluxTransformer2DModel(**FLUX1_DEV).to(self.compute_dtype)


class MetaQwenImageModule(QwenImageModule):
    """QwenImageModule whose denoiser is Qwen-Image's architecture (diffusers' defaults: 60 blocks, 24 x 128 heads,
    text width 3584) on the meta device."""

    def load_denoiser(self) -> QwenImageTransformer2DModel:
        with torch.device("meta"):
            return QwenImageTransformer2DModel().to(self.compute_dtype)


class MetaSD35LargeModule(SD3Module):
    """SD3Module whose denoiser is SD3.5 Large's architecture (8B) on the meta device."""

    def load_denoiser(self) -> SD3Transformer2DModel:
        with torch.device("meta"):
            return SD3Transformer2DModel(**SD35_LARGE).to(self.compute_dtype)


# HiDream-I1-Full's transformer/config.json shapes (llama_layers, which only selects inputs, left out).
HIDREAM_I1 = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=16, num_single_layers=32,
                  attention_head_dim=128, num_attention_heads=20, caption_channels=[4096, 4096], text_emb_dim=2048,
                  num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(64, 32, 32), max_resolution=(128, 128))


class MetaHiDreamModule(HiDreamModule):
    """HiDreamModule whose denoiser is HiDream-I1's architecture on the meta device, and no Llama loaded."""

    def load_denoiser(self) -> HiDreamImageTransformer2DModel:
        with torch.device("meta"):
            return HiDreamImageTransformer2DModel(**HIDREAM_I1).to(self.compute_dtype)

    def load_loop_encoders(self) -> dict:
        return {}


MODELS = {  # name -> (model config group, module class override or None)
    "tiny": ("flux_tiny", None),
    "flux1-dev": ("flux", f"{__name__}.{MetaFlux1DevModule.__name__}"),
    "qwen-image": ("qwen_image", f"{__name__}.{MetaQwenImageModule.__name__}"),
    "sd3.5-large": ("sd3", f"{__name__}.{MetaSD35LargeModule.__name__}"),
    "hidream-i1": ("hidream", f"{__name__}.{MetaHiDreamModule.__name__}"),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--fp8", default="float8", help="model.transformer_dtype to compare (float8, float8_e5m2)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (fp8 storage requires a LoRA)")
    p.add_argument("--top", type=int, default=6, help="list this many module kinds kept in high precision")
    return p.parse_args()


def build_denoiser(name: str, transformer_dtype: str, rank: int, work_dir: Path) -> torch.nn.Module:
    group, target = MODELS[name]
    # model.tiny=true: no diffusers_path needed (the meta module builds its denoiser without reading a folder).
    cfg = compose_config(work_dir / name, f"model={group}", "model.tiny=true", "model.dtype=bfloat16",
                         f"model.transformer_dtype={transformer_dtype}", "adapter=lora", f"adapter.rank={rank}")
    module = instantiate_module(cfg, target)
    module.configure_model()
    return module.denoiser


def base_parameters(denoiser: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in denoiser.named_parameters() if "lora_" not in name}


def weight_bytes(params: dict[str, torch.nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params.values())


def nf4_bytes_per_weight() -> float:
    """What bitsandbytes stores per weight of one NF4-quantized layer: packed codes + the (nested) quant state."""
    weight = nf4_linear(torch.nn.Linear(2048, 2048, dtype=torch.bfloat16), torch.bfloat16).weight
    state = [t for t in weight.quant_state.as_dict(packed=True).values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in [weight, *state]) / 2048 ** 2


def nf4_weight_bytes(denoiser: torch.nn.Module) -> float:
    quantized = {id(m.weight) for m in denoiser.modules() if isinstance(m, Linear4bit)}
    others = {n: p for n, p in base_parameters(denoiser).items() if id(p) not in quantized}
    return weight_bytes(others) + sum(m.in_features * m.out_features for m in denoiser.modules()
                                      if isinstance(m, Linear4bit)) * nf4_bytes_per_weight()


def high_precision_kinds(params: dict[str, torch.nn.Parameter]) -> Counter:
    """Bytes of the parameters not stored in fp8, by module kind (block indices folded: blocks.N.norm1...)."""
    kinds = Counter()
    for name, p in params.items():
        if p.element_size() > 1:
            kinds[re.sub(r"\.\d+\.", ".N.", name.rsplit(".", 1)[0])] += p.numel() * p.element_size()
    return kinds


def measure(name: str, args: argparse.Namespace, work_dir: Path) -> dict:
    plain = base_parameters(build_denoiser(name, "null", args.rank, work_dir))
    fp8 = base_parameters(build_denoiser(name, args.fp8, args.rank, work_dir))
    fp8_params = sum(p.numel() for p in fp8.values() if p.element_size() == 1)
    return {"name": name, "params": sum(p.numel() for p in plain.values()), "bf16": weight_bytes(plain),
            "fp8": weight_bytes(fp8), "nf4": nf4_weight_bytes(build_denoiser(name, "nf4", args.rank, work_dir)),
            "fp8_share": fp8_params / sum(p.numel() for p in fp8.values()),
            "kept": high_precision_kinds(fp8)}


def report(results: list[dict], args: argparse.Namespace) -> None:
    mib = 2 ** 20
    print_table(f"Transformer base weight bytes (LoRA rank {args.rank} excluded), transformer_dtype={args.fp8} "
                "and nf4 vs unset, model.dtype=bfloat16",
                ["model", "base params", "bf16 MiB", "fp8 MiB", "ratio fp8/bf16", "params in fp8", "verdict",
                 "nf4 MiB", "ratio nf4/bf16"],
                [[r["name"], r["params"], r["bf16"] / mib, r["fp8"] / mib, r["fp8"] / r["bf16"],
                  f"{r['fp8_share']:.1%}", verdict(r["fp8"] / r["bf16"], TARGET_RATIO), r["nf4"] / mib,
                  r["nf4"] / r["bf16"]] for r in results])
    for r in results:
        print_table(f"{r['name']}: largest module kinds kept in high precision (share of the fp8 total)",
                    ["module (block index folded)", "MiB", "share"],
                    [[kind, size / mib, f"{size / r['fp8']:.1%}"] for kind, size in r["kept"].most_common(args.top)])


def main() -> None:
    args = parse_args()
    quiet()
    with tempfile.TemporaryDirectory(prefix="bench-fp8-") as tmp:
        results = [measure(name, args, Path(tmp)) for name in args.models]
    report(results, args)


if __name__ == "__main__":
    main()
