"""Activation mode of a model's quantized layers, chosen at run time and stored nowhere in a checkpoint.

`int4`: each layer's own activation quantization (SVDQuant int4 for svdq_w4a4; 16-bit or int8 for ternary).
`int8`: int8 per token after smoothing on int8 tensor cores (W4A8 for svdq_w4a4, int8 for ternary).
`fp8`: e4m3 per token after smoothing (kernels/reference.py), for svdq_w4a4 and ternary layers alike.
`auto`: the mode kernels/activation_modes.json gives the GPU's family (int8 where FP8 is absent or half-rate,
fp8 where both run at one rate); int4 on the CPU.
"""
import logging

import torch

from .. import kernels
from .linear import LowBitLinear

ACTIVATIONS = ("auto", "int4", "int8", "fp8")
log = logging.getLogger("comfyui_lowbit")
_warned: set = set()


def resolve_activations(mode: str, device) -> str:
    """The mode that runs on `device`: `auto` per kernels.auto_activations; `fp8` on a GPU without FP8 tensor cores
    -> int8, logged once per GPU (on the CPU fp8 runs in the PyTorch reference); int4 and int8 run everywhere."""
    if mode not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {mode!r}")
    device = torch.device(device)
    if mode == "auto":
        return kernels.auto_activations(device)
    if mode != "fp8" or device.type == "cpu" or kernels.fp8_supported(device):
        return mode
    if str(device) not in _warned:
        _warned.add(str(device))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else str(device)
        log.warning("comfyui-lowbit: fp8 activations need FP8 tensor cores (NVIDIA sm_89+, AMD gfx950/gfx12); "
                    "%s has none, running int8 activations (as accurate, on int8 tensor cores)", name)
    return "int8"


def set_activations(model: torch.nn.Module, mode: str, device=None, progressive: bool | None = None) -> str:
    """Set the activation mode of every quantized layer in `model` (no weights change); returns the mode
    that runs on `device` (default: the CPU). progressive: for the int8 mode of svdq_w4a4 layers, integer group
    scales (kernels.progressive_scales) instead of the checkpoint's float ones (None: leave as it is)."""
    effective = resolve_activations(mode, "cpu" if device is None else device)
    for m in model.modules():
        if isinstance(m, LowBitLinear):
            m.activations = effective
            if progressive is not None:
                m.int8_progressive = progressive
    return effective


def use_activations(model: torch.nn.Module, mode: str, device, progressive: bool | None = None) -> torch.nn.Module:
    """`mode` on every quantized layer of `model`, or a RuntimeError where it cannot run on `device` (a benchmark
    must not time another mode under its label). Returns `model`."""
    if set_activations(model, mode, device, progressive) != mode:
        set_activations(model, "int4")
        raise RuntimeError(f"{mode} activations need FP8 tensor cores (NVIDIA sm_89+, AMD gfx950/gfx12); "
                           f"{device} has none")
    return model


def use_fp8(model: torch.nn.Module, device) -> torch.nn.Module:
    """use_activations(model, "fp8", device)."""
    return use_activations(model, "fp8", device)
