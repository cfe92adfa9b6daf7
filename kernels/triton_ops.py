"""Triton implementations of the ops in reference.py, same names and arguments (dispatch.py loads this
module). Importing it fails cleanly when Triton is missing; CPU tensors need TRITON_INTERPRET=1."""
from .triton_act import quantize_act_int4
from .triton_fp8 import int4_fp8_gemm, ternary_fp8_gemm
from .triton_rowquant import lora_down, quantize_act_fp8, quantize_act_int8
from .triton_ternary import ternary_int8_gemm
from .triton_w4a4 import w4a4_gemm
from .triton_w4a8 import w4a8_gemm
from .triton_wonly import ternary_gemm, w4a16_gemm

__all__ = ["lora_down", "quantize_act_int4", "quantize_act_int8", "w4a4_gemm", "w4a16_gemm", "ternary_gemm",
           "ternary_int8_gemm", "quantize_act_fp8", "int4_fp8_gemm", "ternary_fp8_gemm", "w4a8_gemm"]
