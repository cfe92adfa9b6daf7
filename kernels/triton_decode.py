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
