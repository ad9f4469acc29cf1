"""NF4 storage of a denoiser's base weights (`model.transformer_dtype=nf4`): every Linear layer, but those the
family keeps in high precision, becomes a bitsandbytes `Linear4bit` holding its weight in 4-bit NormalFloat
(about a quarter of bf16's bytes) and computing in the compute dtype. It runs before the LoRA is added, which then
wraps the 4-bit layers as it wraps plain ones; the base stays frozen. Any family can use it."""
import re
from collections.abc import Sequence

import bitsandbytes as bnb
import torch


def quantize_linears_nf4(model: torch.nn.Module, compute_dtype: torch.dtype, keep: Sequence[str] = ()) -> None:
    """Replace, in place, every Linear of `model` whose name matches none of the `keep` regexes by its NF4 copy."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, torch.nn.Linear) and not any(re.search(pattern, name) for pattern in keep):
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, nf4_linear(layer, compute_dtype))
    no_cpu_repacking(model)


def nf4_linear(layer: torch.nn.Linear, compute_dtype: torch.dtype) -> bnb.nn.Linear4bit:
    quantized = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", device="meta")
    # Params4bit quantizes when moved to a device (here the one the weight is on).
    quantized.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False,
                                         quant_type="nf4").to(layer.weight.device)
    if layer.bias is not None:
        quantized.bias = torch.nn.Parameter(layer.bias.data.to(compute_dtype), requires_grad=False)
    return quantized


def no_cpu_repacking(model: torch.nn.Module) -> None:
    """Keep bitsandbytes from repacking the 4-bit weights of `model`. On CPUs with AVX512-BF16, an eval-mode call
    without gradients (a frozen encoder, a preview) repacks a weight in place for faster CPU inference, and fails on
    layer sizes it does not expect (fewer than 32 output rows, small input widths): tiny models, small gates. It
    buys nothing on the GPU, where training runs."""
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False
