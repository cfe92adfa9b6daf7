"""SVDQuant W4A4 GEMM: int4 x int4 as int8 tensor-core dots, rescaled per group of 64 in float32.

out = sum_g (qx_g @ qw_g^T) * wscale_g * ascale_g + lr @ proj_up^T + bias. Computed transposed, out^T = W x^T:
the weight, decoded in registers in the dot's fragment order (triton_decode.int4_tile_i8, values x16), is the
left operand, the only one wgmma reads from registers; the activation codes go global -> shared by cp.async in
the same permuted K order (4-byte runs). Each group's int32 dot starts from zero; adding the bit pattern of
1.5 * 2^23 makes it a float32 equal to 1.5 * 2^23 + the exact dot (|16 d| <= 122880 < 2^22): no int -> float
conversion, then two FMAs per element (_rescale). Few tokens: K is split across programs, the last one to arrive
sums the partials in split order (triton_splitk.py) and applies the epilogue.
"""
import torch
import triton
import triton.language as tl

from .triton_common import (INTERPRET, check_rank, configs, inline_ptx, lowrank_bias_t, m_bucket, prune_by_m, sm_count,
                            store_tile_t, swizzle)
from .triton_decode import dot_k_order, int4_tile_i8, load_words
from .triton_splitk import reset_arrivals, split_total, tile_counters
from .tuning import launch

MAGIC_BITS = tl.constexpr(0x4B400000)  # float32 1.5 * 2^23
MAGIC = tl.constexpr(12582912.0)
_EXACT_FMA = tl.constexpr(not INTERPRET)  # the interpreter does not fuse tl.fma
SMALL_M = 64

# BLOCK_N rows of weights (wgmma M: 64 per warp group), BLOCK_M tokens (wgmma N)
CONFIGS = [{"BLOCK_N": bn, "BLOCK_M": bm, "GROUP_M": 8, "num_warps": w, "num_stages": s}
           for bn, bm, w, s in ((64, 128, 4, 4), (128, 128, 8, 3), (128, 64, 4, 4),
                                (64, 64, 4, 4), (64, 32, 4, 5), (64, 16, 4, 6))]


@triton.autotune(configs(CONFIGS, {"BLOCK_N": 32, "BLOCK_M": 16, "GROUP_M": 4}), key=["M_KEY", "N", "K", "R", "NSPLIT"],
                 prune_configs_by={"early_config_prune": prune_by_m})
