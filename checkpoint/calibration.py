"""Calibration files: per block linear `<layer>.input_absmax` (K,) float32 and, from version 2 on,
`<layer>.input_sample` (tokens, K) bf16, a uniform sample of the layer's input rows in random order; optionally
`block_input.<i>.<name>`: a few whole inputs of the model's first block (FLUX: img, txt, vec, pe_cos, pe_sin;
batch 1 each) for block-wise refinement. Version 1 files (absmax only) still load: their layers are quantized
with the absmax alone."""
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .lowbit_file import unreadable_error, write_error

CALIB_VERSION = "2"
VERSIONS = ("1", "2")
HELD_OUT_EVERY = 8  # every 8th sampled row is held out: it measures, it does not fit
BLOCK_INPUT = "block_input"
BLOCK_INPUT_NAMES = ("img", "txt", "vec", "pe_cos", "pe_sin")


def _block_input_count(keys) -> int:
    """Distinct block input indices among `block_input.<i>.<name>` keys."""
    return len({k.split(".")[1] for k in keys if k.startswith(BLOCK_INPUT + ".")})


def save_calibration(path: str, tensors: dict, samples: int, tokens: int) -> str:
    """Write `tensors` (InputRecorder.tensors()) to `path` (never overwriting; temp file, then rename)."""
    layers = sorted({k.rsplit(".", 1)[0] for k in tensors if not k.startswith(BLOCK_INPUT + ".")})
    items = _block_input_count(tensors)
    if not layers:
        raise ValueError("no activations were recorded: run a sampler (e.g. KSampler) with the MODEL from "
                         "'LowBit Calibrate' before saving, and pass its LATENT output to the save node")
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; choose another name (calibration files are never overwritten)")
    tmp = f"{path}.tmp-{os.getpid()}"
    meta = {"lowbit.calib_version": CALIB_VERSION, "lowbit.samples": str(samples),
            "lowbit.sample_tokens": str(tokens), "lowbit.layers": json.dumps(layers),
            "lowbit.block_inputs": str(items)}
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except Exception as e:
        raise write_error(path, os.path.dirname(os.path.abspath(path)), e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _open(path):
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise unreadable_error(path, e) from None


class CalibrationFile:
    """Lazy per-layer access to a calibration file; `path` None means data-free (every lookup is None).
    Layers the file lacks are collected in `missing`."""

    def __init__(self, path: str | None, max_tokens: int | None = None):
        self.path, self.keys, self.missing, self.version = path, set(), [], None
        self.max_tokens = max_tokens
        if path is None:
            return
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path}: is a folder, expected a calibration .safetensors file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: calibration file not found")
        with _open(path) as f:
            meta = f.metadata() or {}
            self.keys = set(f.keys())
        self.version = meta.get("lowbit.calib_version")
        if self.version is None:
            raise ValueError(f"{path}: not a lowbit calibration file (no 'lowbit.calib_version' metadata)")
        if self.version not in VERSIONS:
            raise ValueError(f"{path}: calibration version {self.version} is not supported (this version reads "
                             f"{', '.join(VERSIONS)}); update comfyui-lowbit")

    def check(self, in_features: dict | None = None) -> None:
        """Every tensor of the file, read once before any work (a quantization takes hours; a damaged file must not
        fail it at the last layer, nor with a linear-algebra error naming no file): finite, with the shape its name
        implies; with `in_features` ({layer: K}), as wide as the layer it is for. ValueError naming file and key."""
        if self.path is None:
            return
        for key in sorted(self.keys):
            layer, _, what = key.rpartition(".")
            t = self._get(key)
            if what in ("input_absmax", "input_sample"):
                dims = 1 if what == "input_absmax" else 2
                if t.dim() != dims or not t.is_floating_point():
                    raise ValueError(f"{self.path}: {key} is {t.dtype} {tuple(t.shape)}, expected a {dims}-D float tensor")
                k = (in_features or {}).get(layer)
                if k is not None and t.shape[-1] != k:
                    raise ValueError(f"{self.path}: {key} has {t.shape[-1]} channels, expected {k} (in_features of "
                                     f"{layer}); the file was recorded on another model")
            if t.is_floating_point():
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    raise ValueError(f"{self.path}: {key} holds {bad} NaN or infinite values; the calibration file is "
                                     f"damaged (record it again with LowBit Calibrate)")

    def _get(self, key):
        with _open(self.path) as f:
            return f.get_tensor(key)

    def absmax(self, layer: str, k: int) -> torch.Tensor | None:
        key = f"{layer}.input_absmax"
        if self.path is None:
            return None
        if key not in self.keys:
            self.missing.append(layer)
            return None
        a = self._get(key).float().reshape(-1)
        if a.numel() != k:
            raise ValueError(f"{self.path}: {key} has {a.numel()} channels, expected {k} (in_features of {layer})")
        return a

    def sample(self, layer: str, k: int):
        """(fit rows, held-out rows) float32 of the layer's input sample, or (None, None) without one.
        Every HELD_OUT_EVERY-th row is held out; max_tokens caps the rows read."""
        key = f"{layer}.input_sample"
        if self.path is None or key not in self.keys:
            return None, None
        x = self._get(key)
        if x.dim() != 2 or x.shape[1] != k:
            raise ValueError(f"{self.path}: {key} has shape {tuple(x.shape)}, expected (tokens, {k}) for {layer}")
        if self.max_tokens is not None:
            x = x[: self.max_tokens]
        x = x.float()
        if not torch.isfinite(x).all():
            raise ValueError(f"{self.path}: {key} contains inf or NaN")
        held = torch.zeros(x.shape[0], dtype=torch.bool)
        held[HELD_OUT_EVERY - 1::HELD_OUT_EVERY] = True
        return (x[~held] if (~held).any() else None), (x[held] if held.any() else None)

    def block_input_count(self) -> int:
        return _block_input_count(self.keys)

    def check_block_inputs(self) -> int:
        """The number of recorded block inputs; none (or no file): ValueError saying why refinement cannot run."""
        if self.path is None:
            raise ValueError("block-wise refinement needs a calibration file with block inputs (--calib)")
        n = self.block_input_count()
        if not n:
            raise ValueError(f"{self.path}: this calibration file holds no block inputs, so it cannot drive block-wise "
                             f"refinement; record a new one with 'LowBit Calibrate' (block_inputs > 0)")
        return n

    def block_inputs(self, names=BLOCK_INPUT_NAMES) -> list[dict]:
        """The recorded first-block inputs, float32, one dict per item; a file without them: ValueError saying so."""
        n = self.check_block_inputs()
        out = []
        for i in range(n):
            item = {}
            for name in names:
                key = f"{BLOCK_INPUT}.{i}.{name}"
                if key not in self.keys:
                    raise ValueError(f"{self.path}: {key} is missing (block input {i} needs {', '.join(names)})")
                t = self._get(key).float()
                if not torch.isfinite(t).all():
                    raise ValueError(f"{self.path}: {key} contains inf or NaN")
                item[name] = t
            out.append(item)
        return out
