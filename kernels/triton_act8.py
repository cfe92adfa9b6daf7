"""Per-token int8 activation quantization over all of K (ternary_int8) fused with the low-rank down projection;
also the down projection alone (lora_down). Rounding pinned as in reference.py (triton_rounding.py)."""
import torch
import triton
import triton.language as tl

from .triton_common import cast, configs, dot16, m_bucket, rank_block
from .triton_rounding import RCP127, group_rscale, round_to_int8

CONFIGS = [{"BLOCK_M": bm, "num_warps": w, "num_stages": 2} for bm in (16, 32, 64) for w in (4, 8)]
_ACT_CONFIGS = configs(CONFIGS, {"BLOCK_M": 16, "num_warps": 4})


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
            tl.store(q_ptr + ptrs, round_to_int8(xs * rscale[:, None], -127.0), mask=mask)


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
                           BLOCK_K=64, BLOCK_R=rank_block(proj_down, "quantize_act_int8"))
    return q, s, lr


def quantize_act_int8(x, proj_down=None):
    """See reference.quantize_act_int8."""
    return _act_int8(x, proj_down, True)


def lora_down(x, proj_down):
    """See reference.lora_down."""
    if proj_down is None:
        return None
    return _act_int8(x, proj_down, False)[2]
