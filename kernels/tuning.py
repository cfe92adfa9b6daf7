"""Per-GPU tables of tuned kernel configs: committed data in kernels/configs/<gpu>.json, written on that GPU by
`python -m comfyui_lowbit.kernels.tune`. A launch whose shape is in the table runs that config directly (no
autotune benchmarking, so a fresh process's first forward is as fast as the next); others autotune over at
most 3 candidates.

File layout: {"gpu": name, "triton": version, "kernels": {kernel: {"N=..,K=..,R=..,M=..": {meta..,
"num_warps": w, "num_stages": s, "us": measured}}}} where M is the token-count bucket (triton_common.m_bucket).
"""
import json
import os
import re

import torch

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_TABLES = {}
_INFO_KEYS = ("us",)


def gpu_key(device) -> str:
    """File stem for a device: 'nvidia_h200' for 'NVIDIA H200'; 'cpu' off the GPU (interpreter runs)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


def table_path(device) -> str:
    return os.path.join(CONFIG_DIR, gpu_key(device) + ".json")


def read_table(path: str) -> dict:
    """{kernel: {shape key: config}} from a table file ({} when there is none)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    kernels = data.get("kernels") if isinstance(data, dict) else None
    if not isinstance(kernels, dict) or not all(isinstance(v, dict) for v in kernels.values()):
        raise ValueError(f"{path}: expected {{\"kernels\": {{kernel: {{shape: config}}}}}}, got {str(data)[:120]}")
    return kernels


def table(device) -> dict:
    path = table_path(device)
    if path not in _TABLES:
        _TABLES[path] = read_table(path)
    return _TABLES[path]


def shape_key(**fields) -> str:
    return ",".join(f"{k}={v}" for k, v in fields.items())


def lookup(name: str, device, **fields):
    """The tuned config (meta-parameters + num_warps/num_stages) of kernel `name` at this shape, or None."""
    return table(device).get(name, {}).get(shape_key(**fields))


def launch(name: str, tuner, grid, device, fields: dict, *args, **kwargs):
    """tuner[grid](*args, **kwargs), or its kernel with the table's config when the shape is in the table."""
    cfg = lookup(name, device, **fields)
    if cfg is None:
        return tuner[grid](*args, **kwargs)
    meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages", *_INFO_KEYS)}
    return tuner.fn[grid](*args, **kwargs, **meta, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
