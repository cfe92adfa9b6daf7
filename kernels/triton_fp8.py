"""FP8 (e4m3) activations on FP8 tensor cores: the GEMMs for int4 (group rescale) and ternary weights
(reference.int4_fp8_gemm / ternary_fp8_gemm); the activations come from triton_rowquant.quantize_act_fp8.

The GEMMs compute out^T = W x^T tile by tile: the weight, decoded to e4m3 in registers, is the left operand
(Hopper's wgmma reads only that one from registers), x^T the right one, K-major as FP8 wgmma needs it, and
the token count is the instruction's N, so a tile of 16 tokens still runs on wgmma.
"""
import torch
import triton
import triton.language as tl

from .triton_common import cast, check_rank, configs, m_bucket, prune_by_m, swizzle, up_branch_t
from .triton_decode import (INT4_E4M3_UNIT, TERNARY_E4M3_UNIT, TERNARY_ZEROS_WORD, load_packed, unpack_int4_e4m3,
                            unpack_ternary_e4m3)
from .tuning import launch

SUBNORMAL_WEIGHTS = True  # int4 weights as sign-magnitude bytes (q * 2^-9); False: converted through float16

_TILES = ((128, 64, 4, 4), (64, 128, 4, 4), (128, 32, 4, 5), (64, 16, 4, 6), (128, 16, 4, 5))
# (BLOCK_N, BLOCK_M, num_warps, num_stages, SPLIT_M); int4's fresh dot per group holds a second accumulator, so
# its widest tiles run as two dots of half the tokens
INT4_CONFIGS = [{"BLOCK_N": bn, "BLOCK_M": bm, "SPLIT_M": sp, "GROUP_M": 8, "num_warps": w, "num_stages": s}
                for bn, bm, w, s, sp in ((128, 256, 8, 3, 2), (128, 128, 8, 4, 1), *(t + (1,) for t in _TILES))]
TERNARY_CONFIGS = [{"BLOCK_N": bn, "BLOCK_M": bm, "SPLIT_M": sp, "GROUP_M": 8, "num_warps": w, "num_stages": s}
                   for bn, bm, w, s, sp in ((128, 256, 8, 3, 1), (256, 128, 8, 3, 1), (128, 128, 8, 4, 1),
                                            *(t + (1,) for t in _TILES))]


@triton.jit
def _epilogue(acc, offs_m, offs_n, xs_ptr, ws_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, M, N, R,
              TERNARY: tl.constexpr, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr):
    """out^T tile: acc * activation scales (ternary: * weight scales), + proj_up @ lr^T, + bias; stored."""
    n_ok = offs_n < N
    xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    if TERNARY:
        sw = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc = (acc * TERNARY_E4M3_UNIT) * (sw[:, None] * xs[None, :])
    else:
        acc = acc * xs[None, :]
    if HAS_LR:
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            up = tl.load(up_ptr + offs_n[:, None] * R + offs_r[None, :], mask=n_ok[:, None] & (offs_r[None, :] < R),
                         other=0.0)
            lrt = tl.load(lr_ptr + offs_m[None, :] * R + offs_r[:, None],
                          mask=(offs_m[None, :] < M) & (offs_r[:, None] < R), other=0.0)
            acc = up_branch_t(acc, up, lrt)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + offs_m[None, :] * N + offs_n[:, None], cast(acc, out_ptr.dtype.element_ty),
             mask=(offs_m[None, :] < M) & n_ok[:, None])


