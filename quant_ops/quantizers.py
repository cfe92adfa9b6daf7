"""Quantizers: float weights -> packed formats (SVDQuant W4A4, W4A16, ternary + low-rank)."""
import math

import torch
import torch.nn.functional as F

from ..kernels import reference as ref
from .actfit import ACT_FIT_STEPS
from .datafit import DAMP, TERNARY_DAMP, svd_lowrank
from .formats import GROUP_SIZE, TernaryWeights, W4A4Weights, W4A16Weights

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)
DEFAULT_ALPHAS = tuple(i / 8 for i in range(9))
TERNARY_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
CALIB_ITERS, CALIB_SEARCH_ITERS = 5, 2  # branch/residual alternations of the calibrated svdq_w4a4 (at most)
CALIB_TERNARY_ITERS = 4


def quantize_int4_groups(w: torch.Tensor, group_size: int, dtype: torch.dtype, clip_ratios=CLIP_RATIOS):
    """Symmetric int4 per group along K with a per-group clip search (MSE; the first ratio wins a tie).

    Returns q int8 (N, K) in [-8, 7] and scales (K/group, N) in `dtype`.
    """
    n, k = w.shape
    wg = w.float().reshape(n, k // group_size, group_size)
    absmax = wg.abs().amax(dim=-1)
    best_err = best_s = None
    for r in clip_ratios:
        s = (absmax * (r / 7.0)).to(dtype).float()
        err = _round_groups(wg, s).mul_(s.unsqueeze(-1)).sub_(wg).square_().sum(dim=-1)
        if best_err is None:
            best_err, best_s = err, s
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
    # the codes of the chosen scales, rounded once more (the search keeps only errors: one full-size tensor per ratio)
    return _round_groups(wg, best_s).reshape(n, k).to(torch.int8), best_s.t().contiguous().to(dtype)


def _round_groups(wg: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """round(w / s) clamped to int4, as float32 (N, K/group, group); a zero scale divides by one."""
    safe = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-1)
    return torch.round(wg / safe).clamp_(-8, 7)


def _check_linear(weight: torch.Tensor, multiple: int, fmt: str, rank: int = 0):
    if weight.dim() != 2:
        raise ValueError(f"{fmt}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if n == 0 or k == 0:
        raise ValueError(f"{fmt}: weight is empty (shape {tuple(weight.shape)}); out_features and in_features must be > 0")
    if not weight.is_floating_point():
        raise ValueError(f"{fmt}: weight dtype must be floating point (float32, bfloat16, float16 or float8), got {weight.dtype}")
    if k % multiple:
        raise ValueError(f"{fmt}: in_features (K) is {k}, must be a multiple of {multiple}")
    if rank < 0 or rank > min(n, k):
        raise ValueError(f"{fmt}: rank is {rank}, must be between 0 and min(out_features, in_features) = {min(n, k)}")


def _absmax_vector(act_absmax, k, device, fmt):
    a = act_absmax.to(device).float().reshape(-1)
    if a.numel() != k:
        raise ValueError(f"{fmt}: act_absmax has {a.numel()} channels, expected in_features = {k}")
    return a


def _calib_matrix(calib_inputs, k, device, fmt):
    if not isinstance(calib_inputs, torch.Tensor) or calib_inputs.dim() < 2 or calib_inputs.shape[-1] != k:
        got = tuple(calib_inputs.shape) if isinstance(calib_inputs, torch.Tensor) else type(calib_inputs).__name__
        raise ValueError(f"{fmt}: calib_inputs must be a (tokens, {k}) tensor of the layer's inputs, got {got}")
    x = calib_inputs.to(device).float().reshape(-1, k)
    if x.shape[0] == 0 or not torch.isfinite(x).all():
        raise ValueError(f"{fmt}: calib_inputs must hold at least one token and only finite values")
    return x


def _synthetic_inputs(act_absmax: torch.Tensor, samples: int = 256, unsigned: bool = False) -> torch.Tensor:
    """Stand-in calibration inputs whose per-channel absmax follows `act_absmax` (seeded)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(samples, act_absmax.numel(), generator=g).to(act_absmax.device)
    x = (x / 3.0).clamp_(-1, 1) * act_absmax.float()
    return F.gelu(x) if unsigned else x


def _w4a4_forward(x, packed: W4A4Weights) -> torch.Tensor:
    q, s, lr = ref.quantize_act_int4(x, packed.smooth, packed.proj_down, unsigned=packed.act_unsigned)
    return ref.w4a4_gemm(q, s, packed.weight, packed.wscales, lr, packed.proj_up, packed.bias, out_dtype=torch.float32)


def _svdq_decompose(w, bias, smooth, rank, dtype, iters, act_unsigned, x=None):
    """Low-rank + int4 residual of the smoothed weight, refined L <- SVD_r(W_hat - Q(W_hat - L)).

    Scores each iterate by output error on `x` when given (weight error otherwise); stops when it grows.
    """
    lam = smooth.float()
    w_hat = w * lam
    target = None if x is None else x @ w.t() + (0 if bias is None else bias.float())
    best, best_err = None, math.inf
    lowrank_src = w_hat
    for _ in range(max(1, iters)):
        if rank:
            up, down = svd_lowrank(lowrank_src, rank)
            up, down = up.to(dtype), (down / lam.unsqueeze(1)).to(dtype)
            l_hat = up.float() @ (down.float() * lam.unsqueeze(1)).t()
        else:
            up = down = None
            l_hat = torch.zeros_like(w_hat)
        q, scales = quantize_int4_groups(w_hat - l_hat, GROUP_SIZE, dtype)
        r_hat = (q.float().view(q.shape[0], -1, GROUP_SIZE) * scales.float().t().unsqueeze(-1)).view(q.shape)
        b = None if bias is None else bias.float()
        if act_unsigned:
            comp = ref.ACT_SHIFT * (r_hat / lam).sum(dim=1)
            b = -comp if b is None else b - comp
        packed = W4A4Weights.pack(q, scales, smooth, down, up, None if b is None else b.to(dtype), act_unsigned)
        if target is None:
            err = torch.linalg.vector_norm(w_hat - l_hat - r_hat).item()
        else:
            err = torch.linalg.vector_norm(_w4a4_forward(x, packed) - target).item()
        if err >= best_err:
            break
        best, best_err = packed, err
        if not rank:
            break
        lowrank_src = w_hat - r_hat
    return best, best_err


def svdquant(weight, bias=None, rank=32, act_absmax=None, calib_inputs=None, act_unsigned=False,
             dtype=torch.bfloat16, iters=20, search_iters=3, alphas=DEFAULT_ALPHAS, max_smooth=1e4,
             gptq=True, whiten=True, damp=DAMP, act_fit=None) -> W4A4Weights:
    """SVDQuant of one linear. With `act_absmax` (per input channel), grid-search the migration strength
    alpha of lambda = a^alpha / w^(1 - alpha) by the quantized layer's output error (low-rank inside).

    With `calib_inputs` (tokens x K, a sample of the layer's inputs) and gptq or whiten on, the calibrated
    quantizer (quant_ops/calibrated.py): whiten fits the branch to the activation-weighted error, gptq rounds
    the residual with error compensation; damp: GPTQ damping of the inputs' second moment; act_fit: steps of
    training the smoothing vector and branch against the output error with int4 activations simulated (default
    quant_ops.actfit.ACT_FIT_STEPS, 0 for none)."""
    _check_linear(weight, GROUP_SIZE, "svdq_w4a4", rank)
    w = weight.float()
    k = w.shape[1]
    device = w.device
    if act_fit is None:
        act_fit = ACT_FIT_STEPS
    if act_fit < 0:
        raise ValueError(f"svdq_w4a4: act_fit is {act_fit}, must be >= 0 (steps)")
    if calib_inputs is not None and (gptq or whiten or act_fit):
        from . import calibrated

        x = _calib_matrix(calib_inputs, k, device, "svdq_w4a4")
        a = None if act_absmax is None else _absmax_vector(act_absmax, k, device, "svdq_w4a4")
        return calibrated.svdquant(w, bias, rank, x, a, act_unsigned, dtype, min(iters, CALIB_ITERS),
                                   min(search_iters, CALIB_SEARCH_ITERS), alphas, max_smooth, gptq, whiten, damp,
                                   act_fit)
    if act_absmax is None:
        smooth = torch.ones(k, dtype=dtype, device=device)
        return _svdq_decompose(w, bias, smooth, rank, dtype, iters, act_unsigned)[0]
    a = _absmax_vector(act_absmax, k, device, "svdq_w4a4").clamp_min(1e-5)
    x = _calib_matrix(calib_inputs, k, device, "svdq_w4a4") if calib_inputs is not None else _synthetic_inputs(a, unsigned=act_unsigned)
    w_abs = w.abs().amax(dim=0).clamp_min(1e-5)
    best_alpha, best_err = None, math.inf
    for alpha in alphas:
        lam = _smooth_vector(a, w_abs, alpha, max_smooth, dtype)
        _, err = _svdq_decompose(w, bias, lam, rank, dtype, search_iters, act_unsigned, x)
        if err < best_err:
            best_alpha, best_err = alpha, err
    lam = _smooth_vector(a, w_abs, best_alpha, max_smooth, dtype)
    return _svdq_decompose(w, bias, lam, rank, dtype, iters, act_unsigned, x)[0]


def _smooth_vector(a, w_abs, alpha, max_smooth, dtype):
    lam = a.pow(alpha) / w_abs.pow(1 - alpha)
    lam = lam / torch.sqrt(lam.max() * lam.min())  # centre the range around 1
    return lam.clamp(1 / max_smooth, max_smooth).to(dtype)


def w4a16(weight, bias=None, group_size=64, dtype=torch.bfloat16) -> W4A16Weights:
    if group_size not in (64, 128):
        raise ValueError(f"w4a16: group_size is {group_size}, must be 64 or 128")
    _check_linear(weight, group_size, "w4a16")
    q, scales = quantize_int4_groups(weight.float(), group_size, dtype)
    return W4A16Weights.pack(q, scales, None, None if bias is None else bias.to(dtype))


def ternarize(w: torch.Tensor, thresholds=TERNARY_THRESHOLDS):
    """Per output channel: T = sign(w) where |w| > theta * mean|w|, scale = <w, T> / <T, T>;
    theta chosen per channel from `thresholds` by squared error (the first one wins a tie). Returns (T int8 (N, K),
    scale f32 (N,))."""
    w_abs, sign = w.abs(), torch.sign(w)
    mean_abs = w_abs.mean(dim=1, keepdim=True)
    best_err = best_cut = best_s = None
    for theta in thresholds:
        cut = theta * mean_abs
        keep = w_abs > cut
        t = torch.where(keep, sign, 0.0)
        s = (w * t).sum(dim=1) / keep.sum(dim=1).clamp_min(1)  # <T, T>: the count, exact
        err = t.mul_(s.unsqueeze(1)).neg_().add_(w).square_().sum(dim=1)  # sum((w - T s)^2)
        if best_err is None:
            best_err, best_cut, best_s = err, cut, s
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_cut = torch.where(better.unsqueeze(1), cut, best_cut)
    # the codes of the chosen thresholds, made once more (the search keeps only errors: one full-size tensor each)
    return torch.where(w_abs > best_cut, sign, 0.0).to(torch.int8), best_s


def ternary(weight, bias=None, rank=64, act_absmax=None, act_int8=False, dtype=torch.bfloat16, iters=20,
            calib_inputs=None, gptq=True, whiten=True, fit_scales=True, damp=TERNARY_DAMP) -> TernaryWeights:
    """Ternary weights + an optional rank-r low-rank branch fitted to the residual, refined iteratively:
    L <- SVD_r(W - ternary(W - L)), stopping when the (activation-weighted) error grows.

    With `calib_inputs` (tokens x K) and any of gptq / whiten / fit_scales on, the calibrated quantizer
    (quant_ops/calibrated.py): GPTQ rounding of the codes, branch and row scales fitted to the
    activation-weighted error."""
    _check_linear(weight, GROUP_SIZE, "ternary", rank)
    w = weight.float()
    if calib_inputs is not None and (gptq or whiten or fit_scales):
        from . import calibrated

        x = _calib_matrix(calib_inputs, w.shape[1], w.device, "ternary")
        a = None if act_absmax is None else _absmax_vector(act_absmax, w.shape[1], w.device, "ternary")
        return calibrated.ternary(w, bias, rank, x, a, act_int8, dtype, min(iters, CALIB_TERNARY_ITERS), gptq, whiten,
                                  fit_scales, damp)
    # activation-aware weighting of the low-rank fit: channels with large inputs matter more
    d = torch.ones(w.shape[1], device=w.device)
    if act_absmax is not None:
        a = _absmax_vector(act_absmax, w.shape[1], w.device, "ternary").clamp_min(1e-5)
        d = (a / a.mean()).sqrt().clamp(1e-2, 1e2)
    b = None if bias is None else bias.to(dtype)
    up = down = None
    l_eff = torch.zeros_like(w)
    best, best_err = None, math.inf
    for _ in range(max(1, iters) if rank else 1):
        t, s = ternarize(w - l_eff)
        s16 = s.to(dtype)
        resid = w - t.float() * s16.float().unsqueeze(1)
        if rank:
            up, down = svd_lowrank(resid * d, rank)
            up, down = up.to(dtype), (down / d.unsqueeze(1)).to(dtype)
            l_new = up.float() @ down.float().t()
        else:
            l_new = torch.zeros_like(w)
        err = torch.linalg.vector_norm((resid - l_new) * d).item()
        if err >= best_err:
            break
        best, best_err = TernaryWeights.pack(t, s16, down, up, b, act_int8), err
        l_eff = l_new
    return best
