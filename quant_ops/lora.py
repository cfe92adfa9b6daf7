"""LoRA on quantized layers, through their 16-bit low-rank branch (pure torch).

A LoRA adds strength * alpha / r * B A to W (A (r, K) = lora_down, B (N, r) = lora_up). A lowbit layer
computes y = Q(...) + (x proj_down) proj_up^T + bias with a branch that reads the raw input x (for
SVDQuant the smoothing is already divided out of proj_down; for act_unsigned the +shift only feeds the
quantized residual), so the LoRA is exact as extra branch columns:

    proj_down' = [proj_down | A^T * strength * alpha / r]      (K, r0 + r)
    proj_up'   = [proj_up   | B placed at its output rows]     (N, r0 + r)

A LoRA that targets a slice of a fused layer (diffusers q/k/v of `img_attn.qkv` / `linear1`) gives
`out_offset = (start, length)`: B fills those rows and the other rows are zero. `in_offset` does the
same for a slice of the input columns. Several LoRAs stack (ranks add). The packed weight and its
scales are never touched, dequantized or re-quantized; `apply_lora` keeps references to the
original branch (and bias) and `remove_lora` puts those very tensors back.
"""
from dataclasses import dataclass

import torch

from .linear import LowBitLinear

RANK_MULTIPLE = 16  # branches with LoRAs are zero-padded to a multiple of this (the kernels' rank tile)
MAX_RANK = 256  # the most the Triton kernels take (kernels/triton_common.py MAX_RANK)
_ORIG = "_lowbit_lora_originals"  # module attribute: {"proj_down", "proj_up", "bias"} before any LoRA


@dataclass(frozen=True)
class LoraFactor:
    """One LoRA on one layer: delta W[rows, cols] = scale * up @ down."""

    up: torch.Tensor  # B (rows, r)
    down: torch.Tensor  # A (r, cols)
    scale: float = 1.0  # strength * alpha / r
    out_offset: tuple[int, int] | None = None  # (start, length) of the rows B writes; None: all
    in_offset: tuple[int, int] | None = None  # (start, length) of the input columns A reads; None: all
    name: str = "lora"  # for error messages (the LoRA key)

    @classmethod
    def from_alpha(cls, up, down, alpha=None, strength=1.0, **kw) -> "LoraFactor":
        """Scale as ComfyUI and kohya define it: strength * alpha / rank (alpha None: strength)."""
        rank = down.shape[0]
        return cls(up, down, float(strength) * (1.0 if alpha is None else float(alpha) / rank), **kw)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def _span(offset, size):
    return (0, size) if offset is None else (int(offset[0]), int(offset[1]))


def check_factor(f: LoraFactor, out_features: int, in_features: int, layer: str = "layer") -> None:
    """Raise ValueError naming the LoRA key and both shapes when `f` does not fit an N x K layer."""
    r0, rn = _span(f.out_offset, out_features)
    c0, cn = _span(f.in_offset, in_features)
    ok = (f.up.dim() == 2 and f.down.dim() == 2 and f.up.shape[1] == f.down.shape[0]
          and f.up.shape[0] == rn and f.down.shape[1] == cn
          and 0 <= r0 and r0 + rn <= out_features and 0 <= c0 and c0 + cn <= in_features)
    if not ok:
        where = ""
        if f.out_offset is not None or f.in_offset is not None:
            where = f" at rows {r0}:{r0 + rn}, columns {c0}:{c0 + cn}"
        raise ValueError(f"LoRA {f.name}: up {tuple(f.up.shape)} x down {tuple(f.down.shape)} does not fit layer "
                         f"{layer} of shape ({out_features}, {in_features}){where}; expected up ({rn}, r) and down (r, {cn})")


def compose_branch(proj_down, proj_up, factors, out_features: int, in_features: int, dtype=None, device=None,
                   layer: str = "layer", rank_multiple: int = 1):
    """(proj_down', proj_up') = the branch with every factor's columns appended; new tensors, inputs untouched.

    proj_down / proj_up may be None (no branch yet). dtype / device default to the branch's. The total
    rank is padded with zero columns up to a multiple of `rank_multiple` (exact: zeros add nothing).
    """
    factors = list(factors)
    for f in factors:
        check_factor(f, out_features, in_features, layer)
    if proj_down is not None:
        dtype, device = dtype or proj_down.dtype, device or proj_down.device
    if dtype is None:
        raise ValueError(f"{layer}: no low-rank branch to take the dtype from; pass dtype")
    downs = [] if proj_down is None else [proj_down]
    ups = [] if proj_up is None else [proj_up]
    for f in factors:
        r = f.rank
        down = torch.zeros(in_features, r, dtype=dtype, device=device)
        c0, cn = _span(f.in_offset, in_features)
        down[c0:c0 + cn] = (f.down.to(device=device, dtype=torch.float32).t() * f.scale).to(dtype)
        up = torch.zeros(out_features, r, dtype=dtype, device=device)
        r0, rn = _span(f.out_offset, out_features)
        up[r0:r0 + rn] = f.up.to(device=device, dtype=dtype)
        downs.append(down)
        ups.append(up)
    if not downs:
        return None, None
    pad = -sum(d.shape[1] for d in downs) % rank_multiple
    if pad and factors:
        downs.append(torch.zeros(in_features, pad, dtype=dtype, device=device))
        ups.append(torch.zeros(out_features, pad, dtype=dtype, device=device))
    return torch.cat(downs, dim=1), torch.cat(ups, dim=1)


