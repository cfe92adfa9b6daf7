"""Block-wise reconstruction: with every layer's integer codes (and svdq_w4a4's smoothing) fixed, adjust the 16-bit
scales, low-rank branches and biases of a block's quantized layers so that the block's output matches the 16-bit
block's on calibration inputs. Ternary, svdq_w4a4 (int4 activations simulated, rounding passed straight through)
and w4a16 layers."""
import torch
from torch import nn

from ..kernels import reference as ref
from .actfit import fake_act_int4
from .formats import GROUP_SIZE
from .linear import LowBitLinear, SVDQW4A4Linear, TernaryLinear, W4A16Linear

REFINE_LR = 1e-2  # relative to each tensor's mean magnitude


def _expand(scales, group):
    return scales.float().t().repeat_interleave(group, dim=1)


REFINE_TENSORS = ("scales", "branch", "bias")


def _maybe_param(t, train: bool):
    if t is None:
        return None
    t = t.float().clone()
    return nn.Parameter(t) if train else t


class _Trainable:
    """Float32 copies of one lowbit module's scales (and w4a16 zeros) / branch / bias with a differentiable
    forward patched in; `train` names which of them are trained."""

    def __init__(self, mod: LowBitLinear, train=REFINE_TENSORS):
        self.mod = mod
        self.codes = mod.packed().unpack().float()  # (N, K), fixed
        self.s = _maybe_param(mod.wscales, "scales" in train)
        down, up = mod.branch()
        self.down, self.up = _maybe_param(down, "branch" in train), _maybe_param(up, "branch" in train)
        zeros = getattr(mod, "wzeros", None) if isinstance(mod, W4A16Linear) else None
        self.z = _maybe_param(zeros, "scales" in train)
        self.bias = _maybe_param(mod.float_bias(), "bias" in train)
        self.lam = mod.smooth.float() if isinstance(mod, SVDQW4A4Linear) else None
        mod.forward = self.forward  # instance attribute: removed again by restore()

    def params(self):
        return [p for p in (self.s, self.z, self.down, self.up, self.bias) if isinstance(p, nn.Parameter)]

    def weight(self):
        m = self.mod
        if isinstance(m, TernaryLinear):
            return self.codes * self.s.unsqueeze(1)
        w = self.codes * _expand(self.s, self.codes.shape[1] // self.s.shape[0])
        if self.z is not None:
            w = w + _expand(self.z, self.codes.shape[1] // self.z.shape[0])
        return w

    def forward(self, x):
        xf = x.float().reshape(-1, x.shape[-1])
        if self.lam is not None:  # W4A4: the residual multiplies the int4 activations, in the smoothed space
            y = fake_act_int4(xf, self.lam, bool(self.mod._options["act_unsigned"])) @ self.weight().t()
        else:
            y = xf @ self.weight().t()
        if self.down is not None:
            y = y + (xf @ self.down) @ self.up.t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    def restore(self, write: bool):
        """Remove the patched forward; write: store the trained values (16-bit) in the module."""
        del self.mod.forward
        if not write:
            return
        m = self.mod
        dt = m.wscales.dtype
        if isinstance(self.s, nn.Parameter):
            m.wscales = self.s.detach().to(dt)
        if isinstance(self.z, nn.Parameter):
            m.wzeros = self.z.detach().to(dt)
        if isinstance(self.down, nn.Parameter):
            m.set_branch(self.down.detach().to(dt), self.up.detach().to(dt))
        unsigned = isinstance(m, SVDQW4A4Linear) and m._options["act_unsigned"]
        if isinstance(self.bias, nn.Parameter) or unsigned:
            b = self.bias.detach()
            if unsigned:  # the stored bias holds minus the activation shift's share of the (new) residual
                b = b - ref.ACT_SHIFT * m._residual().sum(dim=1)
            m.bias = b.to(dt)


def _snapshot(mods):
    return [{k: v for k, v in m._buffers.items() if v is not None} for m in mods]


def _put_back(mods, snaps):
    for m, snap in zip(mods, snaps):
        for k, v in snap.items():
            setattr(m, k, v)


REFINE_FORMATS = ("ternary", "svdq_w4a4")


def trainable_layers(block: nn.Module, formats=REFINE_FORMATS) -> list:
    """The lowbit modules of `formats` refine_block adjusts (svdq_w4a4: one activation variant per layer)."""
    return [m for m in block.modules() if isinstance(m, LowBitLinear) and m.fmt in formats
            and not (isinstance(m, SVDQW4A4Linear) and m._options.get("act_unsigned_from", 0))]


def _loss(block, run, inputs, targets) -> torch.Tensor:
    total = 0.0
    for inp, tgt in zip(inputs, targets):
        out = run(block, inp)
        total = total + ((out.float() - tgt.float()) ** 2).sum() / (tgt.float() ** 2).sum().clamp_min(1e-30)
    return total / len(inputs)


def refine_block(block: nn.Module, run, inputs: list, targets: list, steps: int, lr: float = REFINE_LR,
                 train=REFINE_TENSORS, formats=REFINE_FORMATS) -> tuple[float, float]:
    """Adam on the `train` tensors (scales, branch, bias) of the lowbit modules of `formats` in `block` (codes
    untouched) for `steps` steps, one calibration input per step; run(block, inp) -> output (one tensor),
    targets: the 16-bit block's outputs. The result is kept only if the block's mean relative squared error over
    all inputs, measured through the real quantized path before and after, went down.
    Returns (error before, error after), relative L2."""
    unknown = set(train) - set(REFINE_TENSORS)
    if unknown:
        raise ValueError(f"refine: cannot train {sorted(unknown)}; choose from {REFINE_TENSORS}")
    mods = trainable_layers(block, formats)
    with torch.no_grad():
        before = _loss(block, run, inputs, targets).item()
    if not mods or steps <= 0:
        return before ** 0.5, before ** 0.5
    snaps = _snapshot(mods)
    layers = [_Trainable(m, train) for m in mods]
    params = [p for t in layers for p in t.params()]
    if not params:
        for t in layers:
            t.restore(False)
        return before ** 0.5, before ** 0.5
    # lr relative to each tensor's typical magnitude: scales and branch factors differ by orders of magnitude
    opt = torch.optim.Adam([{"params": [p], "lr": lr * p.detach().abs().mean().clamp_min(1e-8).item()} for p in params])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    try:
        with torch.enable_grad():
            for step in range(steps):
                i = step % len(inputs)
                opt.zero_grad()
                loss = _loss(block, run, [inputs[i]], [targets[i]])
                loss.backward()
                opt.step()
                sched.step()
    except BaseException:
        for t in layers:
            t.restore(False)
        raise
    for t in layers:
        t.restore(True)
    with torch.no_grad():
        after = _loss(block, run, inputs, targets).item()
    if after >= before:
        _put_back(mods, snaps)
        after = before
    return before ** 0.5, after ** 0.5
