"""Ternary weights x int8 activations: int8 dot with int32 accumulation over all of K (exact), then
per-token x per-channel scales, the low-rank branch and bias in float32 (reference.ternary_int8_gemm).

Computed transposed, out^T = W x^T: the packed weight rows go global -> shared by 16-byte cp.async and are
decoded to int8 in registers, in the dot's fragment order (triton_decode.ternary_tile_i8), as the left operand,
the only one wgmma reads from registers; the activation codes go global -> shared in the same permuted K order
(4-byte runs) as the right operand. Few tokens: K split across programs where there are few row blocks, the last
one to arrive sums the int32 partials (exact in any order) and applies the epilogue (triton_splitk.py).
"""
import torch
import triton
import triton.language as tl

from .triton_common import (INTERPRET, check_rank, configs, lowrank_bias_t, m_bucket, prune_by_m, sm_count,
                            store_tile_t, swizzle)
from .triton_decode import dot_k_order, load_words, ternary_tile_i8
from .triton_splitk import reset_arrivals, split_total, tile_counters
from .tuning import launch

SMALL_M = 64
# BLOCK_N weight rows (wgmma M: 64 per warp group), BLOCK_M tokens (wgmma N), KB packed bytes per row per step
# (64: 16 per lane, 256 k), warps, stages. None spills (tests/ir_cases.py).
CONFIGS = [{"BLOCK_N": bn, "BLOCK_M": bm, "KB": kb, "GROUP_M": 1 if bm <= SMALL_M else 8, "num_warps": w,
            "num_stages": s}
           for bn, bm, kb, w, s in ((128, 16, 64, 4, 4), (128, 32, 64, 4, 4), (128, 64, 32, 4, 3),
                                    (128, 128, 32, 8, 4), (128, 128, 32, 8, 3), (256, 128, 16, 8, 3))]
_INTERP = {"BLOCK_N": 32, "BLOCK_M": 16, "KB": 16, "GROUP_M": 4}


@triton.autotune(configs(CONFIGS, _INTERP), key=["M_KEY", "N", "K", "R", "NSPLIT"],
                 prune_configs_by={"early_config_prune": prune_by_m})
@triton.heuristics({"EVEN_K": lambda a: a["K"] % (4 * a["KB"]) == 0})
@triton.jit
def _ternary_int8_kernel(qx_ptr, xs_ptr, w_ptr, ws_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                         M, N, K, R, M_KEY, W_ROW, NSPLIT, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, KB: tl.constexpr,
                         GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    """W_ROW: packed int32 words per weight row. NSPLIT: programs along K per output tile. EVEN_K: K is a
    multiple of the K step (no mask along K)."""
    pid_m, pid_n = swizzle(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    BLOCK_K: tl.constexpr = KB * 4
    k_order = dot_k_order(BLOCK_K, 4)
    steps = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(steps, NSPLIT)
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.int32)
    for step in range(pid_s * per, tl.minimum(pid_s * per + per, steps)):
        offs_k = step * BLOCK_K + k_order
        x = tl.load(qx_ptr + offs_m[None, :] * K + offs_k[:, None],
                    mask=(offs_m[None, :] < M) & ((offs_k[:, None] < K) | EVEN_K), other=0)
        w = ternary_tile_i8(load_words(w_ptr, offs_n, step * (KB // 4), W_ROW, N, KB // 4), True)
        acc = tl.dot(w, x, acc, out_dtype=tl.int32)
    if NSPLIT == 1:
        _epilogue(acc, xs_ptr, ws_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, R, HAS_LR, HAS_BIAS,
                  BLOCK_R)
    else:
        tile = pid_m * tl.cdiv(N, BLOCK_N) + pid_n
        last, acc = split_total(acc, part_ptr, cnt_ptr, pid_s, tile, offs_m, offs_n, M, N, NSPLIT)
        if last:
            _epilogue(acc, xs_ptr, ws_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, R, HAS_LR,
                      HAS_BIAS, BLOCK_R)
            reset_arrivals(cnt_ptr, tile)


@triton.jit
def _epilogue(acc, xs_ptr, ws_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, R,
              HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr):
    sx = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    sw = tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    out = acc.to(tl.float32) * (sw[:, None] * sx[None, :])  # exact int32 -> float32 (|dot| <= 127 K < 2^24)
    out = lowrank_bias_t(out, lr_ptr, up_ptr, bias_ptr, offs_m, offs_n, M, N, R, HAS_LR, HAS_BIAS, BLOCK_R)
    store_tile_t(out_ptr, out, offs_m, offs_n, M, N)


def k_splits(m: int, n: int, steps: int, device) -> int:
    """Split K only for few tokens: about two waves of (64-row, token block) tiles, >= 4 K steps each."""
    if m > SMALL_M:
        return 1
    want = triton.cdiv(2 * sm_count(device), triton.cdiv(n, 64))
    s = max(1, min(want, steps // 4))
    return triton.cdiv(steps, triton.cdiv(steps, s))


def ternary_int8_gemm(qx, xscales, qweight, wscales, lr=None, proj_up=None, bias=None, out_dtype=torch.bfloat16):
    """See reference.ternary_int8_gemm."""
    m, k = qx.shape
    n = qweight.shape[0]
    if qweight.shape[1] * 4 != k or xscales.shape != (m,) or wscales.shape != (n,):
        raise ValueError(f"ternary_int8_gemm: shapes qx {tuple(qx.shape)}, xscales {tuple(xscales.shape)}, "
                         f"qweight {tuple(qweight.shape)}, wscales {tuple(wscales.shape)} do not match")
    lr, proj_up = check_rank(lr, proj_up, "ternary_int8_gemm")
    r = 0 if lr is None else lr.shape[1]
    out = torch.empty(m, n, dtype=out_dtype, device=qx.device)
    if m == 0 or n == 0:
        return out
    qweight = qweight.contiguous()
    if qweight.data_ptr() % 16:  # read as int32 words
        qweight = qweight.clone()
    kb = _INTERP["KB"] if INTERPRET else max(c["KB"] for c in CONFIGS)
    nsplit = k_splits(m, n, triton.cdiv(k, 4 * kb), qx.device)
    part = cnt = out
    if nsplit > 1:
        part = torch.empty(nsplit, m, n, dtype=torch.int32, device=qx.device)
        cnt = tile_counters(qx.device, triton.cdiv(m, 16) * triton.cdiv(n, 32))
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), nsplit)
    launch("ternary_int8", _ternary_int8_kernel, grid, qx.device, dict(N=n, K=k, R=r, M=m_bucket(m)),
           qx.contiguous(), xscales.float().contiguous(), qweight, wscales.contiguous(),
           out if lr is None else lr, out if proj_up is None else proj_up, out if bias is None else bias.contiguous(),
           out, part, cnt, m, n, k, r, m_bucket(m), qweight.shape[1] // 4, nsplit,
           HAS_LR=lr is not None, HAS_BIAS=bias is not None, BLOCK_R=32 if r % 32 == 0 else 16)
    return out
