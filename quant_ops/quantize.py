"""The per-layer quantization entry: a float weight or nn.Linear -> a packed format / lowbit module."""
import torch
from torch import nn

from . import quantizers
from .linear import module_from_packed

QUANT_FORMATS = ("svdq_w4a4", "w4a16", "ternary")


def quantize_weight(weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, rank: int = 32,
                    act_absmax: torch.Tensor | None = None, **options):
    """Float weight (N, K) -> packed format object. See quantize_linear for the options."""
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"fmt must be one of {QUANT_FORMATS}, got {fmt!r}")
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{fmt}: weight must be a torch.Tensor, got {type(weight).__name__}")
    dtype = options.pop("dtype", None) or (weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16)
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{fmt}: dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    device = options.pop("device", None)
    if device is not None:
        weight = weight.to(device)
        bias = None if bias is None else bias.to(device)
    if fmt == "svdq_w4a4":
        return quantizers.svdquant(weight, bias, rank=rank, act_absmax=act_absmax, dtype=dtype, **options)
    if fmt == "w4a16":
        return quantizers.w4a16(weight, bias, dtype=dtype, **options)
    return quantizers.ternary(weight, bias, rank=rank, act_absmax=act_absmax, dtype=dtype, **options)


def quantize_linear(linear: nn.Linear, fmt: str, rank: int = 32, act_absmax: torch.Tensor | None = None,
                    **options) -> nn.Module:
    """Quantize a torch.nn.Linear to a lowbit module.

    fmt: "svdq_w4a4" | "w4a16" | "ternary". rank: low-rank branch (svdq_w4a4, ternary; 0 for none).
    act_absmax: per-input-channel activation absmax from calibration (data-free when None).
    options: dtype (bfloat16/float16, default the weight's 16-bit dtype or bfloat16), device (quantize there),
    svdq_w4a4: act_unsigned (post-GELU inputs), calib_inputs, iters, search_iters, alphas;
    w4a16: group_size (64 or 128); ternary: act_int8, iters.
    """
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"quantize_linear expects a torch.nn.Linear, got {type(linear).__name__}")
    packed = quantize_weight(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(),
                             fmt, rank, act_absmax, **options)
    return module_from_packed(packed)
