"""Per-token activation quantization over all of K, fused with the low-rank down projection: int8 codes for
ternary_int8 and (after smoothing) the W4A8 GEMM, e4m3 codes (after smoothing) for the FP8 GEMMs; also the down
projection alone (lora_down).
Rounding pinned as in reference.py (triton_rounding.py)."""
import torch
import triton
import triton.language as tl

from .triton_common import cast, configs, dot16, m_bucket, prune_by_m, rank_block
from .triton_rounding import RCP127, RCP448, group_rscale, reciprocal, round_to_int8, to_e4m3
from .tuning import launch

CONFIGS = [{"BLOCK_M": bm, "BLOCK_K": bk, "num_warps": w, "num_stages": 2}
           for bm, bk, w in ((16, 128, 4), (16, 256, 4), (32, 128, 4), (64, 64, 4), (64, 128, 8))]
NONE, INT8, E4M3 = 0, 1, 2  # CODES: down projection only, int8 in [-127, 127], float8e4nv
_NONE, _INT8 = tl.constexpr(NONE), tl.constexpr(INT8)


@triton.autotune(configs(CONFIGS, {"BLOCK_M": 16, "BLOCK_K": 64}), key=["M_KEY", "K", "R", "CODES", "HAS_SMOOTH"],
                 prune_configs_by={"early_config_prune": prune_by_m})
@triton.jit
def _row_quant_kernel(x_ptr, smooth_ptr, down_ptr, q_ptr, s_ptr, lr_ptr, M, K, R, M_KEY,
                      CODES: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_LR: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Two passes over the row block's K: absmax of x (/ smooth) and x @ proj_down, then the codes."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_m < M
    amax = tl.zeros((BLOCK_M,), tl.float32)
    lacc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=row_ok[:, None] & (offs_k[None, :] < K),
                    other=0.0)
        if CODES != _NONE:
            amax = tl.maximum(amax, tl.max(tl.abs(_smoothed(x, smooth_ptr, offs_k, K, HAS_SMOOTH)), axis=1))
        if HAS_LR:
            d = tl.load(down_ptr + offs_k[:, None] * R + offs_r[None, :],
                        mask=(offs_k[:, None] < K) & (offs_r[None, :] < R), other=0.0)
            lacc = dot16(cast(x.to(tl.float32), d.dtype), d, lacc)
    if HAS_LR:
        tl.store(lr_ptr + offs_m[:, None] * R + offs_r[None, :], lacc, mask=row_ok[:, None] & (offs_r[None, :] < R))
    if CODES != _NONE:
        scale, rscale = group_rscale(amax, RCP127 if CODES == _INT8 else RCP448)
        tl.store(s_ptr + offs_m, scale, mask=row_ok)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            ptrs = offs_m[:, None] * K + offs_k[None, :]
            mask = row_ok[:, None] & (offs_k[None, :] < K)
            v = _smoothed(tl.load(x_ptr + ptrs, mask=mask, other=0.0), smooth_ptr, offs_k, K, HAS_SMOOTH)
            v = v * rscale[:, None]
            tl.store(q_ptr + ptrs, round_to_int8(v, -127.0) if CODES == _INT8 else to_e4m3(v), mask=mask)


@triton.jit
def _smoothed(x, smooth_ptr, offs_k, K, HAS_SMOOTH: tl.constexpr):
    xs = x.to(tl.float32)
    if HAS_SMOOTH:
        xs = xs * reciprocal(tl.load(smooth_ptr + offs_k, mask=offs_k < K, other=1.0).to(tl.float32))[None, :]
    return xs


def _row_quant(x, smooth, proj_down, codes, what):
    """(q, scales, lr) of one launch; q and scales None for NONE, lr None without proj_down."""
    m, k = x.shape
    x = x.contiguous()
    dtype = {NONE: None, INT8: torch.int8, E4M3: torch.float8_e4m3fn}[codes]
    q = None if dtype is None else torch.empty(m, k, dtype=dtype, device=x.device)
    s = None if dtype is None else torch.empty(m, dtype=torch.float32, device=x.device)
    block_r = rank_block(proj_down, what)
    r = 0 if proj_down is None else proj_down.shape[1]
    lr = None if proj_down is None else torch.empty(m, r, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s, lr
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)
    launch("act_fp8" if codes == E4M3 else "act_int8", _row_quant_kernel, grid, x.device,
           dict(K=k, R=r, M=m_bucket(m), **({"CODES": codes} if codes != E4M3 else {})),
           x, x if smooth is None else smooth.contiguous(), x if proj_down is None else proj_down.contiguous(),
           x if q is None else q, x if s is None else s, x if lr is None else lr, m, k, r, m_bucket(m),
           CODES=codes, HAS_SMOOTH=smooth is not None, HAS_LR=proj_down is not None, BLOCK_R=block_r)
    return q, s, lr


def quantize_act_int8(x, proj_down=None, smooth=None):
    """See reference.quantize_act_int8; the down projection is computed in the same pass."""
    return _row_quant(x, smooth, proj_down, INT8, "quantize_act_int8")


def quantize_act_fp8(x, smooth=None, proj_down=None):
    """See reference.quantize_act_fp8; the down projection is computed in the same pass."""
    return _row_quant(x, smooth, proj_down, E4M3, "quantize_act_fp8")


def lora_down(x, proj_down):
    """See reference.lora_down."""
    return None if proj_down is None else _row_quant(x, None, proj_down, NONE, "lora_down")[2]
