"""svdq_w4a4 and ternary fitted to a sample of the layer's inputs: the low-rank branch and the ternary scales
minimise the activation-weighted error, the rounding compensates its error (GPTQ)."""
import math

import torch

from ..kernels import reference as ref
from . import quantizers as qz
from .actfit import ACT_FIT_STEPS, fit_smooth_branch, noise_power
from .datafit import DAMP, Whitener, gptq_int4_groups, gptq_ternary, second_moment, svd_lowrank, weighted_row_scales
from .formats import GROUP_SIZE, TernaryWeights, W4A4Weights

GPTQ_ROUNDS = 2  # GPTQ residual, then refit the branch to what GPTQ left; twice


def _expand(scales):
    return scales.float().t().repeat_interleave(GROUP_SIZE, dim=1)


def _pack_w4a4(q, scales, lam16, up, down, bias, dtype, act_unsigned):
    """up (N, r), down (K, r) float32 in the smoothed space; stored down reads the raw input (down / lambda)."""
    lam = lam16.float()
    b = None if bias is None else bias.float()
    if act_unsigned:
        comp = ref.ACT_SHIFT * (q.float() * _expand(scales) / lam).sum(dim=1)
        b = -comp if b is None else b - comp
    d16 = None if down is None else (down / lam.unsqueeze(1)).to(dtype)
    u16 = None if up is None else up.to(dtype)
    return W4A4Weights.pack(q, scales, lam16, d16, u16, None if b is None else b.to(dtype), act_unsigned)


class _W4A4Fit:
    """One smoothing vector: branch fits, residual roundings and output-error scores on the sample x."""

    def __init__(self, w, bias, lam16, rank, dtype, act_unsigned, x, h_raw, whiten):
        self.w, self.bias, self.lam16, self.rank, self.dtype, self.unsigned = w, bias, lam16, rank, dtype, act_unsigned
        lam = lam16.float()
        self.lam = lam
        self.w_hat = w * lam
        self.h = h_raw / lam.unsqueeze(0) / lam.unsqueeze(1)  # second moment of x / lambda
        self.wh = Whitener(self.h) if whiten else None
        self.h_round = self.h  # the second moment GPTQ rounds against
        self.x = x
        self.target = x @ w.t() + (0 if bias is None else bias.float())
        self.best, self.best_err = None, math.inf

    def branch(self, m):
        """(up, down) fitted to m in the smoothed space, and the branch as stored (16-bit) in that space."""
        if not self.rank:
            return None, None, torch.zeros_like(m)
        up, down = self.wh.lowrank(m, self.rank) if self.wh is not None else svd_lowrank(m, self.rank)
        return up, down, self.stored(up, down)

    def stored(self, up, down):
        if up is None:
            return torch.zeros_like(self.w_hat)
        lam = self.lam.unsqueeze(1)
        return up.to(self.dtype).float() @ ((down / lam).to(self.dtype).float() * lam).t()

    def score(self, q, scales, up, down) -> float:
        packed = _pack_w4a4(q, scales, self.lam16, up, down, self.bias, self.dtype, self.unsigned)
        err = torch.linalg.vector_norm(qz._w4a4_forward(self.x, packed) - self.target).item()
        if err < self.best_err:
            self.best, self.best_err, self.best_branch = packed, err, (up, down)
        return err

    def alternate(self, iters):
        """L <- fit(W_hat - RTN(W_hat - L)), keeping the best iterate; stops when the output error grows."""
        up, down, l16 = self.branch(self.w_hat)
        prev = math.inf
        for _ in range(max(1, iters)):
            q, s = qz.quantize_int4_groups(self.w_hat - l16, GROUP_SIZE, self.dtype)
            err = self.score(q, s, up, down)
            if err >= prev or not self.rank:
                break
            prev = err
            up, down, l16 = self.branch(self.w_hat - q.float() * _expand(s))

    def gptq(self, rounds=GPTQ_ROUNDS):
        up, down = self.best_branch
        for _ in range(rounds):
            q, s = gptq_int4_groups(self.w_hat - self.stored(up, down), self.h_round, self._group_scales)
            self.score(q, s, up, down)
            if not self.rank:
                break
            up, down, _ = self.branch(self.w_hat - q.float() * _expand(s))
            self.score(q, s, up, down)

    def _group_scales(self, cols):
        return qz.quantize_int4_groups(cols, GROUP_SIZE, self.dtype)[1][0]


