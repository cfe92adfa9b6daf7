"""The weight decoders every Triton kernel shares (layouts: packing.py): packed bytes loaded along K, unpacked
in registers. Put the decoded (BLOCK_N, BLOCK_K) tile on the LEFT of tl.dot: Hopper's wgmma reads only
its left operand from registers, so the weight then never goes back through shared memory.

Loads: rows are contiguous along K; pass the row length in bytes (= row stride) as its own kernel argument so
the JIT sees it divisible by 16: 16-byte vector loads, which the pipeliner turns into async copies.
"""
import triton
import triton.language as tl

INT4_PER_BYTE = tl.constexpr(2)
TERNARY_PER_BYTE = tl.constexpr(4)
TERNARY_ZEROS = tl.constexpr(0x55)  # a byte of four ternary zeros (stored as value + 1)
TERNARY_ZEROS_WORD = tl.constexpr(0x55555555)


@triton.jit
def load_packed(w_ptr, offs_n, kb, row_bytes, N, BYTES: tl.constexpr, FILL: tl.constexpr):
    """(BLOCK_N, BYTES) bytes kb .. kb + BYTES of rows offs_n; outside the (N, row_bytes) matrix: FILL."""
    offs_b = kb + tl.arange(0, BYTES)
    mask = (offs_n[:, None] < N) & (offs_b[None, :] < row_bytes)
    return tl.load(w_ptr + offs_n[:, None] * row_bytes + offs_b[None, :], mask=mask, other=FILL)


@triton.jit
def unpack_int4(p, X16: tl.constexpr):
    """(BN, B) bytes -> (BN, 2B) int8 in K order (element 2i in the low nibble). X16: each value times 16
    (one shift fewer; exact in int8, the caller divides by 16 after the dot)."""
    p = p.to(tl.int8, bitcast=True)
    if X16:
        lo, hi = p << 4, p & -16
    else:
        lo, hi = (p << 4) >> 4, p >> 4
    return tl.join(lo, hi).reshape(p.shape[0], 2 * p.shape[1])


@triton.jit
def unpack_ternary(p):
    """(BN, B) bytes -> (BN, 4B) int8 in {-1, 0, 1} in K order (element 4i + j in bits 2j, stored + 1)."""
    p = p.to(tl.uint8, bitcast=True)
    v0, v1, v2, v3 = p & 3, (p >> 2) & 3, (p >> 4) & 3, p >> 6
    t = tl.join(tl.join(v0, v2), tl.join(v1, v3)).reshape(p.shape[0], 4 * p.shape[1])
    return t.to(tl.int8, bitcast=True) - 1


# FP8 (e4m3) weights for the FP8 GEMMs, decoded from 32-bit words of packed bytes with 32-bit integer ops (four
# bytes at a time). e4m3 encodes k * 2^-9 for k = 0..15 as the byte k (subnormals, then the first binade) and a
# value's negative by setting bit 7, so a signed int4 becomes an e4m3 byte with no conversion instruction.
INT4_E4M3_UNIT = tl.constexpr(512.0)  # unpack_int4_e4m3(..., True) holds q * 2^-9
TERNARY_E4M3_UNIT = tl.constexpr(64.0)  # unpack_ternary_e4m3 holds t * 2^-6 (normal: e4m3's smallest)


@triton.jit
def _byte(w, j: tl.constexpr):
    return (w >> (8 * j)).to(tl.uint8)


@triton.jit
def _interleave(a, b, c, d):
    """Four (BN, W) tensors -> (BN, 4W): element 4i + t is the t-th argument's [:, i]."""
    return tl.join(tl.join(a, c), tl.join(b, d)).reshape(a.shape[0], 4 * a.shape[1])


@triton.jit
def _int4_sign_magnitude(n):
    """Each byte of n holds a nibble n_b (two's complement int4) -> the e4m3 byte of q * 2^-9: n_b < 8: n_b;
    else 0x80 | (16 - n_b) = 0x90 - n_b (no borrow between bytes: n_b <= 15)."""
    neg = ((n >> 3) & 0x01010101) * 0xFF
    return ((0x90909090 - n) & neg) | (n & ~neg)


@triton.jit
def unpack_int4_e4m3(w, SUBNORMAL: tl.constexpr):
    """(BN, W) int32 words of packed int4 (packing.py layout) -> (BN, 8W) float8e4nv in K order. SUBNORMAL: the
    bits of q * 2^-9 (integer ops only; the caller multiplies by INT4_E4M3_UNIT); else q itself, converted
    through float16 (normal e4m3 values, conversion instructions)."""
    w = w.to(tl.uint32, bitcast=True)
    if SUBNORMAL:
        lo = _int4_sign_magnitude(w & 0x0F0F0F0F)  # byte j: element 8i + 2j
        hi = _int4_sign_magnitude((w >> 4) & 0x0F0F0F0F)  # byte j: element 8i + 2j + 1
        lo_t = _interleave(_byte(lo, 0), _byte(lo, 1), _byte(lo, 2), _byte(lo, 3))
        hi_t = _interleave(_byte(hi, 0), _byte(hi, 1), _byte(hi, 2), _byte(hi, 3))
        b = tl.join(lo_t, hi_t).reshape(w.shape[0], 8 * w.shape[1])
        return b.to(tl.float8e4nv, bitcast=True)
    p = _interleave(_byte(w, 0), _byte(w, 1), _byte(w, 2), _byte(w, 3))
    return unpack_int4(p, False).to(tl.float16).to(tl.float8e4nv)


@triton.jit
def unpack_ternary_e4m3(w):
    """(BN, W) int32 words of packed ternary (packing.py: 2-bit fields v = t + 1) -> (BN, 16W) float8e4nv of
    t * 2^-6 in K order: |t| = ~v & 1, t < 0 iff v = 0; bytes 0x08 / 0x88 for +1 / -1."""
    w = w.to(tl.uint32, bitcast=True)
    f0 = _ternary_e4m3_field(w)  # byte j of field f: element 16i + 4j + f
    f1 = _ternary_e4m3_field(w >> 2)
    f2 = _ternary_e4m3_field(w >> 4)
    f3 = _ternary_e4m3_field(w >> 6)
    t = _interleave(_interleave(_byte(f0, 0), _byte(f0, 1), _byte(f0, 2), _byte(f0, 3)),
                    _interleave(_byte(f1, 0), _byte(f1, 1), _byte(f1, 2), _byte(f1, 3)),
                    _interleave(_byte(f2, 0), _byte(f2, 1), _byte(f2, 2), _byte(f2, 3)),
                    _interleave(_byte(f3, 0), _byte(f3, 1), _byte(f3, 2), _byte(f3, 3)))
    return t.to(tl.float8e4nv, bitcast=True)


@triton.jit
def _ternary_e4m3_field(x):
    """Field v in bits 0-1 of each byte of x -> e4m3 byte of (v - 1) * 2^-6."""
    mag = ~x & 0x01010101
    neg = ~x & ~(x >> 1) & 0x01010101
    return (mag << 3) | (neg << 7)
