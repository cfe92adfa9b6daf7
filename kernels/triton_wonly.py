"""Weight-only kernels with 16-bit activations: W4A16 (int4 groups, scales [+ zeros]) and ternary.

W4A16 dequantizes each tile to the compute dtype before the dot (q * s + z rounded, as
reference.dequant_int4); ternary decodes {-1, 0, 1} exactly and applies the per-channel scale after
the dot, then the low-rank branch and bias. For few tokens (M <= 64, GEMV-like, memory-bound) the
K loop is split across programs that add float32 partials atomically; the host casts the result.
"""
import torch
import triton
import triton.language as tl

from .triton_common import cast, check_rank, configs, dot16, lowrank_bias, m_bucket, store_tile, swizzle
from .triton_decode import TERNARY_ZEROS, load_packed, unpack_int4, unpack_ternary

SMALL_M = 64


def _zero_out(nargs):
    nargs["out_ptr"].zero_()


SMALL_CONFIGS = [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "SPLIT_K": sk, "GROUP_M": 1, "num_warps": 4,
           "num_stages": 4, "pre_hook": _zero_out}
          for bm, bns, sks in ((16, (32, 64, 128), (1, 2, 4, 8)), (32, (64, 128), (1, 2, 4)), (64, (64, 128), (1, 2, 4)))
          for bn in bns for sk in sks]
LARGE_CONFIGS = [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "SPLIT_K": 1, "GROUP_M": 8, "num_warps": w, "num_stages": s}
          for bm, bn, w, s in ((128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 256, 8, 3))]
_INTERP = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


@triton.jit
def _wonly_kernel(x_ptr, w_ptr, ws_ptr, wz_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, M, N, K, R, M_KEY, W_ROW,
                  TERNARY: tl.constexpr, HAS_Z: tl.constexpr, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr,
                  ATOMIC: tl.constexpr, GS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = swizzle(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cdt = ws_ptr.dtype.element_ty  # x arrives in it (converted on the host like reference's x.to(cdt))
    k_len = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_len
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(k_lo, tl.minimum(k_lo + k_len, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                    other=0.0)
        if TERNARY:
            t = unpack_ternary(load_packed(w_ptr, offs_n, k0 // 4, W_ROW, N, BLOCK_K // 4, TERNARY_ZEROS))
            w = tl.trans(t).to(tl.float32).to(cdt)  # exact; the interpreter mis-casts int -> bf16
        else:
            g = k0 // GS  # BLOCK_K divides GS: one scale row per tile
            s = tl.load(ws_ptr + g * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            q = tl.trans(unpack_int4(load_packed(w_ptr, offs_n, k0 // 2, W_ROW, N, BLOCK_K // 2, 0), False))
            wf = q.to(tl.float32) * s[None, :]
            if HAS_Z:
                wf = wf + tl.load(wz_ptr + g * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            w = cast(wf, cdt)
        acc = dot16(a, w, acc)
    if TERNARY:
        acc = acc * tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if pid_k == 0:  # the epilogue terms go in once, with the first K slice
        acc = lowrank_bias(acc, lr_ptr, up_ptr, bias_ptr, offs_m, offs_n, M, N, R, HAS_LR, HAS_BIAS, BLOCK_R)
    store_tile(out_ptr, acc, offs_m, offs_n, M, N, ATOMIC)


def _prune(cfgs, named_args, **kwargs):
    """BLOCK_K must divide the group; row blocks no taller than the token count needs."""
    gs = named_args["GS"] if "GS" in named_args else kwargs.get("GS", 64)
    need = max(16, triton.next_power_of_2(named_args["M"]))
    keep = [c for c in cfgs if gs % c.kwargs["BLOCK_K"] == 0 and c.kwargs["BLOCK_M"] <= need]
    return keep or [c for c in cfgs if gs % c.kwargs["BLOCK_K"] == 0][:1]


_KEY = ["M_KEY", "N", "K", "R", "TERNARY", "HAS_Z", "GS"]
_small = triton.autotune(configs(SMALL_CONFIGS, {**_INTERP, "SPLIT_K": 2, "pre_hook": _zero_out}), key=_KEY,
                         prune_configs_by={"early_config_prune": _prune})(_wonly_kernel)
_large = triton.autotune(configs(LARGE_CONFIGS, {**_INTERP, "SPLIT_K": 1}), key=_KEY,
                         prune_configs_by={"early_config_prune": _prune})(_wonly_kernel)


def _launch(x, qweight, wscales, wzeros, lr, proj_up, bias, out_dtype, ternary, gs):
    m, k = x.shape
    n = qweight.shape[0]
    lr, proj_up = check_rank(lr, proj_up, "ternary_gemm")
    r = 0 if lr is None else lr.shape[1]
    atomic = m <= SMALL_M
    out = torch.empty(m, n, dtype=torch.float32 if atomic else out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out.to(out_dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
    (_small if atomic else _large)[grid](
        x.to(wscales.dtype).contiguous(), qweight.contiguous(), wscales.contiguous(), out if wzeros is None else wzeros.contiguous(),
        out if lr is None else lr, out if proj_up is None else proj_up, out if bias is None else bias.contiguous(), out,
        m, n, k, r, m_bucket(m), k // (4 if ternary else 2), TERNARY=ternary, HAS_Z=wzeros is not None, HAS_LR=lr is not None,
        HAS_BIAS=bias is not None, ATOMIC=atomic, GS=gs, BLOCK_R=32 if r % 32 == 0 else 16)
    return out.to(out_dtype) if atomic else out


def w4a16_gemm(x, qweight, wscales, wzeros=None, bias=None, out_dtype=None):
    """See reference.w4a16_gemm (group size K / wscales.shape[0]: a power of two >= 64)."""
    k = x.shape[1]
    gs = k // wscales.shape[0]
    if qweight.shape[1] * 2 != k or gs * wscales.shape[0] != k or gs < 64 or gs & (gs - 1):
        raise ValueError(f"w4a16_gemm: shapes x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
                         f"wscales {tuple(wscales.shape)} do not match (group size must be a power of two >= 64)")
    return _launch(x, qweight, wscales, wzeros, None, None, bias, out_dtype or x.dtype, False, gs)


def ternary_gemm(x, qweight, wscales, lr=None, proj_up=None, bias=None, out_dtype=None):
    """See reference.ternary_gemm."""
    if qweight.shape[1] * 4 != x.shape[1]:
        raise ValueError(f"ternary_gemm: x {tuple(x.shape)} does not match qweight {tuple(qweight.shape)} (K/4 bytes per row)")
    return _launch(x, qweight, wscales, None, lr, proj_up, bias, out_dtype or x.dtype, True, 64)
