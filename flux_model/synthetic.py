"""Seeded random FLUX transformers of any size: heavy-tailed weights with a low-rank part, outlier input
columns and a few large residual-stream channels (the "massive activations" of real DiTs)."""
import math

import torch
from torch import nn

from .model import FluxTransformer
from .quantize import set_module

OUTLIER_INPUTS = 4      # input columns per weight scaled up (weight outliers)
OUTLIER_HIDDEN = 4      # hidden channels carrying large activations (massive-activation channels)
LOWRANK = 8             # rank of the structured part of each random weight


def _random_weight(n, k, g, device, outliers=OUTLIER_INPUTS) -> torch.Tensor:
    """Student-t (3 dof) noise plus a rank-8 part of about the same norm (trained weights have a few large
    singular values), scaled by 1/sqrt(k); a few input columns 4x larger. float32."""
    z = torch.randn(n, k, generator=g, device=device)
    chi2 = sum(torch.randn(n, k, generator=g, device=device) ** 2 for _ in range(3)) / 3
    w = z.div_(chi2.sqrt_())
    r = min(LOWRANK, n, k)
    u = torch.randn(n, r, generator=g, device=device) * torch.linspace(2.0, 0.5, r, device=device)
    w.addmm_(u, torch.randn(r, k, generator=g, device=device), alpha=math.sqrt(1.5 / r))
    w.mul_(0.4 / math.sqrt(k))
    cols = torch.randperm(k, generator=g, device=device)[:outliers]
    w[:, cols] *= 4.0
    return w


def _init_leaf(name: str, m: nn.Module, g, device, dtype, config):
    h = config["hidden_size"]
    for pname, p in m.named_parameters(recurse=False):
        if pname == "scale":
            v = 1 + 0.1 * torch.randn(p.shape, generator=g, device=device)
        elif p.dim() == 1:
            v = 0.02 * torch.randn(p.shape, generator=g, device=device)
        else:
            v = _random_weight(*p.shape, g, device)
            if name in ("img_in", "txt_in"):
                # massive activations: a few hidden channels of the residual stream are large
                rows = torch.arange(0, h, max(1, h // OUTLIER_HIDDEN), device=device)[:OUTLIER_HIDDEN]
                v[rows] *= 16.0
        with torch.no_grad():
            setattr(m, pname, nn.Parameter(v.to(dtype), requires_grad=False))


def random_flux(config: dict, seed: int = 0, dtype=torch.bfloat16, device="cpu", quantize=None) -> FluxTransformer:
    """A seeded FLUX transformer with heavy-tailed weights (outlier input columns in every linear,
    a few large hidden channels from img_in/txt_in). Built leaf by leaf from the meta device, so only the
    final model plus one layer in float32 is ever held. `quantize(name, linear) -> module | None` may
    replace each linear right after it is made (see quantize_fn), so a quantized model never needs a
    full 16-bit copy. Values depend on the device's random generator."""
    device = torch.device(device)
    model = FluxTransformer(config, dtype=dtype, device="meta")
    g = torch.Generator(device=device).manual_seed(seed)
    for name, m in list(model.named_modules()):
        if not name or next(m.parameters(recurse=False), None) is None:
            continue
        _init_leaf(name, m, g, device, dtype, config)
        if quantize is not None and isinstance(m, nn.Linear):
            q = quantize(name, m)
            if q is not None:
                set_module(model, name, q)
    return model.eval()
