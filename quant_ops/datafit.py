"""Data-aware pieces of the quantizers: the inputs' second moment, low-rank fits in the activation-weighted
norm (whitened SVD) and GPTQ-style error-compensating rounding to int4 groups or to ternary rows."""
import torch

DAMP = 0.1  # damping of the sampled second moment: H + DAMP * mean(diag H) * I (GPTQ uses 0.01 on full H)
TERNARY_DAMP = 1.0  # ternary's coarse grid makes GPTQ overfit a sampled H: measured best on MiniLM and tiny FLUX


_SVD_EXACT_MAX = 1024  # full SVD up to this min(N, K); randomized SVD above


def svd_lowrank(w: torch.Tensor, rank: int):
    """Top-`rank` factors (U sqrt(S), V sqrt(S)) of w (N, K), float32 on w's device."""
    if min(w.shape) <= _SVD_EXACT_MAX:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, v = u[:, :rank], s[:rank], vh[:rank].t()
    else:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(0)  # randomized SVD: keep results reproducible
        u, s, v = torch.svd_lowrank(w, q=min(rank + 16, min(w.shape)), niter=4)
        torch.random.set_rng_state(gen_state)
        u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    root = s.sqrt()
    return u * root, v * root


def gram_lowrank(w: torch.Tensor, rank: int):
    """svd_lowrank's factors from the eigenvectors of the smaller Gram matrix (w^T w or w w^T): exact up to float
    rounding, several times cheaper than a full SVD when rank << min(N, K)."""
    w = w.float()
    tall = w.shape[0] >= w.shape[1]
    evals, vecs = torch.linalg.eigh(w.t() @ w if tall else w @ w.t())
    vecs = vecs[:, -rank:].flip(1)  # eigh sorts ascending
    root = evals[-rank:].flip(0).clamp_min(0).sqrt().sqrt().clamp_min(1e-30)  # sqrt(singular value)
    other = (w @ vecs if tall else w.t() @ vecs) / root
    scaled = vecs * root
    return (other, scaled) if tall else (scaled, other)


def second_moment(x: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """H = x^T x / tokens (K, K) float32, damped so that it is positive definite (dead channels get 1)."""
    x = x.float()
    h = x.t() @ x / max(1, x.shape[0])
    d = h.diagonal()
    extra = damp * d.mean().clamp_min(1e-12) + (d <= 0).float()
    h.diagonal().add_(extra)
    return h


class Whitener:
    """H = C C^T, so ||E C||_F^2 = tr(E H E^T): the output error that a weight error E (N, K) causes on
    inputs with second moment H."""

    def __init__(self, h: torch.Tensor):
        self.h = h
        self.c = torch.linalg.cholesky(h)

    def error(self, e: torch.Tensor) -> float:
        return ((e @ self.h) * e).sum().clamp_min(0).sqrt().item()

    def lowrank(self, m: torch.Tensor, rank: int):
        """(up (N, r), down (K, r)) minimising ||(m - up down^T) C||_F: SVD of m C, mapped back by C^-1."""
        # runs tens of times per layer (alternation, GPTQ rounds): the Gram route unless rank is most of min(N, K)
        mc = m @ self.c
        up, v = svd_lowrank(mc, rank) if 2 * rank >= min(mc.shape) else gram_lowrank(mc, rank)
        return up, torch.linalg.solve_triangular(self.c.t(), v, upper=True)


def _hinv_rows(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (U^T U = H^-1): row j spreads column j's rounding error onward."""
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True)


def gptq(w: torch.Tensor, h: torch.Tensor, round_col, start_group=None, group_size: int = 64, block: int = 128):
    """GPTQ: round the columns of w (N, K) in order, spreading each column's error over the columns not yet
    rounded so that the output error on inputs with second moment h stays small.

    round_col(j, col) -> rounded col (N,); start_group(j, cols (N, group_size)), if given, is called when
    column j opens a group, with that group's error-updated columns (so a group's scale is chosen from the
    weights it will actually round). Returns the rounded weight (N, K) float32."""
    w = w.float().clone()
    n, k = w.shape
    u = _hinv_rows(h)
    out = torch.empty_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2]  # a view: updates land in w
        err = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if start_group is not None and j % group_size == 0:
                start_group(j, w1[:, i:i + group_size])
            q = round_col(j, w1[:, i])
            out[:, j] = q
            e = (w1[:, i] - q) / u1[i, i]
            w1[:, i + 1:] -= e.unsqueeze(1) * u1[i, i + 1:].unsqueeze(0)
            err[:, i] = e
        if i2 < k:
            w[:, i2:] -= err @ u[i1:i2, i2:]
    return out


def gptq_int4_groups(w: torch.Tensor, h: torch.Tensor, choose_scales, group_size: int = 64):
    """Int4 groups along K with GPTQ rounding; choose_scales(cols (N, g)) -> 16-bit scales (N,) picks each
    group's scale just before its columns are rounded. Returns q int8 (N, K) and scales (K/g, N)."""
    n, k = w.shape
    scales = [None] * (k // group_size)
    cur = {}

    def start(j, cols):
        s = choose_scales(cols)
        scales[j // group_size] = s
        sf = s.float()
        cur["s"] = sf
        cur["safe"] = torch.where(sf > 0, sf, torch.ones_like(sf))

    def rnd(j, col):
        return torch.round(col / cur["safe"]).clamp_(-8, 7) * cur["s"]

    wq = gptq(w, h, rnd, start, group_size)
    s_full = torch.stack(scales)  # (K/g, N)
    safe = torch.where(s_full.float() > 0, s_full.float(), torch.ones_like(s_full.float()))
    q = torch.round(wq / safe.t().repeat_interleave(group_size, dim=1)).clamp_(-8, 7)
    return q.to(torch.int8), s_full


def gptq_ternary(w: torch.Tensor, h: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Ternary codes T (N, K) int8 for fixed row scales (N,), rounded with GPTQ error compensation."""
    s = scales.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    wq = gptq(w, h, lambda j, col: torch.round(col / safe).clamp_(-1, 1) * s)
    return torch.round(wq / safe.unsqueeze(1)).clamp_(-1, 1).to(torch.int8)


def weighted_row_scales(r: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per row n: the scale s minimising ||(r_n - s t_n) C||, i.e. <r_n, t_n>_H / <t_n, t_n>_H."""
    t = t.float()
    th = t @ h
    num, den = (r * th).sum(1), (t * th).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
