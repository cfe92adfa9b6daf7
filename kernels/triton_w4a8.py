"""W4A8: int4 weights x int8 per-token activations on int8 tensor cores (reference.w4a8_gemm), the `int8`
activation mode of svdq_w4a4 layers; the activations come from triton_rowquant.quantize_act_int8 (after
smoothing).

Computed transposed like the W4A4 GEMM (triton_w4a4.py): the weight, decoded in registers in the dot's fragment
order, is the left operand; the activation codes go global -> shared by cp.async in the same permuted K order. A
fresh int32 dot per group of 64, then one of two inner loops (PROGRESSIVE, by the scales' dtype):
- progressive (int16 group scales s1, float32 channel scale s0, reference.progressive_scales): acc += dot * s1,
  one integer multiply-add per accumulator element and group, int32 over all of K (exact: progressive_limit),
  converted to float once in the epilogue;
- float (16-bit group scales): acc += dot * scale in float32 with the W4A4 kernel's int -> float trick (the dot
  of values x16 plus the bits of 1.5 * 2^23 read as a float), an integer add and two float ops per element.
The per-token scale is applied once, in the epilogue. Few tokens: K split across programs, partials summed by the
last one to arrive (int32: in any order; float32: in split order; triton_splitk.py).
"""
import torch
import triton
import triton.language as tl

from .triton_common import (check_rank, configs, inline_ptx, lowrank_bias_t, m_bucket, prune_by_m, store_tile_t,
                            swizzle)
from .triton_decode import dot_k_order, int4_tile_i8, int4_tile_s8, load_words
from .triton_splitk import reset_arrivals, split_total, tile_counters
from .triton_w4a4 import MAGIC, SMALL_M, _EXACT_FMA, k_splits
from .tuning import launch

# BLOCK_N rows of weights (wgmma M), BLOCK_M tokens (wgmma N), as the W4A4 GEMM's
CONFIGS = [{"BLOCK_N": bn, "BLOCK_M": bm, "GROUP_M": 8, "num_warps": w, "num_stages": s}
           for bn, bm, w, s in ((64, 128, 4, 4), (128, 128, 8, 3), (128, 64, 4, 4),
                                (64, 64, 4, 4), (64, 32, 4, 5), (64, 16, 4, 6))]


@triton.autotune(configs(CONFIGS, {"BLOCK_N": 32, "BLOCK_M": 16, "GROUP_M": 4}),
                 key=["M_KEY", "N", "K", "R", "NSPLIT", "PROGRESSIVE"], prune_configs_by={"early_config_prune": prune_by_m})
