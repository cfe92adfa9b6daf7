"""Pinned float steps of the activation quantization, as reference.py defines them (bit-identical in the
interpreter and compiled on every backend): one IEEE reciprocal per group, clamp, round half to even."""
import triton
import triton.language as tl

from .reference import ACT_SHIFT, E4M3_MAX, FLT_MIN, RCP

ACT_SHIFT_C = tl.constexpr(ACT_SHIFT)
FLT_MIN_C = tl.constexpr(FLT_MIN)
RCP7, RCP15, RCP127, RCP448 = (tl.constexpr(RCP[q]) for q in (7, 15, 127, 448))
E4M3_MAX_C = tl.constexpr(E4M3_MAX)
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


@triton.jit
def to_e4m3(v):
    """float32 -> float8e4nv as reference.to_e4m3: clamp to +-448, round to nearest even. The rounding is done
    here on the float32 (normal range: drop 20 mantissa bits on the bits; below 2^-6: to multiples of 2^-9), so
    the conversion that follows is exact whatever instruction the compiler picks: the interpreter's cast does
    not round to nearest even, and Triton 3.6 on sm_89 converts through float16 rounding toward zero first."""
    v = tl.minimum(tl.maximum(v, -E4M3_MAX_C), E4M3_MAX_C)
    a = tl.abs(v)
    b = a.to(tl.uint32, bitcast=True)
    normal = ((b + 0x7FFFF + ((b >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    small = (a + 16384.0) - 16384.0  # 2^14: its float32 spacing is 2^-9
    a = tl.where(a < 0.015625, small, normal).to(tl.uint32, bitcast=True)
    v = (a | (v.to(tl.uint32, bitcast=True) & 0x80000000)).to(tl.float32, bitcast=True)  # the sign, -0 included
    return v.to(tl.float8e4nv)
