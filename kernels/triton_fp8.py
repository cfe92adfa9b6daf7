"""FP8 (e4m3) activations on FP8 tensor cores: per-token quantization fused with the low-rank down projection,
and the GEMMs for int4 (group rescale) and ternary weights (reference.quantize_act_fp8 / int4_fp8_gemm /
ternary_fp8_gemm).

The GEMMs compute out^T = W x^T tile by tile: the weight, decoded to e4m3 in registers, is the left operand
(Hopper's wgmma reads only that one from registers), x^T the right one, K-major as FP8 wgmma needs it, and
the token count is the instruction's N, so a tile of 16 tokens still runs on wgmma.
"""
import torch
import triton
import triton.language as tl

from .reference import E4M3_MAX, FLT_MIN, RCP
from .triton_common import MAX_RANK, candidates, cast, check_rank, configs, dot16, m_bucket, swizzle
from .triton_decode import (INT4_E4M3_UNIT, TERNARY_E4M3_UNIT, TERNARY_ZEROS_WORD, load_packed, unpack_int4_e4m3,
                            unpack_ternary_e4m3)
from .tuning import launch

RCP448, E4M3_MAX_C, FLT_MIN_C = tl.constexpr(RCP[448]), tl.constexpr(E4M3_MAX), tl.constexpr(FLT_MIN)
SUBNORMAL_WEIGHTS = True  # int4 weights as sign-magnitude bytes (q * 2^-9); False: converted through float16

ACT_CONFIGS = [{"BLOCK_M": bm, "BLOCK_K": bk, "num_warps": w, "num_stages": 2}
               for bm, bk, w in ((16, 128, 4), (16, 256, 4), (32, 128, 4), (64, 64, 4), (64, 128, 8))]
_TILES = ((128, 64, 4, 4), (64, 128, 4, 4), (128, 32, 4, 5), (64, 16, 4, 6), (128, 16, 4, 5))
# (BLOCK_N, BLOCK_M, num_warps, num_stages, SPLIT_M); int4's fresh dot per group holds a second accumulator, so
# its widest tiles run as two dots of half the tokens
INT4_CONFIGS = [{"BLOCK_N": bn, "BLOCK_M": bm, "SPLIT_M": sp, "GROUP_M": 8, "num_warps": w, "num_stages": s}
                for bn, bm, w, s, sp in ((128, 256, 8, 3, 2), (128, 128, 8, 4, 1), *(t + (1,) for t in _TILES))]
TERNARY_CONFIGS = [{"BLOCK_N": bn, "BLOCK_M": bm, "SPLIT_M": sp, "GROUP_M": 8, "num_warps": w, "num_stages": s}
                   for bn, bm, w, s, sp in ((128, 256, 8, 3, 1), (256, 128, 8, 3, 1), (128, 128, 8, 4, 1),
                                            *(t + (1,) for t in _TILES))]


@triton.jit
def _reciprocal(v):
    """float32 1 / v, IEEE-rounded (once per channel or token)."""
    return tl.math.div_rn(tl.full(v.shape, 1.0, tl.float32), v)