@triton.jit
def _fp8_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, M, N, K, R, M_KEY, W_ROW,
                     TERNARY: tl.constexpr, SUBNORMAL: tl.constexpr, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                     SPLIT_M: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile (BLOCK_N weight rows) x (BLOCK_M tokens) of out^T, as SPLIT_M (1 or 2) dots of BLOCK_M / SPLIT_M
    tokens sharing each decoded weight tile. int4: one weight group (BLOCK_K) per step, a fresh dot rescaled
    by the group's weight scales (FP8 accumulation never runs past a group); ternary: accumulated in the dot,
    promoted to float32 every BLOCK_K."""
    SUB: tl.constexpr = BLOCK_M // SPLIT_M
    pid_m, pid_n = swizzle(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, SUB)
    offs_m2 = offs_m + SUB
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, SUB), tl.float32)
    acc2 = tl.zeros((BLOCK_N, SUB), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_m[None, :] * K + offs_k[:, None], mask=offs_m[None, :] < M, other=0.0)
        if SPLIT_M == 2:
            xt2 = tl.load(x_ptr + offs_m2[None, :] * K + offs_k[:, None], mask=offs_m2[None, :] < M, other=0.0)
        if TERNARY:
            w = unpack_ternary_e4m3(load_packed(w_ptr, offs_n, k0 // 16, W_ROW, N, BLOCK_K // 16, TERNARY_ZEROS_WORD))
            acc = tl.dot(w, xt, acc, max_num_imprecise_acc=BLOCK_K)
            if SPLIT_M == 2:
                acc2 = tl.dot(w, xt2, acc2, max_num_imprecise_acc=BLOCK_K)
        else:
            w = unpack_int4_e4m3(load_packed(w_ptr, offs_n, k0 // 8, W_ROW, N, BLOCK_K // 8, 0), SUBNORMAL)
            ws = tl.load(ws_ptr + (k0 // BLOCK_K) * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            if SUBNORMAL:
                ws = ws * INT4_E4M3_UNIT
            acc += tl.dot(w, xt) * ws[:, None]
            if SPLIT_M == 2:
                acc2 += tl.dot(w, xt2) * ws[:, None]
    _epilogue(acc, offs_m, offs_n, xs_ptr, ws_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, M, N, R,
              TERNARY, HAS_LR, HAS_BIAS, BLOCK_R)
    if SPLIT_M == 2:
        _epilogue(acc2, offs_m2, offs_n, xs_ptr, ws_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, M, N, R,
                  TERNARY, HAS_LR, HAS_BIAS, BLOCK_R)


_KEY = ["M_KEY", "N", "K", "R"]
_int4_kernel = triton.autotune(configs(INT4_CONFIGS, {"BLOCK_N": 32, "BLOCK_M": 32, "SPLIT_M": 2, "GROUP_M": 4}),
                               key=_KEY, prune_configs_by={"early_config_prune": prune_by_m})(_fp8_gemm_kernel)
_ternary_kernel = triton.autotune(configs(TERNARY_CONFIGS, {"BLOCK_N": 32, "BLOCK_M": 16, "SPLIT_M": 1, "GROUP_M": 4}),
                                  key=_KEY, prune_configs_by={"early_config_prune": prune_by_m})(_fp8_gemm_kernel)


def _fp8_gemm(qx, xscales, qweight, wscales, lr, proj_up, bias, out_dtype, ternary, what):
    m, k = qx.shape
    n = qweight.shape[0]
    groups = 1 if ternary else wscales.shape[0]
    per_byte = 4 if ternary else 2
    bad = qweight.shape[1] * per_byte != k or xscales.shape != (m,) or qx.dtype != torch.float8_e4m3fn
    bad = bad or k % 64 or (wscales.shape != (n,) if ternary else (wscales.shape[1] != n or k != 64 * groups))
    if bad:
        raise ValueError(f"{what}: shapes qx {tuple(qx.shape)} {qx.dtype}, xscales {tuple(xscales.shape)}, qweight "
                         f"{tuple(qweight.shape)}, wscales {tuple(wscales.shape)} do not match (groups of 64 along K)")
    lr, proj_up = check_rank(lr, proj_up, what)
    r = 0 if lr is None else lr.shape[1]
    out = torch.empty(m, n, dtype=out_dtype, device=qx.device)
    if m == 0 or n == 0:
        return out
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    words = qweight.contiguous().view(torch.int32)  # rows of K / per_byte bytes, K a multiple of 64
    name, tuner = ("fp8_ternary", _ternary_kernel) if ternary else ("fp8_int4", _int4_kernel)
    launch(name, tuner, grid, qx.device, dict(N=n, K=k, R=r, M=m_bucket(m)),
           qx.contiguous(), xscales.float().contiguous(), words, wscales.contiguous(),
           out if lr is None else lr, out if proj_up is None else proj_up, out if bias is None else bias.contiguous(),
           out, m, n, k, r, m_bucket(m), words.shape[1], TERNARY=ternary, SUBNORMAL=SUBNORMAL_WEIGHTS,
           HAS_LR=lr is not None, HAS_BIAS=bias is not None, BLOCK_K=64, BLOCK_R=32 if r % 32 == 0 else 16)
    return out


def int4_fp8_gemm(qx, xscales, qweight, wscales, lr=None, proj_up=None, bias=None, out_dtype=torch.bfloat16):
    """See reference.int4_fp8_gemm (groups of 64 along K)."""
    return _fp8_gemm(qx, xscales, qweight, wscales, lr, proj_up, bias, out_dtype, False, "int4_fp8_gemm")


def ternary_fp8_gemm(qx, xscales, qweight, wscales, lr=None, proj_up=None, bias=None, out_dtype=torch.bfloat16):
    """See reference.ternary_fp8_gemm (K a multiple of 64)."""
    return _fp8_gemm(qx, xscales, qweight, wscales, lr, proj_up, bias, out_dtype, True, "ternary_fp8_gemm")
