"""SVDQuant activation kernel: per-token int4 quantization in groups fused with the low-rank down projection.

Grid (token blocks x K splits): each program reads its (BLOCK_M, group) tiles once, with 16-byte loads, writes
codes and scales and feeds the same tile to `x @ proj_down`. The down projection (float32, reference.lora_down)
is summed in LR_CHUNKS fixed chunks of K, each from zero, the chunks then added in order, whether or not K is
split: where there are few token blocks K is split across programs (on chunk boundaries), each chunk's partial
stored and summed in chunk order by the last program to arrive (triton_splitk.py). So a token's lr does not
depend on how many tokens share the call (which sets the split count). Codes stay int8, one per byte: the W4A4
GEMM keeps its only register operand for the decoded weight and takes these straight from shared memory. Scales
are stored (groups, M): the GEMM reads one contiguous row per group. Rounding is pinned as in reference.py (triton_rounding.py).
"""
import weakref

import torch
import triton
import triton.language as tl

from .reference import unsigned_from
from .triton_common import cast, configs, dot16, m_bucket, prune_by_m, rank_block, sm_count
from .triton_rounding import ACT_SHIFT_C, RCP7, RCP15, group_rscale, round_to_int8
from .triton_splitk import arrived_last, load_partial, reset_arrivals, tile_counters
from .tuning import launch

