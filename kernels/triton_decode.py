"""The weight decoders every Triton kernel shares (layouts: packing.py): packed bytes loaded along K, unpacked
in registers. Put the decoded (BLOCK_N, BLOCK_K) tile on the LEFT of tl.dot: Hopper's wgmma reads only
its left operand from registers, so the weight then never goes back through shared memory.

Loads: rows are contiguous along K; pass the row length in bytes (= row stride) as its own kernel argument so
the JIT sees it divisible by 16: 16-byte vector loads, which the pipeliner turns into async copies.
"""
import triton
import triton.language as tl

from .triton_common import cast, inline_ptx

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
    return ((0x90909090 - n) & neg) | (n & (neg ^ 0xFFFFFFFF))  # not ~: older interpreters reject it on uint32


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
    inv = x ^ 0xFFFFFFFF  # ~x (older Triton interpreters reject ~ on uint32)
    mag = inv & 0x01010101
    neg = inv & ((x >> 1) ^ 0xFFFFFFFF) & 0x01010101
    return (mag << 3) | (neg << 7)


# ---- decoders for the weight on the left of a tensor-core dot, in fragment order -------------------------
# A dot's left operand lives in registers: per 16 (8-bit: 32) k, lane q of each quad holds UNIT consecutive k
# at 2 (4) positions: UNIT = 2 for 16-bit operands, 4 for 8-bit ones. The *_dot decoders return the tile
# permuted along K so that lane q's UNITs are the K-contiguous bytes q*BK/16 .. (q+1)*BK/16 of each row,
# i.e. one 16-byte word load per row at BLOCK_K = 128 (int4) / 256 (ternary); the decoded values then
# sit in the registers the dot reads, with no shuffle or shared-memory round trip. The other operand must be
# read in the same K order: its k0 + dot_k_order(BLOCK_K, UNIT) (UNIT-long runs, 4- or 2-byte copies).
# Integer codes become 16-bit floats exactly with a bit trick instead of an int -> float conversion: the code
# c goes into the low mantissa bits of 2^7 (bf16) / 2^10 (fp16), i.e. the float 2^7 + c, minus 2^7 + bias.