@triton.heuristics({"EVEN_M": lambda a: a["M"] % a["BLOCK_M"] == 0})
@triton.jit
def _w4a4_kernel(qx_ptr, as_ptr, w_ptr, ws_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                 M, N, K, R, M_KEY, W_ROW, STRIDE_AM, STRIDE_AG, NSPLIT,
                 HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, GS: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, EVEN_M: tl.constexpr):
    """EVEN_M: M is a multiple of BLOCK_M (no token mask in the main loop)."""
    pid_m, pid_n = swizzle(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_order = dot_k_order(GS, 4)
    G = K // GS
    per = tl.cdiv(G, NSPLIT)
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    m_ok = (offs_m < M) | EVEN_M
    for g in range(pid_s * per, tl.minimum(pid_s * per + per, G)):
        # scales first: their loads are in flight during the decode and the dot
        sa = tl.load(as_ptr + offs_m * STRIDE_AM + g * STRIDE_AG, mask=m_ok, other=0.0)
        sw = tl.load(ws_ptr + g * N + offs_n, mask=offs_n < N, other=0.0)
        w = int4_tile_i8(load_words(w_ptr, offs_n, g * (GS // 8), W_ROW, N, GS // 8), True)
        x = tl.load(qx_ptr + offs_m[None, :] * K + (g * GS + k_order)[:, None], mask=m_ok[None, :], other=0)
        acc = _rescale(tl.dot(w, x, out_dtype=tl.int32), sw, sa, acc)
    if NSPLIT == 1:
        acc = lowrank_bias_t(acc, lr_ptr, up_ptr, bias_ptr, offs_m, offs_n, M, N, R, HAS_LR, HAS_BIAS, BLOCK_R)
        store_tile_t(out_ptr, acc, offs_m, offs_n, M, N)
    else:
        tile = pid_m * tl.cdiv(N, BLOCK_N) + pid_n
        last, acc = split_total(acc, part_ptr, cnt_ptr, pid_s, tile, offs_m, offs_n, M, N, NSPLIT)
        if last:
            acc = lowrank_bias_t(acc, lr_ptr, up_ptr, bias_ptr, offs_m, offs_n, M, N, R, HAS_LR, HAS_BIAS, BLOCK_R)
            store_tile_t(out_ptr, acc, offs_m, offs_n, M, N)
            reset_arrivals(cnt_ptr, tile)


@triton.jit
def _rescale(d, sw, sa, acc):
    """acc + (d / 16) * sw * sa without an int -> float conversion: d + MAGIC_BITS read as float32 is MAGIC + d
    exactly. For 16-bit sw, MAGIC * sw / 16 is exact, so one FMA gives d * sw / 16 rounded once; the
    interpreter (no fused FMA) and float32 scales subtract MAGIC first (the same value)."""
    if inline_ptx():  # opaque add: Triton would fold a plain one into the dot's accumulator (64 moves per tile)
        d = tl.inline_asm_elementwise("add.s32 $0, $1, 0x4B400000;", "=r,r", [d], dtype=tl.int32, is_pure=True, pack=1)
    else:
        d = d + MAGIC_BITS
    f = d.to(tl.float32, bitcast=True)
    s = sw.to(tl.float32) * 0.0625
    if _EXACT_FMA and sw.dtype != tl.float32:
        t = tl.fma(f, s[:, None], (s * -MAGIC)[:, None])
    else:
        t = (f - MAGIC) * s[:, None]
    return t * sa[None, :] + acc


def k_splits(m: int, n: int, groups: int, device) -> int:
    """Split K only for few tokens: about a wave of (64 x 64) tiles (two at <= 16 tokens), >= 4 groups each."""
    if m > SMALL_M:
        return 1
    tiles = triton.cdiv(n, 64) * triton.cdiv(m, 64)
    want = triton.cdiv((2 if m <= 16 else 1) * sm_count(device), tiles)
    s = max(1, min(want, groups // 4))
    return triton.cdiv(groups, triton.cdiv(groups, s))


def w4a4_gemm(qx, ascales, qweight, wscales, lr=None, proj_up=None, bias=None, out_dtype=torch.bfloat16):
    """See reference.w4a4_gemm. Groups must hold a power of two >= 32 (64 in every format here)."""
    m, k = qx.shape
    n = qweight.shape[0]
    groups = wscales.shape[0]
    gs = k // groups
    if qweight.shape[1] * 2 != k or gs * groups != k or gs < 32 or gs & (gs - 1) or ascales.shape != (m, groups):
        raise ValueError(f"w4a4_gemm: shapes qx {tuple(qx.shape)}, ascales {tuple(ascales.shape)}, "
                         f"qweight {tuple(qweight.shape)}, wscales {tuple(wscales.shape)} do not match")
    lr, proj_up = check_rank(lr, proj_up, "w4a4_gemm")
    r = 0 if lr is None else lr.shape[1]
    out = torch.empty(m, n, dtype=out_dtype, device=qx.device)
    if m == 0 or n == 0:
        return out
    ascales = ascales.float()
    nsplit = k_splits(m, n, groups, qx.device)
    part = cnt = out
    if nsplit > 1:
        part = torch.empty(nsplit, m, n, dtype=torch.float32, device=qx.device)
        cnt = tile_counters(qx.device, triton.cdiv(m, 16) * triton.cdiv(n, 16))
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), nsplit)
    launch("w4a4", _w4a4_kernel, grid, qx.device, dict(N=n, K=k, R=r, M=m_bucket(m)),
           qx.contiguous(), ascales, qweight.contiguous().view(torch.int32), wscales.contiguous(),
           out if lr is None else lr, out if proj_up is None else proj_up, out if bias is None else bias.contiguous(),
           out, part, cnt, m, n, k, r, m_bucket(m), k // 8, ascales.stride(0), ascales.stride(1), nsplit,
           HAS_LR=lr is not None, HAS_BIAS=bias is not None, GS=gs, BLOCK_R=32 if r % 32 == 0 else 16)
    return out
