"""Low-bit GEMM kernels: Triton implementations, their PyTorch reference, and dispatch.

Every public op takes the same arguments on both backends (see reference.py for the semantics). The ops are
opaque to torch.compile (torch.compiler.disable): a compiled model runs them exactly as eager does. Traced, the
reference's roundings to 16 bits would be fused away (Inductor keeps float32 intermediates) and the Triton
launches would break the graph anyway.
"""
import torch

from . import reference
from .dispatch import (BACKENDS, activation_families, auto_activations, auto_family, backend_for, fp8_supported,
                       requested_backend, set_backend)
from .packing import pack_int4, pack_ternary, unpack_int4, unpack_ternary

OPS = ("lora_down", "quantize_act_int4", "quantize_act_int8", "w4a4_gemm", "w4a16_gemm", "ternary_gemm", "ternary_int8_gemm",
       "quantize_act_fp8", "int4_fp8_gemm", "ternary_fp8_gemm", "w4a8_gemm")


def _dispatched(name):
    def op(x, *args, **kwargs):
        return getattr(backend_for(x.device), name)(x, *args, **kwargs)

    op.__name__ = name
    op.__doc__ = getattr(reference, name).__doc__
    return torch.compiler.disable(op)


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
