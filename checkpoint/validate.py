"""One validation pass for a lowbit checkpoint, run before anything is built from it (inspect, the loaders,
convert-nunchaku): metadata types, every tensor the model implies with its shape and dtype (16-bit ones
included), nothing else, and finite floating-point tensors. Every error is a CheckpointError naming the file,
the tensor or key and what was expected."""
import json
import math
from dataclasses import fields

import torch

from ..quant_ops import FORMAT_VERSION, FORMATS
from . import flux, llm
from .errors import CheckpointError
from .families import LAYOUTS

MODELS = ("flux", "t5", "clip_l", "llm")
META_VERSION = "lowbit.format_version"
FLOATS = (torch.bfloat16, torch.float16, torch.float32)
DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
          "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
          **{n: getattr(torch, t) for n, t in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
             if hasattr(torch, t)}}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_KINDS = {
    "positive int": lambda v: _is_int(v) and v > 0,
    "count": lambda v: _is_int(v) and v >= 0,
    "positive number": lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v) and v > 0,
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "list": lambda v: isinstance(v, list),
    "positive int or null": lambda v: v is None or (_is_int(v) and v > 0),
    "int": _is_int,
}


def _fail(path: str, what: str):
    raise CheckpointError(f"{path}: {what}")


def _json(path: str, meta: dict, key: str, kind: type, required: bool = True):
    if key not in meta:
        if required:
            _fail(path, f"metadata lacks '{key}'")
        return None
    try:
        value = json.loads(meta[key])
    except ValueError as e:
        _fail(path, f"metadata '{key}' is not JSON ({e})")
    if not isinstance(value, kind):
        _fail(path, f"metadata '{key}' is a JSON {type(value).__name__}, expected a JSON {kind.__name__}")
    return value


def _check_fields(path: str, where: str, values: dict, required: dict, optional: dict) -> None:
    for key in required:
        if key not in values:
            _fail(path, f"{where} lacks '{key}' ({required[key]})")
    for key, kind in {**required, **optional}.items():
        if key in values and not _KINDS[kind](values[key]):
            _fail(path, f"{where} '{key}' is {values[key]!r}, expected a {kind}")


def _layer_fields(cls) -> dict:
    """{config key: kind} of a packed format's lowbit.layers entry besides format / in_features / out_features."""
    kinds = {bool: "bool", int: "count"}
    return {f.name: kinds[type(f.default)] for f in fields(cls) if f.name not in cls.TENSORS}


def parse_metadata(path: str, meta: dict) -> tuple:
    """(model, format_version, layers, config) from a lowbit file's metadata, every type checked."""
    raw = meta[META_VERSION]
    try:
        version = int(raw)
    except ValueError:
        _fail(path, f"'{META_VERSION}' is {raw!r}, expected an integer")
    if version < 1:
        _fail(path, f"lowbit format version {version} does not exist (versions start at 1)")
    if version > FORMAT_VERSION:
        _fail(path, f"lowbit format version {version} is newer than this comfyui-lowbit supports ({FORMAT_VERSION}); "
                    f"update comfyui-lowbit")
    model = meta.get("lowbit.model", "")
    if model not in MODELS:
        _fail(path, f"lowbit.model is {model!r}, expected one of {MODELS}")
    layers = _json(path, meta, "lowbit.layers", dict)
    for name, cfg in layers.items():
        where = f"lowbit.layers[{name!r}]"
        if not isinstance(cfg, dict):
            _fail(path, f"{where} is a JSON {type(cfg).__name__}, expected a JSON dict")
        fmt = cfg.get("format")
        if fmt not in FORMATS:
            _fail(path, f"{where} has format {fmt!r}, expected one of {sorted(FORMATS)}")
        extra = _layer_fields(FORMATS[fmt])
        _check_fields(path, where, cfg, {"in_features": "positive int", "out_features": "positive int"}, extra)
        unknown = sorted(set(cfg) - {"format", "in_features", "out_features"} - set(extra))
        if unknown:
            _fail(path, f"{where} has unknown key {unknown[0]!r} for format {fmt} (known: {sorted(extra)})")
    config = _json(path, meta, "lowbit.config", dict, required=False)
    if config is not None:
        layout = LAYOUTS[model]
        _check_fields(path, "lowbit.config", config, layout.CONFIG_TYPES, layout.OPTIONAL_CONFIG)
        if model == "flux" and config["hidden_size"] != config["num_heads"] * flux.HEAD_DIM:
            _fail(path, f"lowbit.config hidden_size {config['hidden_size']} with num_heads {config['num_heads']} is "
                        f"not FLUX's head dim {flux.HEAD_DIM}")
        if model == "flux" and config.get("image_model", "flux") not in flux.IMAGE_MODELS:
            _fail(path, f"lowbit.config image_model is {config['image_model']!r}, expected one of {flux.IMAGE_MODELS}")
        if model == "llm" and config["model_type"] not in llm.MODEL_TYPES:
            _fail(path, f"lowbit.config model_type is {config['model_type']!r}, expected one of {llm.MODEL_TYPES} "
                        f"(ComfyUI's FLUX.2 text encoder classes)")
    return model, version, layers, config


def _logical_shapes(spec: dict, layers: dict) -> dict:
    """{name: shape} of the 16-bit model the file stands for (a quantized layer's weight at (out, in))."""
    shapes = {k: s for k, (s, _) in spec.items()}
    for name, cfg in layers.items():
        shapes[f"{name}.weight"] = (cfg["out_features"], cfg["in_features"])
        for end in FORMATS[cfg["format"]].TENSORS:
            if end not in ("weight", "bias"):
                shapes.pop(f"{name}.{end}", None)
    return shapes


