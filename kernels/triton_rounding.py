"""Pinned float steps of the activation quantization, as reference.py defines them (bit-identical in the
interpreter and compiled on every backend): one IEEE reciprocal per group, clamp, round half to even."""
import triton
import triton.language as tl

from .reference import ACT_SHIFT, FLT_MIN, RCP

ACT_SHIFT_C = tl.constexpr(ACT_SHIFT)
FLT_MIN_C = tl.constexpr(FLT_MIN)
RCP7, RCP15, RCP127 = tl.constexpr(RCP[7]), tl.constexpr(RCP[15]), tl.constexpr(RCP[127])
RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: v + M - M rounds |v| < 2^22 to an integer, ties to even


@triton.jit
def reciprocal(v):
    """float32 1 / v, IEEE-rounded (per channel or group, never per element)."""
    return tl.math.div_rn(tl.full(v.shape, 1.0, tl.float32), v)


@triton.jit
def round_codes(v, qmin, qmax):
    """clamp then round half to even; the clamp also keeps the compiler from fusing the caller's multiply
    into the add (an FMA would skip the product's rounding)."""
    v = tl.minimum(tl.maximum(v, qmin), qmax)
    return (v + RNE_MAGIC) - RNE_MAGIC


@triton.jit
def round_to_int8(v, qmin):
    """round_codes for v = xs * rscale of a group (|v| <= qmax (1 + 4 ulp): the upper clamp never acts) ->
    int8: max(v, qmin), then the integer is the low byte of v + 1.5 * 2^23 (two's complement)."""
    return (tl.maximum(v, qmin) + RNE_MAGIC).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def group_rscale(amax, rcp_q):
    """(scale, 1 / scale or 0) of absmax values: scale = absmax * float32(1 / qmax)."""
    scale = amax * rcp_q
    ok = scale >= FLT_MIN_C
    return scale, tl.where(ok, reciprocal(tl.where(ok, scale, 1.0)), 0.0)
