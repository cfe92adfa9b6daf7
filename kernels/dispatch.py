"""Backend choice: Triton on a GPU when Triton imports, the PyTorch reference otherwise.

LOWBIT_BACKEND=reference|triton overrides (triton on a CPU tensor needs TRITON_INTERPRET=1).
The first fallback to the reference on a GPU tensor logs one line saying why.
fp8_supported(device) says whether a GPU has FP8 (e4m3) tensor cores the kernels can use; auto_activations(device)
is the activation mode activation_modes.json gives its GPU family.
"""
import json
import logging
import os
import re

import torch

from . import reference

log = logging.getLogger("comfyui_lowbit")

BACKENDS = ("auto", "reference", "triton")
_triton_ops = None
_triton_error: str | None = None
_warned = False
_forced: str | None = None


def set_backend(name: str | None) -> None:
    """Force a backend for this process (the loader node's `backend` input); None or 'auto' resets."""
    global _forced
    if name not in (None, *BACKENDS):
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _forced = None if name in (None, "auto") else name


def _load_triton():
    global _triton_ops, _triton_error
    if _triton_ops is None and _triton_error is None:
        try:
            from . import triton_ops

            _triton_ops = triton_ops
        except Exception as e:  # ImportError, or a Triton build without a usable backend
            _triton_error = f"{type(e).__name__}: {e}"
    return _triton_ops


def requested_backend() -> str:
    name = _forced or os.environ.get("LOWBIT_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"LOWBIT_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def backend_for(device: torch.device):
    """The module (reference or triton_ops) whose functions run on `device`."""
    global _warned
    name = requested_backend()
    if name == "reference":
        return reference
    if name == "triton":
        ops = _load_triton()
        if ops is None:
            raise RuntimeError(f"LOWBIT_BACKEND=triton but the Triton kernels cannot load: {_triton_error}")
        return ops
    if device.type == "cpu":
        return reference
    ops = _load_triton()
    if ops is None and not _warned:
        _warned = True
        log.warning("comfyui-lowbit: using the PyTorch reference on %s (Triton unavailable: %s)", device, _triton_error)
    return ops or reference


def fp8_supported(device: torch.device) -> bool:
    """FP8 (e4m3) tensor cores: NVIDIA sm_89+ (Ada, Hopper, Blackwell), AMD gfx950 / gfx12 (OCP e4m3).
    MI300 (gfx942) is left out: its FP8 is the e4m3fnuz variant (another exponent bias, no negative zero)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    props = torch.cuda.get_device_properties(device)
    if torch.version.hip:
        arch = getattr(props, "gcnArchName", "")
        return arch.startswith(("gfx950", "gfx12"))
    return (props.major, props.minor) >= (8, 9)


MODES_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "activation_modes.json")
_families = None


def activation_families() -> list:
    """The families of activation_modes.json, in match order."""
    global _families
    if _families is None:
        with open(MODES_TABLE) as f:
            _families = json.load(f)["families"]
    return _families


def gpu_identity(device) -> dict:
    """{vendor: nvidia|amd, cc: (major, minor), arch: gcnArchName, name} of a GPU, or {} off the GPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(device)
    return {"vendor": "amd" if torch.version.hip else "nvidia", "cc": (props.major, props.minor),
            "arch": getattr(props, "gcnArchName", ""), "name": props.name}


def _matches(match: dict, gpu: dict) -> bool:
    if "vendor" in match and match["vendor"] != gpu["vendor"]:
        return False
    if "cc_min" in match and not tuple(match["cc_min"]) <= gpu["cc"] <= tuple(match["cc_max"]):
        return False
    if "arch" in match and not re.match(match["arch"], gpu["arch"]):
        return False
    return "name" not in match or re.search(match["name"], gpu["name"]) is not None


def auto_family(device) -> dict | None:
    """The activation_modes.json entry for `device`'s GPU (None off the GPU)."""
    gpu = gpu_identity(device)
    if not gpu:
        return None
    return next(f for f in activation_families() if _matches(f["match"], gpu))


def auto_activations(device) -> str:
    """activations=auto: the table's mode for the GPU family (int4, the checkpoints' own, off the GPU)."""
    family = auto_family(device)
    mode = "int4" if family is None else family["mode"]
    return "int8" if mode == "fp8" and not fp8_supported(device) else mode
