"""Ternary weights x int8 activations: int8 dot with int32 accumulation over all of K (exact), then
per-token x per-channel scales, the low-rank branch and bias in float32 (reference.ternary_int8_gemm)."""
import torch
import triton
import triton.language as tl

from .triton_common import check_rank, configs, lowrank_bias, m_bucket, store_tile, swizzle
from .triton_decode import TERNARY_ZEROS, load_packed, unpack_ternary

CONFIGS = [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": w, "num_stages": s}
           for bm, bn, w, s in ((128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4),
                                (64, 256, 8, 3), (64, 64, 4, 4), (32, 128, 4, 4), (16, 128, 4, 4), (16, 64, 4, 5))
           for bk in (64, 128)]


def _prune(cfgs, named_args, **kwargs):
    """Row blocks no taller than the token count needs; BLOCK_K dividing K."""
    need = max(16, triton.next_power_of_2(named_args["M"]))
    keep = [c for c in cfgs if c.kwargs["BLOCK_M"] <= need and named_args["K"] % c.kwargs["BLOCK_K"] == 0]
    return keep or cfgs[:1]


@triton.autotune(configs(CONFIGS, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}),
                 key=["M_KEY", "N", "K", "R"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _ternary_int8_kernel(qx_ptr, xs_ptr, w_ptr, ws_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, M, N, K, R, M_KEY, W_ROW,
                         HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = swizzle(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(qx_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        w = unpack_ternary(load_packed(w_ptr, offs_n, k0 // 4, W_ROW, N, BLOCK_K // 4, TERNARY_ZEROS))
        acc += tl.dot(a, tl.trans(w), out_dtype=tl.int32)
    sx = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    sw = tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    out = acc.to(tl.float32) * (sx[:, None] * sw[None, :])
    out = lowrank_bias(out, lr_ptr, up_ptr, bias_ptr, offs_m, offs_n, M, N, R, HAS_LR, HAS_BIAS, BLOCK_R)
    store_tile(out_ptr, out, offs_m, offs_n, M, N, False)


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
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _ternary_int8_kernel[grid](qx.contiguous(), xscales.float().contiguous(), qweight.contiguous(), wscales.contiguous(),
                               out if lr is None else lr, out if proj_up is None else proj_up,
                               out if bias is None else bias.contiguous(), out, m, n, k, r, m_bucket(m), k // 4,
                               HAS_LR=lr is not None, HAS_BIAS=bias is not None, BLOCK_R=32 if r % 32 == 0 else 16)
    return out
