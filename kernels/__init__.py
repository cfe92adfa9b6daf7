"""Low-bit GEMM kernels: Triton implementations, their PyTorch reference, and dispatch.

Every public op takes the same arguments on both backends (see reference.py for the semantics); the backend is
chosen per call (dispatch.backend_for). Eager calls go straight to it. Under torch.compile the ops are PyTorch
custom operators (custom_ops.py, torch.ops.lowbit.*): dynamo records each as one opaque node, so a compiled model
keeps one graph across its quantized layers and runs the ops exactly as eager does (traced, the reference's
roundings to 16 bits would be fused away: Inductor keeps float32 intermediates). Where torch lacks
torch.library.custom_op (before 2.4) they are torch.compiler.disable'd instead: the same results, one graph break
per call.
"""
import inspect

import torch

from . import custom_ops, reference
from .dispatch import (BACKENDS, activation_families, auto_activations, auto_family, backend_for, fp8_supported,
                       requested_backend, set_backend)
from .packing import pack_int4, pack_ternary, unpack_int4, unpack_ternary

OPS = ("lora_down", "quantize_act_int4", "quantize_act_int8", "w4a4_gemm", "w4a16_gemm", "ternary_gemm", "ternary_int8_gemm",
       "quantize_act_fp8", "int4_fp8_gemm", "ternary_fp8_gemm", "w4a8_gemm")
_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


def _dispatched(name):
    def direct(x, *args, **kwargs):
        return getattr(backend_for(x.device), name)(x, *args, **kwargs)

    if custom_ops.AVAILABLE:
        def op(*args, **kwargs):
            if _is_compiling():
                return custom_ops.call(name, args, kwargs)
            return direct(*args, **kwargs)  # no dispatcher round trip (about 10 us a call) in eager
    else:
        op = torch.compiler.disable(direct)
    op.__name__ = name
    op.__doc__ = getattr(reference, name).__doc__
    op.__signature__ = inspect.signature(getattr(reference, name))
    return op


lora_down = _dispatched("lora_down")
quantize_act_int4 = _dispatched("quantize_act_int4")
quantize_act_int8 = _dispatched("quantize_act_int8")
w4a4_gemm = _dispatched("w4a4_gemm")
w4a16_gemm = _dispatched("w4a16_gemm")
ternary_gemm = _dispatched("ternary_gemm")
ternary_int8_gemm = _dispatched("ternary_int8_gemm")
quantize_act_fp8 = _dispatched("quantize_act_fp8")
int4_fp8_gemm = _dispatched("int4_fp8_gemm")
ternary_fp8_gemm = _dispatched("ternary_fp8_gemm")
w4a8_gemm = _dispatched("w4a8_gemm")
progressive_scales = reference.progressive_scales

__all__ = ["BACKENDS", "OPS", "activation_families", "auto_activations", "auto_family", "backend_for", "fp8_supported",
           "requested_backend", "set_backend", "reference",
           "progressive_scales",
           "pack_int4", "unpack_int4", "pack_ternary", "unpack_ternary", *OPS]