@triton.jit
def dot_k_order(BLOCK_K: tl.constexpr, UNIT: tl.constexpr):
    """Physical k (0 .. BLOCK_K) of each logical k of a tile decoded by the *_dot decoders."""
    L = tl.arange(0, BLOCK_K)
    RUN: tl.constexpr = 4 * UNIT
    return UNIT * ((BLOCK_K // RUN) * ((L // UNIT) % 4) + L // RUN) + L % UNIT


@triton.jit
def load_words(w_ptr, offs_n, kw, row_words, N, WORDS: tl.constexpr):
    """(BLOCK_N, WORDS) int32: packed words kw .. kw + WORDS (4 bytes each, little-endian) of rows offs_n of an
    (N, row_words) word matrix; 0 outside. Pass row_words as its own argument (divisible by 4: 16-byte loads)."""
    offs_w = kw + tl.arange(0, WORDS)
    ptrs = w_ptr.to(tl.pointer_type(tl.int32)) + offs_n[:, None] * row_words + offs_w[None, :]
    return tl.load(ptrs, mask=(offs_n[:, None] < N) & (offs_w[None, :] < row_words), other=0)


@triton.jit
def _halves(v, cdt: tl.constexpr):
    """int32 (...) -> cdt (..., 2): its low and high 16 bits as two 16-bit floats."""
    return tl.join(v.to(tl.int16), (v >> 16).to(tl.int16)).to(cdt, bitcast=True)


@triton.jit
def _magic(cdt: tl.constexpr):
    """Two 16-bit copies of 2^7 (bf16) / 2^10 (fp16), whose mantissa units are 1."""
    return 0x43004300 if cdt == tl.bfloat16 else 0x64006400


@triton.jit
def _order(d, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PER_WORD: tl.constexpr, UNIT: tl.constexpr,
           DOT_ORDER: tl.constexpr):
    """(BLOCK_N, words, ...) decoded in K order -> (BLOCK_N, BLOCK_K), in dot_k_order if DOT_ORDER."""
    if DOT_ORDER:
        W: tl.constexpr = BLOCK_K // PER_WORD // 4  # words per lane
        d = d.reshape(BLOCK_N, 4, W * PER_WORD // UNIT, UNIT).permute(0, 2, 1, 3)
    return d.reshape(BLOCK_N, BLOCK_K)


@triton.jit
def int4_tile(words, s, z, cdt: tl.constexpr, HAS_Z: tl.constexpr, DOT_ORDER: tl.constexpr, UPCAST: tl.constexpr):
    """int4 words (BLOCK_N, BLOCK_K / 8) -> (BLOCK_N, BLOCK_K) weights q * s (+ z) rounded once to cdt
    (reference.dequant_int4), in dot_k_order(BLOCK_K, 2) if DOT_ORDER else in K order. s, z: (BLOCK_N, NG)
    scales/zeros of the NG groups the tile spans. UPCAST: float32 math (the interpreter's 16-bit math is wrong)."""
    BN: tl.constexpr = words.shape[0]
    NG: tl.constexpr = s.shape[1]
    w = (words ^ -2004318072).reshape(BN, NG, words.shape[1] // NG)  # ^0x88888888: nibble -> q + 8 in 0..15
    m = _magic(cdt)
    # pair j = 2u + b of each word: nibbles j (byte u) and j + 4 (byte 2 + u) in one 32-bit register
    j0 = _halves(((w >> 0) & 0x000F000F) | m, cdt)
    j1 = _halves(((w >> 4) & 0x000F000F) | m, cdt)
    j2 = _halves(((w >> 8) & 0x000F000F) | m, cdt)
    j3 = _halves(((w >> 12) & 0x000F000F) | m, cdt)
    d = tl.join(tl.join(j0, j2), tl.join(j1, j3))  # (..., part, u, b): byte 2 part + u, nibble b
    off: tl.constexpr = 136.0 if cdt == tl.bfloat16 else 1032.0  # 2^7 + 8 / 2^10 + 8
    sb = s[:, :, None, None, None, None]
    if HAS_Z or UPCAST:
        v = (d.to(tl.float32) - off) * sb.to(tl.float32)  # exact (4-bit x 16-bit product): an FMA is safe
        if HAS_Z:
            v = v + z[:, :, None, None, None, None].to(tl.float32)
        d = cast(v, cdt)
    else:
        d = (d - off) * sb  # exact subtract, one rounding of the exact product
    return _order(d, BN, words.shape[1] * 8, 8, 2, DOT_ORDER)


@triton.jit
def ternary_tile(words, cdt: tl.constexpr, DOT_ORDER: tl.constexpr, UPCAST: tl.constexpr):
    """ternary words (BLOCK_N, BLOCK_K / 16) -> (BLOCK_N, BLOCK_K) values in {-1, 0, 1} in cdt, in
    dot_k_order(BLOCK_K, 2) if DOT_ORDER else in K order."""
    BN: tl.constexpr = words.shape[0]
    m = _magic(cdt)
    # j = 0..7: elements j (low half) and j + 8 (high half) of each word; element e is unit e // 2, b = e % 2
    j0 = _halves(((words >> 0) & 0x00030003) | m, cdt)
    j1 = _halves(((words >> 2) & 0x00030003) | m, cdt)
    j2 = _halves(((words >> 4) & 0x00030003) | m, cdt)
    j3 = _halves(((words >> 6) & 0x00030003) | m, cdt)
    j4 = _halves(((words >> 8) & 0x00030003) | m, cdt)
    j5 = _halves(((words >> 10) & 0x00030003) | m, cdt)
    j6 = _halves(((words >> 12) & 0x00030003) | m, cdt)
    j7 = _halves(((words >> 14) & 0x00030003) | m, cdt)
    # unit c = 2 c1 + c0 of a half: elements 2c + b; join order (part, c1, c0, b)
    even = tl.join(tl.join(j0, j4), tl.join(j2, j6))
    odd = tl.join(tl.join(j1, j5), tl.join(j3, j7))
    d = tl.join(even, odd)
    off: tl.constexpr = 129.0 if cdt == tl.bfloat16 else 1025.0  # stored value + 1
    if UPCAST:
        d = (d.to(tl.float32) - off).to(cdt)  # exact
    else:
        d = d - off
    return _order(d, BN, words.shape[1] * 16, 16, 2, DOT_ORDER)


@triton.jit
def ternary_tile_i8(words, DOT_ORDER: tl.constexpr):
    """ternary words (BLOCK_N, BLOCK_K / 16) -> (BLOCK_N, BLOCK_K) int8 in {-1, 0, 1}, in dot_k_order(BLOCK_K, 4)
    (a unit is one stored byte) if DOT_ORDER else in K order."""
    BN: tl.constexpr = words.shape[0]
    # field j of every byte, as a byte: (u | 0x80) - 1 ^ 0x80 = u - 1 in each byte, no borrow between bytes
    f0 = (((words & 0x03030303) | -2139062144) - 0x01010101) ^ -2139062144
    f1 = ((((words >> 2) & 0x03030303) | -2139062144) - 0x01010101) ^ -2139062144
    f2 = ((((words >> 4) & 0x03030303) | -2139062144) - 0x01010101) ^ -2139062144
    f3 = ((((words >> 6) & 0x03030303) | -2139062144) - 0x01010101) ^ -2139062144
    d = tl.join(tl.join(f0, f2), tl.join(f1, f3))  # (..., c1, c0): field 2 c1 + c0 of each byte
    d = tl.join(tl.join(d.to(tl.int8), (d >> 16).to(tl.int8)), tl.join((d >> 8).to(tl.int8), (d >> 24).to(tl.int8)))
    # (..., c1, c0, y1, y0): byte 2 y1 + y0 -> (..., y1, y0, c1, c0)
    d = d.reshape(BN, words.shape[1], 4, 4).permute(0, 1, 3, 2)
    return _order(d, BN, words.shape[1] * 16, 16, 4, DOT_ORDER)


@triton.jit
def _bytes(v):
    """int32 (...) -> int8 (..., 2, 2): its bytes, lowest first."""
    return tl.join(tl.join(v.to(tl.int8), (v >> 16).to(tl.int8)), tl.join((v >> 8).to(tl.int8), (v >> 24).to(tl.int8)))


@triton.jit
def _prmt(a, b, SEL: tl.constexpr):
    """Byte permute of int32 tensors (PTX prmt.b32, default mode): byte i of the result is byte SEL >> 4i & 7 of
    the 8 bytes (a, b). Shifts and masks where there is no inline PTX (interpreter, AMD)."""
    if not inline_ptx():
        r = tl.zeros(a.shape, tl.int32)
        for i in tl.static_range(4):
            src = a if ((SEL >> (4 * i)) & 7) < 4 else b
            r |= ((src >> (8 * ((SEL >> (4 * i)) & 3))) & 0xFF) << (8 * i)
    elif SEL == 0x5140:
        r = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x5140;", "=r,r,r", [a, b], dtype=tl.int32,
                                      is_pure=True, pack=1)
    else:
        tl.static_assert(SEL == 0x7362)
        r = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7362;", "=r,r,r", [a, b], dtype=tl.int32,
                                      is_pure=True, pack=1)
    return r


@triton.jit
def int4_tile_i8(words, DOT_ORDER: tl.constexpr):
    """int4 words (BLOCK_N, BLOCK_K / 8) -> (BLOCK_N, BLOCK_K) int8 values x 16 (exact: the caller divides the
    dot by 16), in dot_k_order(BLOCK_K, 4) if DOT_ORDER else in K order. A unit (4 consecutive k) is two stored
    bytes: byte b of a word holds elements 2b (low nibble) and 2b + 1, so unit c of a word is the bytes
    (lo_2c, hi_2c, lo_2c+1, hi_2c+1) of lo = nibbles moved up, hi = high nibbles: one byte permute each."""
    BN: tl.constexpr = words.shape[0]
    lo = (words << 4) & -252645136  # & 0xF0F0F0F0: element 8i + 2b, x16, in byte b
    hi = words & -252645136  # element 8i + 2b + 1, x16
    d = tl.join(_bytes(_prmt(lo, hi, 0x5140)), _bytes(_prmt(lo, hi, 0x7362)))  # (BN, words, byte (2), unit)
    return _order(d.permute(0, 1, 4, 2, 3), BN, words.shape[1] * 8, 8, 4, DOT_ORDER)


@triton.jit
def int4_tile_s8(words, DOT_ORDER: tl.constexpr):
    """int4_tile_i8 without the x16: the values themselves (the W4A8 kernel's int32 sum over all of K must not
    carry a factor 16). Each byte's nibble n is sign-extended with 32-bit ops and no carry between bytes:
    ((n ^ 8) + 0x78) ^ 0x80 = n - 16 [n >= 8]."""
    BN: tl.constexpr = words.shape[0]
    lo = (((words & 0x0F0F0F0F) ^ 0x08080808) + 0x78787878) ^ -2139062144  # element 8i + 2b in byte b
    hi = ((((words >> 4) & 0x0F0F0F0F) ^ 0x08080808) + 0x78787878) ^ -2139062144  # element 8i + 2b + 1
    d = tl.join(_bytes(_prmt(lo, hi, 0x5140)), _bytes(_prmt(lo, hi, 0x7362)))
    return _order(d.permute(0, 1, 4, 2, 3), BN, words.shape[1] * 8, 8, 4, DOT_ORDER)
