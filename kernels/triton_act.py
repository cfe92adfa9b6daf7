"""Activation kernels: per-token int4 (groups) / int8 quantization fused with the low-rank down projection.

One pass reads x once: for each group it quantizes and feeds the same tile to `x @ proj_down`.
Rounding and reciprocals are pinned as in reference.py so codes and scales equal it bit for bit.
"""
import torch
import triton
import triton.language as tl

from .reference import ACT_SHIFT, FLT_MIN, RCP
from .triton_common import MAX_RANK, cast, configs, dot16, m_bucket

CONFIGS = [{"BLOCK_M": bm, "num_warps": w, "num_stages": 2} for bm in (16, 32, 64) for w in (4, 8)]
_ACT_CONFIGS = configs(CONFIGS, {"BLOCK_M": 16, "num_warps": 4})
ACT_SHIFT_C = tl.constexpr(ACT_SHIFT)
FLT_MIN_C = tl.constexpr(FLT_MIN)
RCP7, RCP15, RCP127 = tl.constexpr(RCP[7]), tl.constexpr(RCP[15]), tl.constexpr(RCP[127])
RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: v + M - M rounds |v| < 2^22 to an integer, ties to even


@triton.jit
def reciprocal(v):
    """float32 1 / v, IEEE-rounded (one division per channel or group, never per element)."""
    return tl.math.div_rn(tl.full(v.shape, 1.0, tl.float32), v)


