"""A size budget: per quantizable layer, the format that buys the most quality per byte, so that a checkpoint fits
N bytes with the smallest error.

Candidates per layer: the format its family gives it (the block format, or w4a16 for modulation and text-encoder
layers), w4a16 and 16-bit (a W8A16 format does not exist here yet). Every candidate is quantized for real (the
converter's own per-layer call) and measured: the relative squared error of the layer's output,
||y_q - y||^2 / ||y||^2, on held-out calibration rows where the calibration file has samples of the layer's input,
else on seeded standard-normal rows (GELU outputs for the layers that read one). On isotropic inputs a weight-only
format's output error is its weight error; for svdq_w4a4 it also counts the int4 activations, which a weight
error would miss (svdq_w4a4's low-rank branch makes its weight error smaller than w4a16's while its output error
is not). A plan's error is the sum over layers. Choice: every layer starts at its smallest candidate; then,
repeatedly, the upgrade that removes the most error per added byte among those that still fit; finally, if a
uniform plan that fits (the family's own, all w4a16, all 16-bit) has a smaller sum, it is taken instead, so the
result is never worse than any uniform format that fits.
"""
import json
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .families import packed_bytes

BF16 = 2
SYNTH_TOKENS = 256
SIXTEEN = "16-bit"
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "U16": 2, "U32": 4, "U64": 8}


@dataclass(frozen=True)
class Option:
    fmt: str | None  # None: kept 16-bit
    bytes: int
    error: float

    @property
    def label(self) -> str:
        return self.fmt or SIXTEEN


def candidates(family, layer: str, block_fmt: str) -> list:
    """The formats a layer may take under a budget ([] for a layer that is never quantized)."""
    own = family.layer_format(layer, block_fmt)
    if own is None:
        return []
    return [own] + (["w4a16"] if own != "w4a16" else []) + [None]


def option_bytes(fmt, n: int, k: int, rank: int, group_size: int, bias: bool) -> int:
    if fmt is None:
        return BF16 * (n * k + (n if bias else 0))
    return packed_bytes(fmt, n, k, rank=rank, group_size=group_size, bias=bias)


def synthetic_rows(layer: str, k: int, unsigned: bool, device="cpu") -> torch.Tensor:
    """Seeded N(0, 1) rows (GELU of them for a layer reading a GELU output), the same for every candidate."""
    g = torch.Generator().manual_seed(zlib.crc32(layer.encode()))
    x = torch.randn(SYNTH_TOKENS, k, generator=g)
    return (F.gelu(x, approximate="tanh") if unsigned else x).to(device)


@torch.no_grad()
def output_error(packed, w: torch.Tensor, b, x: torch.Tensor, dtype=torch.bfloat16) -> float:
    """||y_q - y||^2 / ||y||^2 of a packed layer (None: the 16-bit copy of w, b) against the float layer on rows x."""
    from ..quant_ops import module_from_packed

    x = x.to(w.device).float()
    y = x @ w.float().t() + (0 if b is None else b.float())
    if packed is None:
        yq = x.to(dtype).float() @ w.to(dtype).float().t() + (0 if b is None else b.to(dtype).float())
    else:
        yq = module_from_packed(packed)(x.to(packed.dtype)).float()
    return ((yq - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30)).item()


def choose(options: dict, room: int) -> dict:
    """{layer: Option} minimizing the summed error with the summed bytes <= room (greedy by error per byte)."""
    cur = {layer: min(opts, key=lambda o: (o.bytes, o.error)) for layer, opts in options.items()}
    used = sum(o.bytes for o in cur.values())
    if used > room:
        raise ValueError(f"no plan fits {room} bytes (the smallest takes {used})")
    while True:
        best, best_gain = None, 0.0
        for layer, opts in options.items():
            c = cur[layer]
            for o in opts:
                extra = o.bytes - c.bytes
                gain = c.error - o.error
                if gain <= 0 or used + extra > room:
                    continue
                rate = gain / extra if extra > 0 else math.inf
                if rate > best_gain:
                    best, best_gain = (layer, o), rate
        if best is None:
            return cur
        layer, o = best
        used += o.bytes - cur[layer].bytes
        cur[layer] = o