@triton.heuristics({"EVEN_M": lambda a: a["M"] % a["BLOCK_M"] == 0})
@triton.jit
def _w4a8_kernel(qx_ptr, xs_ptr, w_ptr, ws_ptr, s0_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                 M, N, K, R, M_KEY, W_ROW, NSPLIT, PROGRESSIVE: tl.constexpr, HAS_LR: tl.constexpr,
                 HAS_BIAS: tl.constexpr, GS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, EVEN_M: tl.constexpr):
    """EVEN_M: M is a multiple of BLOCK_M (no token mask in the main loop)."""
    pid_m, pid_n = swizzle(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_order = dot_k_order(GS, 4)
    G = K // GS
    per = tl.cdiv(G, NSPLIT)
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.int32 if PROGRESSIVE else tl.float32)
    m_ok = (offs_m < M) | EVEN_M
    for g in range(pid_s * per, tl.minimum(pid_s * per + per, G)):
        sw = tl.load(ws_ptr + g * N + offs_n, mask=offs_n < N, other=0)  # first: in flight during decode and dot
        words = load_words(w_ptr, offs_n, g * (GS // 8), W_ROW, N, GS // 8)
        x = tl.load(qx_ptr + offs_m[None, :] * K + (g * GS + k_order)[:, None], mask=m_ok[None, :], other=0)
        if PROGRESSIVE:
            acc += tl.dot(int4_tile_s8(words, True), x, out_dtype=tl.int32) * sw.to(tl.int32)[:, None]
        else:
            acc = _rescale(tl.dot(int4_tile_i8(words, True), x, out_dtype=tl.int32), sw, acc)
    if NSPLIT == 1:
        _epilogue(acc, xs_ptr, s0_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, R, PROGRESSIVE,
                  HAS_LR, HAS_BIAS, BLOCK_R)
    else:
        tile = pid_m * tl.cdiv(N, BLOCK_N) + pid_n
        last, acc = split_total(acc, part_ptr, cnt_ptr, pid_s, tile, offs_m, offs_n, M, N, NSPLIT)
        if last:
            _epilogue(acc, xs_ptr, s0_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, R, PROGRESSIVE,
                      HAS_LR, HAS_BIAS, BLOCK_R)
            reset_arrivals(cnt_ptr, tile)


@triton.jit
def _rescale(d, sw, acc):
    """acc + (d / 16) * sw (exact product, rounded once) without an int -> float conversion (triton_w4a4._rescale
    without the activation scale)."""
    if inline_ptx():  # opaque add: Triton would fold a plain one into the dot's accumulator
        d = tl.inline_asm_elementwise("add.s32 $0, $1, 0x4B400000;", "=r,r", [d], dtype=tl.int32, is_pure=True, pack=1)
    else:
        d = d + 0x4B400000
    f = d.to(tl.float32, bitcast=True)
    s = sw.to(tl.float32) * 0.0625
    if _EXACT_FMA:
        t = tl.fma(f, s[:, None], (s * -MAGIC)[:, None])
    else:
        t = (f - MAGIC) * s[:, None]
    return acc + t


@triton.jit
def _epilogue(acc, xs_ptr, s0_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, R,
              PROGRESSIVE: tl.constexpr, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr):
    sx = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    if PROGRESSIVE:
        s0 = tl.load(s0_ptr + offs_n, mask=offs_n < N, other=0.0)
        out = acc.to(tl.float32) * (s0[:, None] * sx[None, :])  # the loop's only int -> float conversion
    else:
        out = acc * sx[None, :]
    out = lowrank_bias_t(out, lr_ptr, up_ptr, bias_ptr, offs_m, offs_n, M, N, R, HAS_LR, HAS_BIAS, BLOCK_R)
    store_tile_t(out_ptr, out, offs_m, offs_n, M, N)


def w4a8_gemm(qx, xscales, qweight, wscales, lr=None, proj_up=None, bias=None, out_dtype=torch.bfloat16, s0=None):
    """See reference.w4a8_gemm (groups of 64 along K)."""
    m, k = qx.shape
    n = qweight.shape[0]
    groups = wscales.shape[0]
    progressive = not wscales.is_floating_point()
    bad = qweight.shape[1] * 2 != k or k != 64 * groups or wscales.shape[1] != n or xscales.shape != (m,)
    bad = bad or qx.dtype != torch.int8 or (wscales.dtype != torch.int16 or s0 is None or s0.shape != (n,)
                                            if progressive else s0 is not None)
    if bad:
        raise ValueError(f"w4a8_gemm: shapes qx {tuple(qx.shape)} {qx.dtype}, xscales {tuple(xscales.shape)}, qweight "
                         f"{tuple(qweight.shape)}, wscales {tuple(wscales.shape)} {wscales.dtype}, s0 "
                         f"{None if s0 is None else tuple(s0.shape)} do not match (groups of 64 along K; int16 group "
                         f"scales need s0 (N,), 16-bit float ones none)")
    lr, proj_up = check_rank(lr, proj_up, "w4a8_gemm")
    r = 0 if lr is None else lr.shape[1]
    out = torch.empty(m, n, dtype=out_dtype, device=qx.device)
    if m == 0 or n == 0:
        return out
    nsplit = k_splits(m, n, groups, qx.device)
    part = cnt = out
    if nsplit > 1:
        part = torch.empty(nsplit, m, n, dtype=torch.int32 if progressive else torch.float32, device=qx.device)
        cnt = tile_counters(qx.device, triton.cdiv(m, 16) * triton.cdiv(n, 16))
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), nsplit)
    launch("w4a8", _w4a8_kernel, grid, qx.device, dict(N=n, K=k, R=r, M=m_bucket(m), P=int(progressive)),
           qx.contiguous(), xscales.float().contiguous(), qweight.contiguous().view(torch.int32), wscales.contiguous(),
           out if s0 is None else s0.float().contiguous(), out if lr is None else lr,
           out if proj_up is None else proj_up, out if bias is None else bias.contiguous(), out, part, cnt,
           m, n, k, r, m_bucket(m), k // 8, nsplit, PROGRESSIVE=progressive, HAS_LR=lr is not None,
           HAS_BIAS=bias is not None, GS=64, BLOCK_R=32 if r % 32 == 0 else 16)
    return out
