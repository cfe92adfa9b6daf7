"""SVDQuant W4A4 GEMM: int4 x int4 as int8 tensor-core dots, rescaled per group of 64 in float32.

out = sum_g (qx_g @ qw_g^T) * (ascale_g x wscale_g) + lr @ proj_up^T + bias. Triton has no int4 dot, so
weight nibbles are sign-extended to int8 in registers; each group's int32 dot is exact, the rescale and
the low-rank/bias epilogue run in float32 in the order reference.w4a4_gemm uses.
"""
import torch
import triton
import triton.language as tl

from .triton_common import check_rank, configs, lowrank_bias, m_bucket, store_tile, swizzle
from .triton_decode import load_packed, unpack_int4

CONFIGS = [{"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, "num_warps": w, "num_stages": s}
         for bm, bn, w, s in ((128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4),
                              (64, 256, 8, 3), (64, 64, 4, 4), (32, 128, 4, 4), (16, 128, 4, 4), (16, 64, 4, 5))]


def _prune(cfgs, named_args, **kwargs):
    """Keep row blocks no taller than needed for the token count (M = 1 runs on 16-row blocks)."""
    need = max(16, triton.next_power_of_2(named_args["M"]))
    keep = [c for c in cfgs if c.kwargs["BLOCK_M"] <= need]
    return keep or cfgs[:1]


@triton.autotune(configs(CONFIGS, {"BLOCK_M": 16, "BLOCK_N": 32, "GROUP_M": 4}), key=["M_KEY", "N", "K", "R"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _w4a4_kernel(qx_ptr, as_ptr, w_ptr, ws_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, M, N, K, R, M_KEY, W_ROW,
                 HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, GS: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = swizzle(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, GS)
    G = K // GS
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for g in range(0, G):
        offs_k = g * GS + offs_g
        a = tl.load(qx_ptr + offs_m[:, None] * K + offs_k[None, :], mask=offs_m[:, None] < M, other=0)
        w = tl.trans(unpack_int4(load_packed(w_ptr, offs_n, g * (GS // 2), W_ROW, N, GS // 2, 0), False))
        d = tl.dot(a, w, out_dtype=tl.int32)
        sa = tl.load(as_ptr + offs_m * G + g, mask=offs_m < M, other=0.0)
        sw = tl.load(ws_ptr + g * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc + d.to(tl.float32) * (sa[:, None] * sw[None, :])
    acc = lowrank_bias(acc, lr_ptr, up_ptr, bias_ptr, offs_m, offs_n, M, N, R, HAS_LR, HAS_BIAS, BLOCK_R)
    store_tile(out_ptr, acc, offs_m, offs_n, M, N, False)


def w4a4_gemm(qx, ascales, qweight, wscales, lr=None, proj_up=None, bias=None, out_dtype=torch.bfloat16):
    """See reference.w4a4_gemm. Groups must hold a power of two >= 16 (64 in every format here)."""
    m, k = qx.shape
    n = qweight.shape[0]
    groups = wscales.shape[0]
    gs = k // groups
    if qweight.shape[1] * 2 != k or gs * groups != k or gs < 16 or gs & (gs - 1) or ascales.shape != (m, groups):
        raise ValueError(f"w4a4_gemm: shapes qx {tuple(qx.shape)}, ascales {tuple(ascales.shape)}, "
                         f"qweight {tuple(qweight.shape)}, wscales {tuple(wscales.shape)} do not match")
    lr, proj_up = check_rank(lr, proj_up, "w4a4_gemm")
    r = 0 if lr is None else lr.shape[1]
    out = torch.empty(m, n, dtype=out_dtype, device=qx.device)
    if m == 0 or n == 0:
        return out
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _w4a4_kernel[grid](qx.contiguous(), ascales.float().contiguous(), qweight.contiguous(), wscales.contiguous(),
                       out if lr is None else lr, out if proj_up is None else proj_up,
                       out if bias is None else bias.contiguous(), out, m, n, k, r, m_bucket(m), k // 2,
                       HAS_LR=lr is not None, HAS_BIAS=bias is not None, GS=gs, BLOCK_R=32 if r % 32 == 0 else 16)
    return out