def uniform_plans(options: dict, family, block_fmt: str) -> dict:
    """{name: {layer: Option}} of the plans that give every layer one rule: the family's, all w4a16, all 16-bit."""
    def pick(layer, fmt):
        return next(o for o in options[layer] if o.fmt == fmt)

    name = f"{block_fmt} (the format's own plan)" if block_fmt != "w4a16" else "w4a16"
    plans = {name: {l: pick(l, family.layer_format(l, block_fmt)) for l in options}}
    plans.setdefault("w4a16", {l: pick(l, "w4a16") for l in options})
    plans[SIXTEEN] = {l: pick(l, None) for l in options}
    return plans


def plan_error(plan: dict) -> float:
    return sum(o.error for o in plan.values())


def plan_bytes(plan: dict) -> int:
    return sum(o.bytes for o in plan.values())


def header_reserve(shapes: dict, quantizable: list) -> int:
    """Bytes kept for the safetensors header: tensor entries (a quantized layer has up to 6 tensors), lowbit.layers
    and lowbit.plan JSON, the other metadata (generous upper estimates)."""
    names = sum(len(k) + 96 for k in shapes)
    return 65536 + names + sum(6 * (len(l) + 112) + 256 + 2 * len(l) + 192 for l in quantizable)


def fixed_bytes(shapes: dict, dtypes: dict, quantizable: set) -> int:
    """Bytes of the tensors no plan quantizes: floats as bf16, other tensors as they are."""
    total = 0
    for key, shape in shapes.items():
        if key.rpartition(".")[0] in quantizable and key.endswith((".weight", ".bias")):
            continue
        total += math.prod(shape) * DTYPE_BYTES.get(dtypes.get(key, ""), BF16)
    return total


def feasible(max_bytes: int, floor: int, fixed: int, reserve: int) -> None:
    need = floor + fixed + reserve
    if max_bytes < need:
        raise ValueError(f"size budget {max_bytes / 1e9:.3f} GB is below the smallest checkpoint of this model, "
                         f"{need / 1e9:.3f} GB (every quantized layer in its smallest format, embedders and norms "
                         f"16-bit); raise --max-size / max_size_gb")


def plan_metadata(max_bytes: int, metric: str, chosen: dict, options: dict, uniforms: dict, fixed: int,
                  reserve: int, picked: str) -> str:
    """lowbit.plan: what `lowbit inspect` shows of a budgeted checkpoint."""
    return json.dumps({
        "max_bytes": max_bytes, "metric": metric, "picked": picked, "fixed_bytes": fixed, "header_reserve": reserve,
        "bytes": plan_bytes(chosen), "error": plan_error(chosen),
        "uniform": {n: {"bytes": plan_bytes(p) + fixed, "error": plan_error(p),
                        "fits": plan_bytes(p) + fixed + reserve <= max_bytes} for n, p in uniforms.items()},
        "layers": {l: [chosen[l].label, {o.label: [o.bytes, round(o.error, 8)] for o in opts}]
                   for l, opts in options.items()},
    })


def plan(options: dict, family, block_fmt: str, max_bytes: int, fixed: int, reserve: int, metric: str):
    """(chosen {layer: Option}, lowbit.plan JSON): the greedy plan, or a uniform plan that fits with a smaller
    error."""
    room = max_bytes - fixed - reserve
    chosen = choose(options, room)
    picked = "greedy"
    uniforms = uniform_plans(options, family, block_fmt)
    for name, p in uniforms.items():
        if plan_bytes(p) <= room and plan_error(p) < plan_error(chosen):
            chosen, picked = dict(p), name
    return chosen, plan_metadata(max_bytes, metric, chosen, options, uniforms, fixed, reserve, picked)