def originals(module: LowBitLinear) -> dict | None:
    """The branch / bias tensors the module had before `apply_lora`, or None when no LoRA is applied."""
    return module.__dict__.get(_ORIG)


def lora_columns(module: LowBitLinear, factors, bias_delta: torch.Tensor | None = None, layer: str = "layer",
                 device=None, orig: dict | None = None):
    """What `apply_lora` adds to the original branch, without touching the module: (down (K, r'), up (N, r'),
    bias). cat([original proj_down, down], 1) / cat([original proj_up, up], 1) is exactly the branch apply_lora
    installs (same values, same zero padding; down/up None without factors) and `bias` its bias (None: the
    original bias unchanged). For layers whose original tensors are streamed to the device (nodes/stream.py)
    and concatenated with these columns there. `device`: where the new tensors go (default: the module's).
    """
    factors = list(factors)
    orig = orig or originals(module) or {"proj_down": module.branch()[0], "proj_up": module.branch()[1],
                                         "bias": module.bias}
    n, k = module.out_features, module.in_features
    device = module.weight.device if device is None else device
    down0 = orig["proj_down"]
    r0 = 0 if down0 is None else down0.shape[1]
    dtype = module.compute_dtype if down0 is None else down0.dtype
    down = up = None
    if factors:
        down, up = compose_branch(None, None, factors, n, k, dtype=dtype, device=device, layer=layer)
        pad = -(r0 + down.shape[1]) % RANK_MULTIPLE
        if pad:
            down = torch.cat([down, down.new_zeros(k, pad)], dim=1)
            up = torch.cat([up, up.new_zeros(n, pad)], dim=1)
        if r0 + down.shape[1] > MAX_RANK:
            raise ValueError(f"{layer}: low-rank branch rank {r0} + LoRA ranks {[f.rank for f in factors]} = "
                             f"{r0 + down.shape[1]} (padded to a multiple of {RANK_MULTIPLE}) exceeds {MAX_RANK}, the "
                             f"most the kernels take; use fewer or lower-rank LoRAs on this layer")
    bias = None
    if bias_delta is not None:
        if bias_delta.shape != (n,):
            raise ValueError(f"LoRA bias patch for {layer}: shape {tuple(bias_delta.shape)}, expected ({n},)")
        b0 = orig["bias"]
        base = torch.zeros(n, dtype=torch.float32, device=device) if b0 is None else b0.to(device).float()
        bias = (base + bias_delta.to(device=device, dtype=torch.float32)).to(module.compute_dtype)
    return down, up, bias


def apply_lora(module: LowBitLinear, factors, bias_delta: torch.Tensor | None = None, layer: str = "layer") -> None:
    """Set the module's branch to its original branch plus `factors` (replacing any earlier LoRA state).

    bias_delta: optional float (N,) added to the original bias (LoRA `diff_b` / bias patches).
    Calling again with other factors or strengths recomposes from the originals; an empty list and no
    bias_delta is `remove_lora`.
    """
    factors = list(factors)
    if not factors and bias_delta is None:
        remove_lora(module)
        return
    orig = originals(module)
    if orig is None:
        down, up = module.branch()
        orig = {"proj_down": down, "proj_up": up, "bias": module.bias}
    device = module.weight.device
    down, up, bias = lora_columns(module, factors, bias_delta, layer=layer, device=device, orig=orig)
    down0, up0 = orig["proj_down"], orig["proj_up"]
    if down0 is not None and down0.device != device:  # the module moved since the originals were taken
        down0, up0 = down0.to(device), up0.to(device)
    if down is None:
        down, up = down0, up0
    elif down0 is not None:
        down, up = torch.cat([down0, down], dim=1), torch.cat([up0, up], dim=1)
    if bias is None and orig["bias"] is not None:
        bias = orig["bias"] if orig["bias"].device == device else orig["bias"].to(device)
    module.__dict__[_ORIG] = orig
    module.set_branch(down, up)
    module.bias = bias


def remove_lora(module: LowBitLinear) -> bool:
    """Put back the exact tensors the module had before `apply_lora`; False if no LoRA was applied."""
    orig = module.__dict__.pop(_ORIG, None)
    if orig is None:
        return False
    device = module.weight.device
    fix = lambda t: t if t is None or t.device == device else t.to(device)  # noqa: E731 (moved meanwhile)
    module.set_branch(fix(orig["proj_down"]), fix(orig["proj_up"]))
    module.bias = fix(orig["bias"])
    return True
