"""svdq_w4a4's smoothing vector and low-rank branch trained on the sampled inputs against the layer's output error
with its int4 activations and int4 weights simulated (rounding passed straight through), residual then re-rounded."""
import torch

from ..kernels import reference as ref
from .formats import GROUP_SIZE

ACT_FIT_STEPS = 200  # Adam steps (MiniLM's first block: lambda alone reached the same error at 100, 200 and 400)
ACT_FIT_LR = 1e-2  # relative to each tensor's mean magnitude (log lambda: absolute)


def _ste_round(v):
    return v + (torch.round(v) - v).detach()


def _int4_groups(v, lo, hi, absmax):
    """Fake-quantize v (M, K) per row and group of GROUP_SIZE columns to [lo, hi], scale absmax / hi."""
    g = v.unflatten(1, (-1, GROUP_SIZE))
    s = absmax(g).clamp_min(1e-30) / hi
    return (_ste_round(g / s).clamp(lo, hi) * s).flatten(1)


def fake_act_int4(x, lam, unsigned: bool):
    """The smoothed activations x / lam as the int4 kernel multiplies them (reference.quantize_act_int4;
    unsigned: shifted by ACT_SHIFT, quantized to [0, 15], the shift's share folded back)."""
    if unsigned:
        q = _int4_groups((x + ref.ACT_SHIFT) / lam, 0, 15, lambda g: g.amax(-1, keepdim=True))
        return q - ref.ACT_SHIFT / lam
    return _int4_groups(x / lam, -8, 7, lambda g: g.abs().amax(-1, keepdim=True))


def noise_power(x, lam16, unsigned: bool) -> torch.Tensor:
    """Per input channel: the mean squared int4 rounding error of the smoothed activations x / lambda."""
    lam = lam16.float()
    with torch.no_grad():
        return ((fake_act_int4(x, lam, unsigned) - x / lam) ** 2).mean(0)


def fit_smooth_branch(w, x, lam16, up, down, unsigned: bool, steps: int = ACT_FIT_STEPS, lr: float = ACT_FIT_LR):
    """Adam on log lambda and the branch (up (N, r), down (K, r) reading the raw input) minimising
    ||Q_a(x / lam) Q_w((W - up down^T) lam)^T + x down up^T - x W^T|| on x; rounding passed straight through.
    Returns (lambda float32 (K,), up, down) float32. Runs with autograd even under torch.inference_mode (ComfyUI)."""
    with torch.inference_mode(False), torch.enable_grad():
        # clones: tensors made under inference mode cannot be saved for backward
        return _fit(w.clone(), x.clone(), lam16.clone(), None if up is None else up.clone(),
                    None if down is None else down.clone(), unsigned, steps, lr)


def _fit(w, x, lam16, up, down, unsigned, steps, lr):
    loglam = torch.nn.Parameter(lam16.float().log())
    params = [{"params": [loglam], "lr": lr}]
    tensors = [loglam]
    if up is not None:
        up = torch.nn.Parameter(up.float().clone())
        down = torch.nn.Parameter(down.float().clone())
        params += [{"params": [p], "lr": lr * p.detach().abs().mean().item()} for p in (up, down)]
        tensors += [up, down]
    opt = torch.optim.Adam(params)
    with torch.no_grad():
        y = x @ w.t()
        y_norm = (y ** 2).sum().clamp_min(1e-30)
    for _ in range(steps):
        lam = loglam.exp()
        branch = None if up is None else up @ down.t()
        resid = w if branch is None else w - branch
        wq = _int4_groups(resid * lam, -8, 7, lambda g: g.abs().amax(-1, keepdim=True))
        yq = fake_act_int4(x, lam, unsigned) @ wq.t()
        if branch is not None:
            yq = yq + (x @ down) @ up.t()
        loss = ((yq - y) ** 2).sum() / y_norm
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tuple(None if t is None else t.detach() for t in (loglam.exp(), up, down))