def _model_config(path: str, model: str, config: dict | None, spec: dict, layers: dict) -> dict:
    """The metadata's config (FLUX, T5), or one inferred from the tensor shapes (CLIP-L, or no metadata config;
    a metadata config must then agree with it)."""
    if config is not None and model in ("flux", "t5", "llm"):
        return config
    try:
        inferred = LAYOUTS[model].infer_config(_logical_shapes(spec, layers))
    except ValueError as e:
        _fail(path, str(e))
    for key, value in (config or {}).items():
        if key in inferred and inferred[key] != value:
            _fail(path, f"lowbit.config {key} is {value!r}, but the tensors give {inferred[key]!r}")
    return inferred


def _packed_weight_shape(fmt: str, n: int, k: int):
    per_byte = FORMATS[fmt].CODES_PER_BYTE
    return (n, k // per_byte) if k % per_byte == 0 else None


def check_tensors(path: str, model: str, layers: dict, config: dict | None, spec: dict) -> dict:
    """Check the tensor names, shapes and dtypes of a file (spec: {key: (shape tuple, torch dtype)}) against
    what its model, config and lowbit.layers imply. Returns the model config used."""
    config = _model_config(path, model, config, spec, layers)
    layout = LAYOUTS[model]
    try:
        model16 = {k: tuple(s) for k, s in layout.expected_shapes(config).items()}
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        _fail(path, f"lowbit.config does not describe a {model} model ({type(e).__name__}: {e})")
    expected = {}  # key -> (shape, dtype or None for any float)
    for name, cfg in layers.items():
        w = f"{name}.weight"
        if w not in model16 or len(model16[w]) != 2:
            _fail(path, f"lowbit.layers names {name}, which is not a linear layer of this {model} model")
        n, k = model16[w]
        if (cfg["out_features"], cfg["in_features"]) != (n, k):
            _fail(path, f"lowbit.layers[{name!r}] says out_features {cfg['out_features']}, in_features "
                        f"{cfg['in_features']}; the {model} config gives {name} shape ({n}, {k})")
    for key, shape in model16.items():
        layer, _, end = key.rpartition(".")
        if layer in layers and end in ("weight", "bias"):
            continue
        expected[key] = (shape, None)
    missing = [k for k in expected if k not in spec]
    if missing:
        _fail(path, f"tensor {missing[0]} (shape {expected[missing[0]][0]}) is missing"
                    + (f" ({len(missing)} missing in all)" if len(missing) > 1 else "")
                    + f"; not a complete {model} checkpoint")
    for key, (shape, _) in expected.items():
        have, dtype = spec[key]
        if have != shape:
            _fail(path, f"tensor {key} has shape {have}, expected {shape} for this {model} config")
        if dtype not in FLOATS:
            _fail(path, f"tensor {key} has dtype {dtype}, expected a 16- or 32-bit float")
    for name, cfg in layers.items():
        _check_packed(path, name, cfg, spec)
        expected.update({f"{name}.{end}": None for end in FORMATS[cfg["format"]].TENSORS})
    optional = set(getattr(layout, "OPTIONAL_KEYS", ()))
    unexpected = sorted(k for k in spec if k not in expected and k not in optional)
    if unexpected:
        _fail(path, f"unexpected tensor {unexpected[0]}"
                    + (f" ({len(unexpected)} unexpected in all)" if len(unexpected) > 1 else "")
                    + f"; not part of a {model} model with this config and lowbit.layers")
    return config


def _check_packed(path: str, name: str, cfg: dict, spec: dict) -> None:
    fmt = cfg["format"]
    cls = FORMATS[fmt]
    n, k = cfg["out_features"], cfg["in_features"]
    have = {end: spec[f"{name}.{end}"] for end in cls.TENSORS if f"{name}.{end}" in spec}
    for end in cls.TENSORS:
        if end not in have and end not in cls.OPTIONAL:
            _fail(path, f"tensor {name}.{end} is missing ({fmt} layer {name})")
    want = _packed_weight_shape(fmt, n, k)
    shape, dtype = have["weight"]
    if want is None or (shape, dtype) != (want, torch.uint8):
        _fail(path, f"tensor {name}.weight is {shape} {dtype}, expected the packed {fmt} weight uint8 {want} "
                    f"(out_features {n}, in_features {k})")
    meta = {end: torch.empty(s, dtype=d, device="meta") for end, (s, d) in have.items()}
    try:
        cls.from_tensors(meta, cfg, layer=name)
    except (ValueError, TypeError) as e:
        _fail(path, f"{e} ({fmt} layer)")


def check_finite(path: str, tensors: dict) -> None:
    """Every floating-point tensor is finite: the 16-bit weights, norms, biases and embedders, and the scales,
    smoothing factors and low-rank branches of the quantized layers (their packed weights are integer codes)."""
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            _fail(path, f"tensor {key} holds {bad} NaN or infinite value{'s' if bad > 1 else ''}; the file is damaged")


def spec_of(tensors: dict) -> dict:
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


def validate_state_dict(path: str, model: str, layers: dict, config: dict | None, tensors: dict) -> dict:
    """check_tensors and check_finite on tensors in memory (a conversion's result); the model config."""
    config = check_tensors(path, model, layers, config, spec_of(tensors))
    check_finite(path, tensors)
    return config