def svdquant(w, bias, rank, x, act_absmax=None, act_unsigned=False, dtype=torch.bfloat16, iters=5, search_iters=2,
             alphas=qz.DEFAULT_ALPHAS, max_smooth=1e4, gptq=True, whiten=True, damp=DAMP,
             act_fit=ACT_FIT_STEPS) -> W4A4Weights:
    """Smoothing strength alpha chosen by output error on x (branch fit inside), then the branch/residual
    alternation, then (gptq) GPTQ rounding of the residual in the smoothed space with the branch refitted.
    act_fit > 0: that many steps of training lambda and the branch against the output error with the int4
    activations simulated (quant_ops/actfit.py), then GPTQ rounds again; the better result on x is kept."""
    h_raw = second_moment(x, damp)
    a = (x.abs().amax(0) if act_absmax is None else act_absmax.float()).clamp_min(1e-5)
    w_abs = w.abs().amax(dim=0).clamp_min(1e-5)
    scored = []
    for alpha in alphas:
        fit = _W4A4Fit(w, bias, qz._smooth_vector(a, w_abs, alpha, max_smooth, dtype), rank, dtype, act_unsigned,
                       x, h_raw, whiten)
        fit.alternate(search_iters)
        scored.append((fit.best_err, alpha))
    alpha = min(scored)[1]
    fit = _W4A4Fit(w, bias, qz._smooth_vector(a, w_abs, alpha, max_smooth, dtype), rank, dtype, act_unsigned,
                   x, h_raw, whiten)
    fit.alternate(iters)
    if gptq:
        fit.gptq()
    if act_fit > 0:
        fit = _act_fit(fit, w, bias, rank, x, act_unsigned, dtype, h_raw, whiten, gptq, act_fit)
    return fit.best


def _act_fit(fit, w, bias, rank, x, act_unsigned, dtype, h_raw, whiten, gptq, steps):
    up, down = fit.best_branch if rank else (None, None)
    down_raw = None if down is None else down / fit.lam.unsqueeze(1)
    lam, up, down_raw = fit_smooth_branch(w, x, fit.lam16, up, down_raw, act_unsigned, steps)
    lam16 = lam.to(dtype)
    new = _W4A4Fit(w, bias, lam16, rank, dtype, act_unsigned, x, h_raw, whiten)
    # the residual's rounding error meets the int4 activations: round against E[xq xq^T] ~ H + noise power
    new.h_round = new.h + torch.diag(noise_power(x, lam16, act_unsigned))
    down = None if down_raw is None else down_raw * new.lam.unsqueeze(1)
    l16 = new.stored(up, down)
    q, s = qz.quantize_int4_groups(new.w_hat - l16, GROUP_SIZE, dtype)
    new.score(q, s, up, down)
    if gptq:
        new.gptq(rounds=GPTQ_ROUNDS + 1)
    return new if new.best_err < fit.best_err else fit


def ternary(w, bias, rank, x, act_absmax=None, act_int8=False, dtype=torch.bfloat16, iters=4, gptq=True,
            whiten=True, fit_scales=True, damp=DAMP) -> TernaryWeights:
    """Alternate: branch L fitted to W - S T (H-weighted when whiten, else today's absmax-weighted SVD); codes
    T of W - L (GPTQ when gptq); row scales S by H-weighted least squares (fit_scales). Keeps the iterate
    with the least H-weighted error."""
    h = second_moment(x, damp)
    wh = Whitener(h)
    b16 = None if bias is None else bias.to(dtype)
    a = (x.abs().amax(0) if act_absmax is None else act_absmax.float()).clamp_min(1e-5)
    d = (a / a.mean()).sqrt().clamp(1e-2, 1e2).unsqueeze(0)  # as quantizers.ternary weights its SVD

    def branch(m):
        if not rank:
            return None, None, torch.zeros_like(m)
        if whiten:
            up, down = wh.lowrank(m, rank)
        else:
            up, down = svd_lowrank(m * d, rank)
            down = down / d.t()
        up, down = up.to(dtype), down.to(dtype)
        return up, down, up.float() @ down.float().t()

    up, down, l16 = branch(w)
    best, best_err = None, math.inf
    for _ in range(max(1, iters)):
        r = w - l16
        t, s = qz.ternarize(r)
        if gptq:
            t = gptq_ternary(r, h, s)
            if not fit_scales:
                s = (r * t).sum(1) / t.float().abs().sum(1).clamp_min(1)
        if fit_scales:
            s = weighted_row_scales(r, t, h)
        s16 = s.to(dtype)
        tern = t.float() * s16.float().unsqueeze(1)
        for cand in ((up, down, l16), branch(w - tern)):
            err = wh.error(w - tern - cand[2])
            if err < best_err:
                best, best_err = TernaryWeights.pack(t, s16, cand[1], cand[0], b16, act_int8), err
        up, down, l16 = cand
    return best
