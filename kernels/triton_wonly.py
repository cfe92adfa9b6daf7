"""Weight-only kernels with 16-bit activations: W4A16 (int4 groups, scales [+ zeros]) and ternary.

Fused path: computed transposed, out^T = W x^T. Each program loads its weight rows as 16-byte words along K
(cp.async), decodes them in registers straight into the dot's left operand (triton_decode *_tile, fragment
order, no int -> float conversion) and reads the activations, in the same permuted K order, from shared
memory as the right operand; W4A16 rounds q * s (+ z) to the compute dtype as reference.dequant_int4, ternary
applies the per-channel scale after the dot, then the low-rank branch and bias, and the output is written in
its dtype. Few tokens (M <= 64, memory-bound): 16- to 64-token tiles, K split across programs only where the
weight has too few row blocks to fill the GPU, the last program of a tile summing the float32 partials in
split order (triton_splitk.py): one launch. Dequant path (many tokens): a Triton kernel writes the layer's
16-bit weight (a per-call temporary) and the vendor GEMM multiplies; which path runs per GPU, shape and
token count is in wonly_path(). The temporary is one layer's weight, freed after the call (PyTorch's caching
allocator keeps the block for the next layer): N x (K + 2 rank) x 2 bytes, 132 MB at FLUX's largest layer
(linear1, 21504 x 3072), 84 MB at T5-XXL's feed-forward (10240 x 4096). The low-rank branch rides along as
2 rank extra K columns: the float32 lr as its two 16-bit halves (reference.split16), proj_up twice.
"""
import torch
import triton
import triton.language as tl

from .triton_common import (INTERPRET, _UPCAST, check_rank, configs, dot16, lowrank_bias_t, m_bucket, prune_by_m,
                            sm_count, store_tile_t, swizzle)
from .reference import split16
from .triton_decode import dot_k_order, int4_tile, load_words, ternary_tile
from .triton_splitk import reset_arrivals, split_total, tile_counters
from .tuning import launch, lookup

SMALL_M = 64


def _configs(rows, group_m):
    return [{"BLOCK_N": bn, "BLOCK_M": bm, "KB": kb, "GROUP_M": group_m, "num_warps": w, "num_stages": s}
            for bn, bm, kb, w, s in rows]


# per format and token regime: BLOCK_N weight rows (the dot's M, 64 per warp group), BLOCK_M tokens (the dot's N),
# KB packed bytes per row per step (64: 16 per lane), warps, stages. None spills (tests/ir_cases.py).
CONFIGS = {
    "w4a16": {"small": _configs([(128, 16, 64, 4, 4), (128, 16, 32, 4, 6), (128, 32, 64, 4, 4), (128, 64, 32, 4, 3)],
                                1),
              "large": _configs([(128, 128, 32, 8, 3), (128, 128, 32, 8, 4), (128, 64, 32, 4, 4)], 8)},
    "ternary": {"small": _configs([(128, 16, 64, 4, 4), (128, 16, 64, 4, 6), (128, 32, 32, 4, 4), (128, 64, 32, 4, 3)],
                                  1),
                "large": _configs([(128, 128, 32, 8, 3), (128, 128, 32, 8, 4), (128, 64, 32, 4, 4)], 8)},
}
DEQUANT_CONFIG = {"BLOCK_N": 32, "KB": 64, "num_warps": 4, "num_stages": 1}
_INTERP = {"BLOCK_N": 32, "BLOCK_M": 16, "KB": 64, "GROUP_M": 4}
SPLIT_BLOCK_N = 64  # the row block k_splits counts with