@triton.jit
def round_codes(v, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """clamp then round half to even, as reference._quantize_groups; the clamp also keeps the compiler
    from fusing the caller's multiply into the add (an FMA would skip the product's rounding)."""
    v = tl.minimum(tl.maximum(v, QMIN), QMAX)
    return (v + RNE_MAGIC) - RNE_MAGIC


@triton.jit
def group_rscale(amax, RCP_Q: tl.constexpr):
    """(scale, 1 / scale or 0) of per-row absmax values."""
    scale = amax * RCP_Q
    ok = scale >= FLT_MIN_C
    return scale, tl.where(ok, reciprocal(tl.where(ok, scale, 1.0)), 0.0)


@triton.jit
def _quantize(xs, QMIN: tl.constexpr, QMAX: tl.constexpr, RCP_Q: tl.constexpr):
    """Row-wise absmax quantization of a float32 tile -> (float32 codes, float32 scales)."""
    scale, rscale = group_rscale(tl.max(tl.abs(xs), axis=1), RCP_Q)
    return round_codes(xs * rscale[:, None], QMIN, QMAX), scale


@triton.autotune(_ACT_CONFIGS, key=["M_KEY", "K", "R"])
@triton.jit
def _act_int4_kernel(x_ptr, smooth_ptr, down_ptr, q_ptr, s_ptr, lr_ptr, M, K, R, M_KEY,
                     HAS_SMOOTH: tl.constexpr, HAS_LR: tl.constexpr, UNSIGNED: tl.constexpr,
                     GS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_g = tl.arange(0, GS)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_m < M
    G = K // GS
    lacc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for g in range(0, G):
        offs_k = g * GS + offs_g
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=row_ok[:, None], other=0.0)
        xs = x.to(tl.float32)
        if UNSIGNED:
            xs = xs + ACT_SHIFT_C
        if HAS_SMOOTH:
            sm = tl.load(smooth_ptr + offs_k).to(tl.float32)
            xs = xs * reciprocal(sm)[None, :]
        if UNSIGNED:
            q, scale = _quantize(xs, 0.0, 15.0, RCP15)
        else:
            q, scale = _quantize(xs, -8.0, 7.0, RCP7)
        tl.store(q_ptr + offs_m[:, None] * K + offs_k[None, :], q.to(tl.int8), mask=row_ok[:, None])
        tl.store(s_ptr + offs_m * G + g, scale, mask=row_ok)
        if HAS_LR:
            d = tl.load(down_ptr + offs_k[:, None] * R + offs_r[None, :], mask=offs_r[None, :] < R, other=0.0)
            lacc = dot16(cast(x.to(tl.float32), d.dtype), d, lacc)
    if HAS_LR:
        tl.store(lr_ptr + offs_m[:, None] * R + offs_r[None, :], cast(lacc, lr_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_r[None, :] < R))


@triton.autotune(_ACT_CONFIGS, key=["M_KEY", "K", "R", "QUANT"])
@triton.jit
def _act_int8_kernel(x_ptr, down_ptr, q_ptr, s_ptr, lr_ptr, M, K, R, M_KEY,
                     QUANT: tl.constexpr, HAS_LR: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per-token int8 over all of K (two passes: absmax + down projection, then codes); QUANT=False
    computes only the down projection (lora_down)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_m < M
    amax = tl.zeros((BLOCK_M,), tl.float32)
    lacc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=row_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        if QUANT:
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        if HAS_LR:
            d = tl.load(down_ptr + offs_k[:, None] * R + offs_r[None, :],
                        mask=(offs_k[:, None] < K) & (offs_r[None, :] < R), other=0.0)
            lacc = dot16(cast(x.to(tl.float32), d.dtype), d, lacc)
    if HAS_LR:
        tl.store(lr_ptr + offs_m[:, None] * R + offs_r[None, :], cast(lacc, lr_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_r[None, :] < R))
    if QUANT:
        scale, rscale = group_rscale(amax, RCP127)
        tl.store(s_ptr + offs_m, scale, mask=row_ok)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            ptrs = offs_m[:, None] * K + offs_k[None, :]
            mask = row_ok[:, None] & (offs_k[None, :] < K)
            xs = tl.load(x_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
            q = round_codes(xs * rscale[:, None], -127.0, 127.0)
            tl.store(q_ptr + ptrs, q.to(tl.int8), mask=mask)


def _rank_block(proj_down, what):
    if proj_down is None:
        return 16
    r = proj_down.shape[1]
    if r > MAX_RANK:
        raise ValueError(f"{what}: proj_down rank {r} exceeds {MAX_RANK}")
    return max(16, triton.next_power_of_2(r))


def quantize_act_int4(x, smooth, proj_down=None, group_size=64, unsigned=False):
    """See reference.quantize_act_int4; the down projection is computed in the same pass."""
    m, k = x.shape
    if k % group_size or group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"quantize_act_int4: K = {k} must be a multiple of group_size {group_size} (a power of two >= 16)")
    x = x.contiguous()
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, k // group_size, dtype=torch.float32, device=x.device)
    r = 0 if proj_down is None else proj_down.shape[1]
    lr = None if proj_down is None else torch.empty(m, r, dtype=proj_down.dtype, device=x.device)
    down = None if proj_down is None else proj_down.contiguous()
    if m == 0:
        return q, s, lr
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)
    _act_int4_kernel[grid](x, x if smooth is None else smooth.contiguous(), x if down is None else down, q, s,
                           q if lr is None else lr, m, k, r, m_bucket(m), HAS_SMOOTH=smooth is not None,
                           HAS_LR=down is not None, UNSIGNED=bool(unsigned), GS=group_size,
                           BLOCK_R=_rank_block(proj_down, "quantize_act_int4"))
    return q, s, lr


def _act_int8(x, proj_down, quant):
    m, k = x.shape
    x = x.contiguous()
    q = torch.empty(m, k, dtype=torch.int8, device=x.device) if quant else None
    s = torch.empty(m, dtype=torch.float32, device=x.device) if quant else None
    r = 0 if proj_down is None else proj_down.shape[1]
    lr = None if proj_down is None else torch.empty(m, r, dtype=proj_down.dtype, device=x.device)
    down = None if proj_down is None else proj_down.contiguous()
    if m == 0:
        return q, s, lr
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)
    _act_int8_kernel[grid](x, x if down is None else down, x if q is None else q, x if s is None else s,
                           x if lr is None else lr, m, k, r, m_bucket(m), QUANT=quant, HAS_LR=down is not None,
                           BLOCK_K=64, BLOCK_R=_rank_block(proj_down, "quantize_act_int8"))
    return q, s, lr


def quantize_act_int8(x, proj_down=None):
    """See reference.quantize_act_int8."""
    return _act_int8(x, proj_down, True)


def lora_down(x, proj_down):
    """See reference.lora_down."""
    if proj_down is None:
        return None
    return _act_int8(x, proj_down, False)[2]
