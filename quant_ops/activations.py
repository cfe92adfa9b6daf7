"""Activation mode of a model's quantized layers, chosen at run time and stored nowhere in a checkpoint.

`int4`: each layer's own activation quantization (SVDQuant int4 for svdq_w4a4; 16-bit or int8 for ternary).
`fp8`: e4m3 per token after smoothing (kernels/reference.py), for svdq_w4a4 and ternary layers alike.
"""
import logging

import torch

from .. import kernels
from .linear import LowBitLinear

ACTIVATIONS = ("auto", "int4", "fp8")
log = logging.getLogger("comfyui_lowbit")
_warned: set = set()


def resolve_activations(mode: str, device) -> str:
    """`auto` -> fp8 on a GPU with FP8 tensor cores, else int4. `fp8` on a GPU without them -> int4, logged
    once per GPU; on the CPU fp8 runs in the PyTorch reference."""
    if mode not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {mode!r}")
    device = torch.device(device)
    if mode == "int4":
        return mode
    if kernels.fp8_supported(device):
        return "fp8"
    if mode == "fp8" and device.type == "cpu":
        return "fp8"
    if mode == "fp8" and str(device) not in _warned:
        _warned.add(str(device))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else str(device)
        log.warning("comfyui-lowbit: fp8 activations need FP8 tensor cores (NVIDIA sm_89+, AMD gfx950/gfx12); "
                    "%s has none, running int4 activations", name)
    return "int4"


def set_activations(model: torch.nn.Module, mode: str, device=None) -> str:
    """Set the activation mode of every quantized layer in `model` (no weights change); returns the mode
    that runs on `device` (default: the CPU)."""
    effective = resolve_activations(mode, "cpu" if device is None else device)
    for m in model.modules():
        if isinstance(m, LowBitLinear):
            m.activations = effective
    return effective


def use_fp8(model: torch.nn.Module, device) -> torch.nn.Module:
    """fp8 activations on every quantized layer of `model`, or a RuntimeError where they cannot run on `device`
    (a benchmark must not time int4 activations under an fp8 label). Returns `model`."""
    if set_activations(model, "fp8", device) != "fp8":
        set_activations(model, "int4")
        raise RuntimeError(f"fp8 activations need FP8 tensor cores (NVIDIA sm_89+, AMD gfx950/gfx12); {device} has none")
    return model
