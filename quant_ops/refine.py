"""Block-wise reconstruction for ternary layers: with the codes fixed, adjust every TernaryLinear's row scales
and low-rank branch in a block so that the block's output matches the 16-bit block's on calibration inputs."""
import torch
from torch import nn

from .linear import TernaryLinear


class _Trainable:
    """Float32 scales / branch of one TernaryLinear with a differentiable forward patched in."""

    def __init__(self, mod: TernaryLinear):
        self.mod = mod
        self.t = mod.packed().unpack().float()  # (N, K) codes, fixed
        self.s = nn.Parameter(mod.wscales.float().clone())
        down, up = mod.branch()
        self.down = None if down is None else nn.Parameter(down.float().clone())
        self.up = None if up is None else nn.Parameter(up.float().clone())
        self.bias = None if mod.bias is None else mod.bias.float()
        mod.forward = self.forward  # instance attribute: removed again by restore()

    def params(self):
        return [p for p in (self.s, self.down, self.up) if p is not None]

    def forward(self, x):
        xf = x.float()
        y = (xf @ self.t.t()) * self.s
        if self.down is not None:
            y = y + (xf @ self.down) @ self.up.t()
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def restore(self, write: bool):
        del self.mod.forward
        if write:
            dt = self.mod.wscales.dtype
            self.mod.wscales = self.s.detach().to(dt)
            if self.down is not None:
                self.mod.set_branch(self.down.detach().to(dt), self.up.detach().to(dt))


def _loss(block, run, inputs, targets) -> torch.Tensor:
    total = 0.0
    for inp, tgt in zip(inputs, targets):
        out = run(block, inp)
        total = total + ((out.float() - tgt.float()) ** 2).sum() / (tgt.float() ** 2).sum().clamp_min(1e-30)
    return total / len(inputs)


def refine_block(block: nn.Module, run, inputs: list, targets: list, steps: int, lr: float = 1e-2) -> tuple[float, float]:
    """Adam on the scales and branches of the TernaryLinear modules in `block` (codes untouched) for `steps`
    steps, one calibration input per step; run(block, inp) -> output, targets: the 16-bit block's outputs.
    Keeps the result only if the mean relative squared error over all inputs went down.
    Returns (error before, error after) as relative L2."""
    layers = [_Trainable(m) for m in block.modules() if isinstance(m, TernaryLinear)]
    if not layers or steps <= 0:
        for t in layers:
            t.restore(False)
        return (float("nan"),) * 2
    params = [p for t in layers for p in t.params()]
    with torch.no_grad():
        before = _loss(block, run, inputs, targets).item()
    # lr relative to each tensor's typical magnitude: scales and branch factors differ by orders of magnitude
    opt = torch.optim.Adam([{"params": [p], "lr": lr * p.detach().abs().mean().item()} for p in params])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        i = step % len(inputs)
        opt.zero_grad()
        loss = _loss(block, run, [inputs[i]], [targets[i]])
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        after = _loss(block, run, inputs, targets).item()
    keep = after < before
    for t in layers:
        t.restore(keep)
    if keep:  # the written values are 16-bit: measure again
        with torch.no_grad():
            after = _loss(block, run, inputs, targets).item()
    return before ** 0.5, (after if keep else before) ** 0.5