CONFIGS = [{"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}, {"BLOCK_M": 32, "num_warps": 4, "num_stages": 3},
           {"BLOCK_M": 16, "num_warps": 2, "num_stages": 4}]
MIN_GROUPS_PER_SPLIT = 4
LR_CHUNKS = 4  # chunks of K the down projection is summed in (and the most programs K is split over)
_LR_CHUNKS = tl.constexpr(LR_CHUNKS)


@triton.autotune(configs(CONFIGS, {"BLOCK_M": 16, "num_warps": 4}), key=["M_KEY", "K", "R", "NSPLIT"],
                 prune_configs_by={"early_config_prune": prune_by_m})
@triton.jit
def _act_int4_kernel(x_ptr, rsmooth_ptr, down_ptr, q_ptr, s_ptr, lr_ptr, part_ptr, cnt_ptr, M, K, R, M_KEY, U_FROM,
                     NSPLIT, HAS_SMOOTH: tl.constexpr, HAS_LR: tl.constexpr, UNSIGNED: tl.constexpr,
                     GS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    """UNSIGNED: 0 none, 1 all groups, 2 the groups from channel U_FROM on."""
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_m < M
    G = K // GS
    CG = tl.cdiv(G, _LR_CHUNKS)  # groups per chunk
    chunks = tl.cdiv(G, CG)
    per = tl.cdiv(chunks, NSPLIT)
    lr_ptrs = offs_m[:, None] * R + offs_r[None, :]
    lr_mask = row_ok[:, None] & (offs_r[None, :] < R)
    total = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for c in range(pid_s * per, tl.minimum(pid_s * per + per, chunks)):
        lacc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        for g in range(c * CG, tl.minimum(c * CG + CG, G)):
            offs_k = g * GS + tl.arange(0, GS)
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=row_ok[:, None], other=0.0)
            uns = (UNSIGNED == 1) | ((UNSIGNED == 2) & (g * GS >= U_FROM))  # shifted input, codes 0..15
            xs = x.to(tl.float32)
            if UNSIGNED != 0:
                xs = xs + tl.where(uns, ACT_SHIFT_C, 0.0)
            if HAS_SMOOTH:
                xs = xs * tl.load(rsmooth_ptr + offs_k)[None, :]
            scale, rscale = group_rscale(tl.max(tl.abs(xs), axis=1), tl.where(uns, RCP15, RCP7))
            q = round_to_int8(xs * rscale[:, None], tl.where(uns, 0.0, -8.0))
            tl.store(q_ptr + offs_m[:, None] * K + offs_k[None, :], q, mask=row_ok[:, None])
            tl.store(s_ptr + g * M + offs_m, scale, mask=row_ok)
            if HAS_LR:
                d = tl.load(down_ptr + offs_k[:, None] * R + offs_r[None, :], mask=offs_r[None, :] < R, other=0.0)
                lacc = dot16(x if x.dtype == d.dtype else cast(x.to(tl.float32), d.dtype), d, lacc)
        if HAS_LR:
            if NSPLIT == 1:
                total += lacc
            else:
                tl.store(part_ptr + c * M * R + lr_ptrs, lacc, mask=lr_mask)
    if HAS_LR:
        if NSPLIT == 1:
            tl.store(lr_ptr + lr_ptrs, total, mask=lr_mask)
        elif arrived_last(cnt_ptr, pid_m, NSPLIT):
            for c in range(0, chunks):
                total += load_partial(part_ptr + c * M * R + lr_ptrs, lr_mask)
            tl.store(lr_ptr + lr_ptrs, total, mask=lr_mask)
            reset_arrivals(cnt_ptr, pid_m)


_RSMOOTH = {}


def reciprocal_smooth(smooth):
    """reference.reciprocal(smooth), computed once per smooth tensor (a layer's buffer) and cached while it
    lives and is not modified in place."""
    key = id(smooth)
    hit = _RSMOOTH.get(key)
    if hit is not None and hit[0]() is smooth and hit[1] == smooth._version:
        return hit[2]
    rs = torch.reciprocal(smooth.float()).contiguous()
    _RSMOOTH[key] = (weakref.ref(smooth, lambda _, key=key: _RSMOOTH.pop(key, None)), smooth._version, rs)
    return rs


def lr_chunks(groups: int) -> int:
    """Chunks of K the down projection is summed in (the kernel's `chunks`)."""
    return triton.cdiv(groups, triton.cdiv(groups, LR_CHUNKS))


def k_splits(m: int, groups: int, device) -> int:
    """Programs per token block along K: enough for ~4 per SM counting 32-token blocks, each >= 4 groups, on
    chunk boundaries (at most LR_CHUNKS)."""
    want = triton.cdiv(4 * sm_count(device), triton.cdiv(m, 32))
    chunks = lr_chunks(groups)
    n = max(1, min(want, groups // MIN_GROUPS_PER_SPLIT, chunks))
    return triton.cdiv(chunks, triton.cdiv(chunks, n))  # no empty split


def quantize_act_int4(x, smooth, proj_down=None, group_size=64, unsigned=False):
    """See reference.quantize_act_int4; the down projection is computed in the same pass."""
    m, k = x.shape
    if k % group_size or group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"quantize_act_int4: K = {k} must be a multiple of group_size {group_size} (a power of two >= 16)")
    u = unsigned_from(unsigned, k, group_size)
    groups = k // group_size
    x = x.contiguous()
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(groups, m, dtype=torch.float32, device=x.device).t()  # (M, G) view, stored (G, M)
    r = 0 if proj_down is None else proj_down.shape[1]
    lr = None if proj_down is None else torch.empty(m, r, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s, lr
    nsplit = k_splits(m, groups, x.device)
    part = cnt = x
    if lr is not None and nsplit > 1:
        part = torch.empty(lr_chunks(groups), m, r, dtype=torch.float32, device=x.device)
        cnt = tile_counters(x.device, triton.cdiv(m, 16))
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), nsplit)
    launch("act_int4", _act_int4_kernel, grid, x.device, dict(K=k, R=r, M=m_bucket(m)),
           x, x if smooth is None else reciprocal_smooth(smooth), x if lr is None else proj_down.contiguous(),
           q, s, q if lr is None else lr, part, cnt, m, k, r, m_bucket(m), u, nsplit,
           HAS_SMOOTH=smooth is not None, HAS_LR=lr is not None, UNSIGNED=0 if u == k else 1 if u == 0 else 2,
           GS=group_size, BLOCK_R=rank_block(proj_down, "quantize_act_int4"))
    return q, s, lr
