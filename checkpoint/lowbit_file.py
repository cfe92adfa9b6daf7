"""Lowbit checkpoint files: one safetensors file, metadata naming the format of every quantized layer."""
import json
import os
import tempfile
from dataclasses import dataclass, field

from safetensors import safe_open
from safetensors.torch import save_file

from ..quant_ops import FORMAT_VERSION, FORMATS

MODELS = ("flux", "t5", "clip_l")
META_VERSION = "lowbit.format_version"


class NotALowbitCheckpoint(ValueError):
    """The file is readable safetensors but carries no lowbit metadata."""


@dataclass
class CheckpointInfo:
    path: str
    model: str
    format_version: int
    layers: dict            # layer name -> packed.config() (has "format")
    config: dict | None
    metadata: dict = field(default_factory=dict)

    def format_counts(self) -> dict:
        counts = {}
        for cfg in self.layers.values():
            counts[cfg["format"]] = counts.get(cfg["format"], 0) + 1
        return counts


def _read_metadata(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def read_info(path: str) -> CheckpointInfo:
    """The lowbit metadata of `path`; NotALowbitCheckpoint names the file and what was found instead."""
    meta = _read_metadata(path)
    if META_VERSION not in meta:
        found = "Nunchaku metadata: convert it with `lowbit convert-nunchaku`" \
            if any(k in meta for k in ("quantization_config", "comfy_config")) else \
            f"metadata keys {sorted(meta)[:5]}" if meta else "no metadata"
        raise NotALowbitCheckpoint(f"{path}: not a lowbit checkpoint ({found}; expected '{META_VERSION}' "
                                   f"in the safetensors metadata - make one with `lowbit quantize`)")
    try:
        version = int(meta[META_VERSION])
        layers = json.loads(meta.get("lowbit.layers", "{}"))
        config = json.loads(meta["lowbit.config"]) if "lowbit.config" in meta else None
    except (ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt lowbit metadata ({e})") from None
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: lowbit format version {version} is newer than this comfyui-lowbit supports "
                         f"({FORMAT_VERSION}); update comfyui-lowbit")
    model = meta.get("lowbit.model", "")
    if model not in MODELS:
        raise ValueError(f"{path}: lowbit.model is {model!r}, expected one of {MODELS}")
    for name, cfg in layers.items():
        if cfg.get("format") not in FORMATS:
            raise ValueError(f"{path}: layer {name} has format {cfg.get('format')!r}, expected one of {sorted(FORMATS)}")
    return CheckpointInfo(path, model, version, layers, config, meta)


def load_checkpoint(path: str, device="cpu") -> tuple[dict, CheckpointInfo]:
    """(state dict, info); every quantized layer's tensors are checked against its recorded format."""
    info = read_info(path)
    sd = {}
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            for k in f.keys():
                sd[k] = f.get_tensor(k)
    except Exception as e:
        raise ValueError(f"{path}: cannot read tensors ({e}); the file may be truncated") from None
    packed_layers(sd, info)  # validates
    return sd, info


def packed_layers(sd: dict, info: CheckpointInfo) -> dict:
    """{layer: format object} built from the state dict; errors name the file, layer and tensor."""
    out = {}
    for name, cfg in info.layers.items():
        cls = FORMATS[cfg["format"]]
        tensors = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")
                   and "." not in k[len(name) + 1:]}
        try:
            out[name] = cls.from_tensors(tensors, cfg, layer=name)
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{info.path}: {e}") from None
    return out


def save_checkpoint(path: str, tensors: dict, layers: dict, model: str, config: dict | None,
                    force: bool = False, extra_meta: dict | None = None) -> str:
    """Write atomically (temp file in the same folder, then rename); refuse to overwrite unless `force`."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    meta = {META_VERSION: str(FORMAT_VERSION), "lowbit.model": model, "lowbit.layers": json.dumps(layers)}
    if config is not None:
        meta["lowbit.config"] = json.dumps(config)
    meta.update({k: str(v) for k, v in (extra_meta or {}).items()})
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".lowbit-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def logical_size(sd: dict, info: CheckpointInfo) -> tuple[int, int]:
    """(parameter count, bytes of a BF16 copy): quantized layers at their logical (N, K) shape plus bias,
    other tensors as stored (BF16 bytes for floating-point ones only)."""
    layers = packed_layers(sd, info)
    quant_keys = {f"{n}.{k}" for n, p in layers.items() for k in p.tensors()}
    params = sum(t.numel() for k, t in sd.items() if k not in quant_keys)
    bf16 = sum(2 * t.numel() for k, t in sd.items() if k not in quant_keys and t.is_floating_point())
    for p in layers.values():
        n = p.out_features * p.in_features + (p.out_features if p.bias is not None else 0)
        params, bf16 = params + n, bf16 + 2 * n
    return params, bf16


__all__ = ["CheckpointInfo", "NotALowbitCheckpoint", "read_info", "load_checkpoint", "packed_layers",
           "save_checkpoint", "logical_size"]