@triton.jit
def _wonly_kernel(x_ptr, w_ptr, ws_ptr, wz_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                  M, N, K, R, M_KEY, W_ROW, NSPLIT,
                  TERNARY: tl.constexpr, HAS_Z: tl.constexpr, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr,
                  GS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                  KB: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    """W_ROW: packed int32 words per weight row. NSPLIT: programs along K per output tile. EVEN_K: K is a
    multiple of the K step (no mask along K)."""
    pid_m, pid_n = swizzle(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cdt: tl.constexpr = ws_ptr.dtype.element_ty  # x arrives in it (converted on the host like reference's x.to(cdt))
    PER_BYTE: tl.constexpr = 4 if TERNARY else 2
    BLOCK_K: tl.constexpr = KB * PER_BYTE
    NG: tl.constexpr = BLOCK_K // GS if BLOCK_K > GS and not TERNARY else 1  # W4A16 groups per K step
    k_order = dot_k_order(BLOCK_K, 2)
    steps = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(steps, NSPLIT)
    first = pid_s * per
    # W4A16 scales (and zeros) are prefetched a step ahead: 2-byte loads cannot be async copies
    s_next, z_next = _group_scales(ws_ptr, wz_ptr, first * BLOCK_K, offs_n, N, K, TERNARY, HAS_Z, GS, NG)
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for step in range(first, tl.minimum(first + per, steps)):
        k0 = step * BLOCK_K
        offs_k = k0 + k_order
        x = tl.load(x_ptr + offs_m[None, :] * K + offs_k[:, None],
                    mask=(offs_m[None, :] < M) & ((offs_k[:, None] < K) | EVEN_K), other=0.0)
        words = load_words(w_ptr, offs_n, step * (KB // 4), W_ROW, N, KB // 4)
        if TERNARY:
            w = ternary_tile(words, cdt, True, _UPCAST)
        else:
            s, z = s_next, z_next
            s_next, z_next = _group_scales(ws_ptr, wz_ptr, k0 + BLOCK_K, offs_n, N, K, TERNARY, HAS_Z, GS, NG)
            w = int4_tile(words, s, z, cdt, HAS_Z, True, _UPCAST)
        acc = dot16(w, x, acc)
    if NSPLIT == 1:
        _epilogue(acc, ws_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, R, TERNARY, HAS_LR, HAS_BIAS,
                  BLOCK_R)
    else:
        tile = pid_m * tl.cdiv(N, BLOCK_N) + pid_n
        last, acc = split_total(acc, part_ptr, cnt_ptr, pid_s, tile, offs_m, offs_n, M, N, NSPLIT)
        if last:
            _epilogue(acc, ws_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, R, TERNARY, HAS_LR,
                      HAS_BIAS, BLOCK_R)
            reset_arrivals(cnt_ptr, tile)


@triton.jit
def _group_scales(ws_ptr, wz_ptr, k0, offs_n, N, K, TERNARY: tl.constexpr, HAS_Z: tl.constexpr, GS: tl.constexpr,
                  NG: tl.constexpr):
    """(BLOCK_N, NG) W4A16 scales and zeros (scales again without zeros) of the NG groups from k = k0 on; 0 past K.
    Ternary: placeholders (its scale is per channel, applied after the dot)."""
    if TERNARY:
        s = tl.zeros((offs_n.shape[0], NG), ws_ptr.dtype.element_ty)
        z = s
    else:
        s = _scale_cols(ws_ptr, k0 // GS, offs_n, N, K // GS, NG)
        z = _scale_cols(wz_ptr, k0 // GS, offs_n, N, K // GS, NG) if HAS_Z else s
    return s, z


@triton.jit
def _scale_cols(ptr, g, offs_n, N, G, NG: tl.constexpr):
    """Rows g .. g + NG of a (G, N) matrix at columns offs_n, as (BLOCK_N, NG); 0 past G."""
    offs_g = g + tl.arange(0, NG)
    return tl.load(ptr + offs_g[None, :] * N + offs_n[:, None], mask=(offs_n[:, None] < N) & (offs_g[None, :] < G),
                   other=0.0)


@triton.jit
def _epilogue(acc, ws_ptr, lr_ptr, up_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, R, TERNARY: tl.constexpr,
              HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr):
    if TERNARY:
        acc = acc * tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    acc = lowrank_bias_t(acc, lr_ptr, up_ptr, bias_ptr, offs_m, offs_n, M, N, R, HAS_LR, HAS_BIAS, BLOCK_R)
    store_tile_t(out_ptr, acc, offs_m, offs_n, M, N)


_KEY = ["M_KEY", "N", "K", "R", "NSPLIT", "TERNARY", "HAS_Z", "GS"]
_EVEN_K = triton.heuristics({"EVEN_K": lambda a: a["K"] % (a["KB"] * (4 if a["TERNARY"] else 2)) == 0})
_TUNED = {(fmt, size): triton.autotune(configs(cfgs, _INTERP), key=_KEY,
                                       prune_configs_by={"early_config_prune": prune_by_m})(_EVEN_K(_wonly_kernel))
          for fmt, by_size in CONFIGS.items() for size, cfgs in by_size.items()}


def k_splits(m: int, n: int, steps: int, device) -> int:
    """Programs along K per output tile: 1 unless few tokens and few row blocks; then about two waves of
    (64-row, token block) tiles, >= 4 K steps each."""
    if m > SMALL_M:
        return 1
    tiles = triton.cdiv(n, SPLIT_BLOCK_N) * triton.cdiv(m, 64)
    want = triton.cdiv(2 * sm_count(device), tiles)
    s = max(1, min(want, steps // 4))
    return triton.cdiv(steps, triton.cdiv(steps, s))  # no empty split


def _fused(x, qweight, wscales, wzeros, lr, proj_up, bias, out_dtype, ternary, gs):
    m, k = x.shape
    n = qweight.shape[0]
    r = 0 if lr is None else lr.shape[1]
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    fmt, size = "ternary" if ternary else "w4a16", "small" if m <= SMALL_M else "large"
    kb = _INTERP["KB"] if INTERPRET else max(c["KB"] for c in CONFIGS[fmt][size])
    nsplit = k_splits(m, n, triton.cdiv(k, kb * (4 if ternary else 2)), x.device)
    part = cnt = out
    if nsplit > 1:
        part = torch.empty(nsplit, m, n, dtype=torch.float32, device=x.device)
        cnt = tile_counters(x.device, triton.cdiv(m, 16) * triton.cdiv(n, 32))
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), nsplit)
    launch(fmt, _TUNED[fmt, size], grid, x.device, table_fields(fmt, n, k, m, gs, wzeros is not None, r),
               x, qweight, wscales, out if wzeros is None else wzeros, out if lr is None else lr,
               out if proj_up is None else proj_up, out if bias is None else bias, out, part, cnt,
               m, n, k, r, m_bucket(m), qweight.shape[1] // 4, nsplit, TERNARY=ternary, HAS_Z=wzeros is not None,
               HAS_LR=lr is not None, HAS_BIAS=bias is not None, GS=gs, BLOCK_R=32 if r % 32 == 0 else 16)
    return out


@triton.jit
def _dequant_kernel(w_ptr, ws_ptr, wz_ptr, up_ptr, out_ptr, N, K, R, W_ROW, OUT_ROW,
                    TERNARY: tl.constexpr, HAS_Z: tl.constexpr, HAS_UP: tl.constexpr, GS: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, KB: tl.constexpr):
    """out[:, :K] = the 16-bit weight (W4A16: q * s (+ z); ternary: t * scale, exact); out[:, K:K+R] and
    out[:, K+R:K+2R] = proj_up."""
    pid_n, step = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cdt: tl.constexpr = ws_ptr.dtype.element_ty
    BLOCK_K: tl.constexpr = KB * (4 if TERNARY else 2)
    words = load_words(w_ptr, offs_n, step * (KB // 4), W_ROW, N, KB // 4)
    if TERNARY:
        t = ternary_tile(words, cdt, False, _UPCAST)
        s = tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0)
        w = (t.to(tl.float32) * s.to(tl.float32)[:, None]).to(cdt)  # exact: +-s or 0
    else:
        NG: tl.constexpr = BLOCK_K // GS if BLOCK_K > GS else 1
        s, z = _group_scales(ws_ptr, wz_ptr, step * BLOCK_K, offs_n, N, K, TERNARY, HAS_Z, GS, NG)
        w = int4_tile(words, s, z, cdt, HAS_Z, False, _UPCAST)
    offs_k = step * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None] * OUT_ROW + offs_k[None, :], w,
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))
    if HAS_UP:
        if step == 0:
            offs_r = tl.arange(0, BLOCK_R)
            mask = (offs_n[:, None] < N) & (offs_r[None, :] < R)
            up = tl.load(up_ptr + offs_n[:, None] * R + offs_r[None, :], mask=mask)
            tl.store(out_ptr + offs_n[:, None] * OUT_ROW + K + offs_r[None, :], up, mask=mask)
            tl.store(out_ptr + offs_n[:, None] * OUT_ROW + K + R + offs_r[None, :], up, mask=mask)


def dequantize(qweight, wscales, wzeros=None, proj_up=None, ternary=False):
    """The layer's weight in its compute dtype, (N, K), with proj_up appended twice as (N, K + 2r) columns if
    given: reference.dequant_int4 (W4A16) or unpack_ternary(W) * wscales (ternary), exact."""
    qweight = _aligned(qweight)
    n = qweight.shape[0]
    k = qweight.shape[1] * (4 if ternary else 2)
    r = 0 if proj_up is None else proj_up.shape[1]
    gs = 64 if ternary else k // wscales.shape[0]
    out = torch.empty(n, k + 2 * r, dtype=wscales.dtype, device=qweight.device)
    c = DEQUANT_CONFIG
    grid = (triton.cdiv(n, c["BLOCK_N"]), triton.cdiv(k, c["KB"] * (4 if ternary else 2)))
    _dequant_kernel[grid](qweight, wscales, out if wzeros is None else wzeros, out if proj_up is None else proj_up,
                          out, n, k, r, qweight.shape[1] // 4, k + 2 * r, TERNARY=ternary, HAS_Z=wzeros is not None,
                          HAS_UP=proj_up is not None, GS=gs, BLOCK_R=max(16, triton.next_power_of_2(r)), **c)
    return out


def _dequant_gemm(x, qweight, wscales, wzeros, lr, proj_up, bias, ternary):
    """x @ W^T (+ lr @ proj_up^T) + bias through the vendor GEMM on the dequantized weight: float32 accumulation,
    one rounding (the branch rides along as 2r extra K columns: [x | hi | lo] @ [W | up | up]^T)."""
    w = dequantize(qweight, wscales, wzeros, proj_up, ternary)
    a = x if lr is None else torch.cat([x, *split16(lr, x.dtype)], dim=1)
    return a @ w.t() if bias is None else torch.addmm(bias, a, w.t())


def table_fields(fmt: str, n: int, k: int, m: int, gs: int, zeros: bool, r: int) -> dict:
    """The key of a layer's entries in the tuned table (tuning.py): shape, group size / rank and token bucket."""
    if fmt == "w4a16":
        return dict(N=n, K=k, G=gs, Z=int(zeros), M=m_bucket(m))
    return dict(N=n, K=k, R=r, M=m_bucket(m))


def wonly_path(fmt: str, fields: dict, device) -> str:
    """'fused' or 'dequant' for a layer: the tuned table's '<fmt>_path' entry for this GPU, shape and token bucket
    (tune.py times both); without one, fused up to 512 tokens and on non-CUDA devices, dequant + vendor GEMM above
    (there the GEMM's speed outweighs writing and reading the 16-bit weight once per call)."""
    entry = lookup(f"{fmt}_path", device, **fields)
    if entry is not None:
        return entry["path"]
    return "fused" if fields["M"] <= 512 or torch.device(device).type != "cuda" else "dequant"


def _aligned(t):
    """Contiguous, and 16-byte aligned (the kernels read the packed weight as int32 words, 4 per load)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _launch(x, qweight, wscales, wzeros, lr, proj_up, bias, out_dtype, ternary, gs, what):
    lr, proj_up = check_rank(lr, proj_up, what)
    m, k = x.shape
    n = qweight.shape[0]
    cdt = wscales.dtype
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=out_dtype, device=x.device)
    x = x.to(cdt).contiguous()
    qweight, wscales = _aligned(qweight), wscales.contiguous()
    wzeros = None if wzeros is None else wzeros.contiguous()
    bias = None if bias is None else bias.contiguous()
    fmt = "ternary" if ternary else "w4a16"
    fields = table_fields(fmt, n, k, m, gs, wzeros is not None, 0 if lr is None else lr.shape[1])
    if out_dtype == cdt and wonly_path(fmt, fields, x.device) == "dequant":
        return _dequant_gemm(x, qweight, wscales, wzeros, lr, proj_up, None if bias is None else bias.to(cdt), ternary)
    return _fused(x, qweight, wscales, wzeros, lr, proj_up, bias, out_dtype, ternary, gs)


def w4a16_gemm(x, qweight, wscales, wzeros=None, bias=None, out_dtype=None, lr=None, proj_up=None):
    """See reference.w4a16_gemm (group size K / wscales.shape[0]: a power of two >= 64)."""
    k = x.shape[1]
    gs = k // wscales.shape[0]
    if qweight.shape[1] * 2 != k or gs * wscales.shape[0] != k or gs < 64 or gs & (gs - 1):
        raise ValueError(f"w4a16_gemm: shapes x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
                         f"wscales {tuple(wscales.shape)} do not match (group size must be a power of two >= 64)")
    return _launch(x, qweight, wscales, wzeros, lr, proj_up, bias, out_dtype or x.dtype, False, gs, "w4a16_gemm")


def ternary_gemm(x, qweight, wscales, lr=None, proj_up=None, bias=None, out_dtype=None):
    """See reference.ternary_gemm."""
    if qweight.shape[1] * 4 != x.shape[1]:
        raise ValueError(f"ternary_gemm: x {tuple(x.shape)} does not match qweight {tuple(qweight.shape)} "
                         "(K/4 bytes per row)")
    return _launch(x, qweight, wscales, None, lr, proj_up, bias, out_dtype or x.dtype, True, 64, "ternary_gemm")