@triton.jit
def to_e4m3(v):
    """float32 -> float8e4nv as reference.to_e4m3: clamp to +-448, round to nearest even. The rounding is done
    here on the float32 (normal range: drop 20 mantissa bits on the bits; below 2^-6: to multiples of 2^-9), so
    the conversion that follows is exact whatever instruction the compiler picks: the interpreter's cast does
    not round to nearest even, and Triton 3.6 on sm_89 converts through float16 rounding toward zero first."""
    v = tl.minimum(tl.maximum(v, -E4M3_MAX_C), E4M3_MAX_C)
    a = tl.abs(v)
    b = a.to(tl.uint32, bitcast=True)
    normal = ((b + 0x7FFFF + ((b >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    small = (a + 16384.0) - 16384.0  # 2^14: its float32 spacing is 2^-9
    a = tl.where(a < 0.015625, small, normal).to(tl.uint32, bitcast=True)
    v = (a | (v.to(tl.uint32, bitcast=True) & 0x80000000)).to(tl.float32, bitcast=True)  # the sign, -0 included
    return v.to(tl.float8e4nv)


@triton.autotune(configs(ACT_CONFIGS, {"BLOCK_M": 16, "BLOCK_K": 64}), key=["M_KEY", "K", "R"],
                 prune_configs_by={"early_config_prune": lambda cfgs, named_args, **kw: candidates(cfgs, named_args["M"])[:3]})
@triton.jit
def _act_fp8_kernel(x_ptr, smooth_ptr, down_ptr, q_ptr, s_ptr, lr_ptr, M, K, R, M_KEY,
                    HAS_SMOOTH: tl.constexpr, HAS_LR: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Two passes over the row block's K: absmax of x / smooth and x @ proj_down, then the codes."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_m < M
    amax = tl.zeros((BLOCK_M,), tl.float32)
    lacc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
        xs = x.to(tl.float32)
        if HAS_SMOOTH:
            xs = xs * _reciprocal(tl.load(smooth_ptr + offs_k, mask=offs_k < K, other=1.0).to(tl.float32))[None, :]
        amax = tl.maximum(amax, tl.max(tl.abs(xs), axis=1))
        if HAS_LR:
            d = tl.load(down_ptr + offs_k[:, None] * R + offs_r[None, :],
                        mask=(offs_k[:, None] < K) & (offs_r[None, :] < R), other=0.0)
            lacc = dot16(cast(x.to(tl.float32), d.dtype), d, lacc)
    if HAS_LR:
        tl.store(lr_ptr + offs_m[:, None] * R + offs_r[None, :], cast(lacc, lr_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_r[None, :] < R))
    scale = amax * RCP448
    ok = scale >= FLT_MIN_C
    rscale = tl.where(ok, _reciprocal(tl.where(ok, scale, 1.0)), 0.0)
    tl.store(s_ptr + offs_m, scale, mask=row_ok)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ptrs = offs_m[:, None] * K + offs_k[None, :]
        mask = row_ok[:, None] & (offs_k[None, :] < K)
        xs = tl.load(x_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            xs = xs * _reciprocal(tl.load(smooth_ptr + offs_k, mask=offs_k < K, other=1.0).to(tl.float32))[None, :]
        tl.store(q_ptr + ptrs, to_e4m3(xs * rscale[:, None]), mask=mask)


def _prune(cfgs, named_args, **kwargs):
    """Without a tuned entry (kernels/configs): at most 3 candidates, token blocks no wider than needed."""
    return candidates(cfgs, named_args["M"])[:3]


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
            acc = dot16(up, lrt, acc)
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
                               key=_KEY, prune_configs_by={"early_config_prune": _prune})(_fp8_gemm_kernel)
_ternary_kernel = triton.autotune(configs(TERNARY_CONFIGS, {"BLOCK_N": 32, "BLOCK_M": 16, "SPLIT_M": 1, "GROUP_M": 4}),
                                  key=_KEY, prune_configs_by={"early_config_prune": _prune})(_fp8_gemm_kernel)


def quantize_act_fp8(x, smooth=None, proj_down=None):
    """See reference.quantize_act_fp8; the down projection is computed in the same pass."""
    m, k = x.shape
    x = x.contiguous()
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    r = 0 if proj_down is None else proj_down.shape[1]
    if r > MAX_RANK:
        raise ValueError(f"quantize_act_fp8: proj_down rank {r} exceeds {MAX_RANK}")
    lr = None if proj_down is None else torch.empty(m, r, dtype=proj_down.dtype, device=x.device)
    if m == 0:
        return q, s, lr
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)
    launch("act_fp8", _act_fp8_kernel, grid, x.device, dict(K=k, R=r, M=m_bucket(m)),
           x, x if smooth is None else smooth.contiguous(), x if lr is None else proj_down.contiguous(),
           q, s, q if lr is None else lr, m, k, r, m_bucket(m), HAS_SMOOTH=smooth is not None,
           HAS_LR=lr is not None, BLOCK_R=max(16, triton.next_power_of_2(max(r, 1))))
    return q, s, lr


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
