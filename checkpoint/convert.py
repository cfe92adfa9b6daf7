"""16-bit FLUX / T5 / CLIP-L safetensors -> lowbit checkpoint, one layer at a time.

Tensors are read lazily (the input is reopened per layer, so its pages are not kept mapped), quantized and
kept; peak memory is about the output size plus one layer in float32. The output is written to a temp file
and renamed (checkpoint.save_checkpoint): on any error the destination is untouched.
"""
import contextlib
import ctypes
import ctypes.util
import glob
import json
import logging
import math
import os
import time

import torch
from safetensors import safe_open

from ..quant_ops import QUANT_FORMATS, module_from_packed, quantize_weight
from . import clip_l, flux, llm, t5
from .calibration import CalibrationFile
from .families import DEFAULT_RANK, FAMILIES, family_of, packed_bytes
from .errors import CheckpointError
from .lowbit_file import META_VERSION, check_output, save_checkpoint, unreadable_error

log = logging.getLogger("comfyui_lowbit")

DTYPE = torch.bfloat16
_PASSTHROUGH = ("position_ids",) + llm.PASSTHROUGH  # non-float tensors copied as they are
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
             if hasattr(torch, n))
# ComfyUI "scaled fp8" files: per-tensor `<L>.scale_weight` multiplies `<L>.weight`; these keys are consumed
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_IGNORED = ("scaled_fp8",)


def _libc_trim():
    """glibc keeps freed float32 layer copies in fragmented arenas (RSS grew to ~6x the output on a mid-size
    model); malloc_trim hands them back. A no-op elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _libc_trim()


def _open(path: str):
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise unreadable_error(path, e) from None


class _Source:
    """Lazy access to the input: shapes from the headers, tensors read on demand. `path` is one safetensors
    file, a sharded model's `*.safetensors.index.json`, or a folder holding either (diffusers `transformer/`)."""

    def __init__(self, path: str):
        self.path = path
        self.files = {}  # key -> file
        self.shapes = {}
        self.dtypes = {}  # safetensors dtype names ("BF16", "F8_E4M3", "I64", ...)
        files = _shards(path)
        for file in files:
            with _open(file) as f:
                _refuse_quantized(path, f.metadata() or {}, f.keys())
                for k in f.keys():
                    try:
                        entry = f.get_slice(k)
                        self.shapes[k] = tuple(entry.get_shape())
                        self.dtypes[k] = entry.get_dtype()
                    except Exception as e:
                        raise ValueError(f"{file}: tensor {k}: unreadable header entry ({e})") from None
                    self.files[k] = file
        self.keys = list(self.files)
        self.size = sum(os.path.getsize(f) for f in files)

    @contextlib.contextmanager
    def reader(self, device=None):
        """read(key) -> float32 tensor; the files are opened once per `with` (one layer) and closed after. device:
        float tensors go there as stored (16 or 8 bits) and are widened and checked there (a GPU does it faster
        than the host, and half the bytes cross the bus)."""
        handles = {}
        if device is not None and torch.device(device).type == "cpu":
            device = None

        def read(key):
            file = self.files[key]
            if file not in handles:
                handles[file] = stack.enter_context(_open(file))
            return self._read(handles[file], file, key, device)

        with contextlib.ExitStack() as stack:
            yield read

    def _read(self, f, file: str, key: str, device=None) -> torch.Tensor:
        try:
            t = f.get_tensor(key)
        except Exception as e:
            raise ValueError(f"{file}: tensor {key}: cannot read data ({e}); the file may be truncated") from None
        if not t.is_floating_point():
            if key.endswith(_PASSTHROUGH):
                return t
            raise ValueError(f"{file}: tensor {key} has dtype {t.dtype}, expected a float type")
        t = (t if device is None else t.to(device)).float()
        if key.endswith(".weight"):
            for suffix in _SCALE_SUFFIXES:
                sk = key[: -len(".weight")] + suffix
                if sk in self.shapes:
                    t = t * f.get_tensor(sk).float().to(t.device)
        if not torch.isfinite(t).all():
            raise ValueError(f"{file}: tensor {key} contains inf or NaN")
        return t


class FluxSource:
    """The 16-bit FLUX transformer of a quantize_file input (any layout it reads), tensors by BFL name, read on
    demand (block-wise refinement reads one block at a time)."""

    def __init__(self, path: str):
        self.source = _Source(str(path))
        model, self.plan, _, self.config, self.family = _plan(self.source)
        if model != "flux":
            raise ValueError(f"{path}: a {model} file, expected a FLUX transformer")

    def tensors(self, prefix: str) -> dict:
        """{name without `prefix`: float32 tensor} of every tensor whose BFL name starts with `prefix`."""
        names = [n for n in self.plan if n.startswith(prefix)]
        with self.source.reader() as read:
            return {n[len(prefix):]: _fetch(read, *self.plan[n]) for n in names}


def inspect_source(path: str) -> tuple:
    """(lowbit.model, config, family) of a 16-bit model file (one safetensors file, a shard index or a diffusers
    folder) from its headers alone, checked as `lowbit quantize` checks it; no tensor data is read."""
    model, _, _, config, family = _plan(_Source(str(path)))
    return model, config, family


def _refuse_quantized(path: str, meta: dict, keys) -> None:
    """An input that is already quantized gets one line saying so, not a list of unexpected tensors."""
    from .nunchaku import is_nunchaku

    if META_VERSION in meta:
        raise CheckpointError(f"{path} is already a lowbit {meta.get('lowbit.model', '?')!r} checkpoint; "
                              f"pick the 16-bit model it was made from to quantize")
    if is_nunchaku(meta) or any(k.endswith(".qweight") for k in keys):
        raise CheckpointError(f"{path} is already quantized (a Nunchaku SVDQuant checkpoint); load it directly or "
                              f"convert it with `lowbit convert-nunchaku`")


def _shards(path: str) -> list:
    if os.path.isdir(path):
        index = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if index:
            return _shards(index[0])
        if len(files) != 1:
            raise ValueError(f"{path}: a folder must hold one .safetensors file or a *.safetensors.index.json "
                             f"(found {len(files)} .safetensors files)")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".json"):
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}: not a safetensors index (expected a JSON 'weight_map'; {e})") from None
        files = [os.path.join(os.path.dirname(path), f) for f in sorted(set(weight_map.values()))]
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{f}: shard listed in {path} not found")
        return files
    return [path]


def _plan(src: _Source):
    """(model, plan {out name: ([source keys], swap)}, {out name: shape}, config, family)."""
    keys = [k for k in src.keys if not k.endswith(_SCALE_SUFFIXES + (".scale_input", ".input_scale")) and k not in _IGNORED]
    fp = flux.strip_prefix(keys)
    fkeys = [k[len(fp):] for k in keys if k.startswith(fp)]
    kind = flux.naming(fkeys)
    if kind is not None:
        if fp and len(fkeys) < len(keys):
            log.warning("%s: ignoring %d tensors outside %r (VAE / text encoders of a full checkpoint)",
                        src.path, len(keys) - len(fkeys), fp)
        plan = flux.bfl_plan(fkeys) if kind == "bfl" else flux.diffusers_plan(fkeys)
        plan = {k: ([fp + s for s in srcs], swap) for k, (srcs, swap) in plan.items()}
        shapes = _out_shapes(src, plan)
        config = flux.infer_config(shapes)
        _check_shapes(src.path, shapes, flux.expected_shapes(config), ())
        return "flux", plan, shapes, config, family_of("flux", config)
    tp = t5.strip_prefix(keys)
    tkeys = [k[len(tp):] for k in keys if k.startswith(tp)]
    if t5.is_t5(tkeys):
        plan = {k: ([tp + k], False) for k in tkeys}
        shapes = _out_shapes(src, plan)
        config = t5.infer_config(shapes)
        _check_shapes(src.path, shapes, t5.expected_shapes(config), t5.OPTIONAL_KEYS)
        return "t5", plan, shapes, config, FAMILIES["t5"]
    if clip_l.is_clip_l(keys):
        plan = {k: ([k], False) for k in keys}
        shapes = _out_shapes(src, plan)
        config = clip_l.infer_config(shapes)
        _check_shapes(src.path, shapes, clip_l.expected_shapes(config), clip_l.OPTIONAL_KEYS)
        return "clip_l", plan, shapes, config, FAMILIES["clip_l"]
    lp = llm.strip_prefix(keys)
    plan = llm.source_plan(keys, lp)
    if llm.is_llm(plan):
        shapes = _out_shapes(src, plan)
        config = llm.infer_config(shapes)
        _check_shapes(src.path, shapes, llm.expected_shapes(config), llm.OPTIONAL_KEYS)
        return "llm", plan, shapes, config, family_of("llm", config)
    raise ValueError(f"{src.path}: neither a FLUX transformer (BFL keys {flux.DETECT_KEYS} or diffusers keys "
                     f"{flux.DIFFUSERS_DETECT_KEYS}) nor a T5 encoder (keys {t5.DETECT_KEYS}) nor CLIP-L nor a FLUX.2 "
                     f"text encoder (keys {llm.DETECT_KEYS}); found e.g. {sorted(keys)[:3]}")


def _out_shapes(src: _Source, plan: dict) -> dict:
    out = {}
    for name, (srcs, _) in plan.items():
        shapes = [src.shapes[s] for s in srcs]
        if any(s[1:] != shapes[0][1:] for s in shapes):
            raise ValueError(f"{src.path}: {name}: cannot fuse {srcs} with shapes {shapes}")
        out[name] = (sum(s[0] for s in shapes),) + tuple(shapes[0][1:]) if shapes[0] else ()
    return out


def _check_shapes(path: str, have: dict, expected: dict, optional) -> None:
    missing = sorted(set(expected) - set(have))
    if missing:
        raise ValueError(f"{path}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    extra = sorted(set(have) - set(expected) - set(optional))
    if extra:
        raise ValueError(f"{path}: unexpected tensor {extra[0]} ({len(extra)} unexpected in all)")
    for k, s in expected.items():
        if tuple(have[k]) != tuple(s):
            raise ValueError(f"{path}: tensor {k} has shape {tuple(have[k])}, expected {tuple(s)} "
                             f"for the model inferred from img_in / shared / block shapes")


def _units(plan: dict) -> list:
    """Output tensors grouped by layer (name without the last component), in file order."""
    units = {}
    for name in plan:
        layer, _, end = name.rpartition(".")
        units.setdefault(layer, {})[end] = name
    return list(units.items())


def quantize_file(src, dst, fmt, rank=32, calib=None, progress=None, force=False, device="cpu",
                  group_size=64, options=None, calib_tokens=None, max_bytes=None, extra_meta=None) -> dict:
    """Quantize the FLUX transformer or T5 encoder in `src` into a lowbit checkpoint at `dst`.

    fmt: block format for FLUX ("svdq_w4a4", "ternary" or "w4a16"; modulation layers are always w4a16);
    T5 is always w4a16. calib: calibration statistics file (data-free when None; layers it lacks are
    quantized data-free, with one warning); a version 2 file's input samples feed the calibrated quantizers
    (calib_inputs) and, held out, the per-layer output errors of the summary. calib_tokens caps the sampled
    rows read per layer. progress(done, total) is called after every layer.
    options: extra quantizer options for the svdq_w4a4 / ternary layers (e.g. {"iters": 3, "gptq": False}).
    max_bytes: a size budget: each quantizable layer takes the block format, w4a16 or 16-bit, chosen by measured
    error per byte (checkpoint/budget.py) so that the file fits; the layers are measured in a first pass (progress
    counts it), the plan goes into the metadata (lowbit.plan). extra_meta: more metadata for the file.
    Returns a summary dict (sizes in bytes, seconds, layer_errors {layer: relative output error on the
    held-out rows}).
    """
    t0 = time.time()
    src, dst = str(src), str(dst)
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"format must be one of {QUANT_FORMATS}, got {fmt!r}")
    if group_size not in (64, 128):
        raise ValueError(f"group size must be 64 or 128, got {group_size}")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    # everything knowable before the first layer is checked here: a full FLUX takes hours to quantize
    inputs = _shards(src) + [src] + ([calib] if calib else [])
    check_output(dst, inputs, force)
    source = _Source(src)
    try:
        model, plan, shapes, config, family = _plan(source)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(str(e) if str(e).startswith(src) else f"{src}: {e}") from None
    if model != "flux" and fmt != "w4a16":
        log.warning("%s: text encoders are quantized weight-only (w4a16), not %s", src, fmt)
    calib_stats = CalibrationFile(calib, calib_tokens)
    units = _units(plan)
    calib_stats.check({layer: shapes[parts["weight"]][1] for layer, parts in units
                       if "weight" in parts and len(shapes[parts["weight"]]) == 2})
    check_output(dst, inputs, force, needed_bytes=_output_bytes(units, shapes, family.layer_format, fmt, rank, group_size))

    def quantize_layer(layer, lfmt, w, b):
        """(packed, held-out rows or None) of one linear in format lfmt, as the checkpoint holds it."""
        try:
            opts = {"group_size": group_size} if lfmt == "w4a16" else \
                {**(options or {}), **family.layer_options(layer, lfmt)}
            absmax = fit = held = None
            if lfmt != "w4a16":
                absmax = calib_stats.absmax(layer, w.shape[1])
                fit, held = calib_stats.sample(layer, w.shape[1])
                if fit is not None:
                    opts["calib_inputs"] = fit
            return quantize_weight(w, b, lfmt, rank, absmax, dtype=DTYPE, device=device, **opts), held
        except ValueError as e:
            raise ValueError(f"{src}: layer {layer}: {e}") from None

    fmt_of, offset, plan_meta = family.layer_format, 0, None
    if max_bytes is not None:
        check_output(dst, inputs, force, needed_bytes=max_bytes)  # before the measuring pass, not after
        fmt_of, offset, plan_meta = _budget_pass(source, plan, units, shapes, family, fmt, rank, group_size, max_bytes,
                                                 calib_stats, quantize_layer, device, progress)
        check_output(dst, inputs, force, needed_bytes=_output_bytes(units, shapes, fmt_of, fmt, rank, group_size))
    out, layers, errors = {}, {}, {}
    for done, (layer, parts) in enumerate(units, 1):
        with source.reader(device) as read:
            tensors = {end: _fetch(read, *plan[name]) for end, name in parts.items()}
        lfmt = fmt_of(layer, fmt) if "weight" in tensors and tensors["weight"].dim() == 2 else None
        if lfmt is not None:
            w, b = tensors.pop("weight"), tensors.pop("bias", None)
            if tensors:
                raise ValueError(f"{src}: layer {layer}: unexpected tensors {sorted(tensors)} next to its weight")
            packed, held = quantize_layer(layer, lfmt, w, b)
            if held is not None:
                errors[layer] = held_out_error(packed, w, b, held)
            packed = packed.to("cpu")
            out.update({f"{layer}.{k}": v for k, v in packed.tensors().items()})
            layers[layer] = packed.config()
        else:
            out.update({parts[end]: t.to(DTYPE).cpu() if t.is_floating_point() else t for end, t in tensors.items()})
        del tensors
        if _TRIM is not None:
            _TRIM(0)
        if progress is not None:
            progress(offset + done, offset + len(units))
    if calib_stats.missing:
        log.warning("%s: no statistics for %d of the quantized layers (e.g. %s); those were quantized data-free",
                    calib, len(calib_stats.missing), calib_stats.missing[0])
    args = {"format": fmt, "rank": rank, "group_size": group_size, "calib": os.path.basename(calib) if calib else None,
            **({"max_bytes": max_bytes} if max_bytes is not None else {}),
            **{k: v for k, v in (options or {}).items() if isinstance(v, (bool, int, float))}}
    meta = {"lowbit.source": os.path.basename(src), "lowbit.args": json.dumps(args), **(extra_meta or {})}
    if plan_meta is not None:
        meta["lowbit.plan"] = plan_meta
    save_checkpoint(dst, out, layers, model, config, force=force, extra_meta=meta)
    counts = {}
    for cfg in layers.values():
        counts[cfg["format"]] = counts.get(cfg["format"], 0) + 1
    in_bytes, out_bytes = source.size, os.path.getsize(dst)
    return {"src": src, "dst": dst, "model": model, "family": family.name, "config": config, "layer_counts": counts,
            "layers_total": len(units), "layers_16bit": len(units) - len(layers),
            "input_bytes": in_bytes, "output_bytes": out_bytes, "ratio": in_bytes / max(out_bytes, 1),
            "seconds": time.time() - t0, "calib_missing": list(calib_stats.missing), "layer_errors": errors,
            "plan": None if plan_meta is None else json.loads(plan_meta)}


def _budget_pass(source, plan, units, shapes, family, fmt, rank, group_size, max_bytes, calib_stats, quantize_layer,
                 device, progress):
    """Measure every candidate format of every quantizable layer and choose the plan (checkpoint/budget.py).
    Returns (format of a layer, progress offset, lowbit.plan JSON)."""
    from . import budget

    linear = {layer: parts for layer, parts in units if "weight" in parts and len(shapes[parts["weight"]]) == 2}
    cands = {layer: budget.candidates(family, layer, fmt) for layer in linear}
    cands = {layer: c for layer, c in cands.items() if c}
    dtypes = {name: source.dtypes.get(srcs[0], "") for name, (srcs, _) in plan.items()}
    fixed = budget.fixed_bytes(shapes, dtypes, set(cands))
    reserve = budget.header_reserve(shapes, list(cands))
    floor = 0
    for layer, c in cands.items():
        n, k = shapes[linear[layer]["weight"]]
        floor += min(budget.option_bytes(f, n, k, rank, group_size, "bias" in linear[layer]) for f in c)
    budget.feasible(max_bytes, floor, fixed, reserve)
    options, metric = {}, set()
    for done, (layer, c) in enumerate(cands.items(), 1):
        parts = linear[layer]
        with source.reader(device) as read:
            w = _fetch(read, *plan[parts["weight"]])
            b = _fetch(read, *plan[parts["bias"]]) if "bias" in parts else None
        rows = calib_stats.sample(layer, w.shape[1])[1]
        metric.add("held-out calibration rows" if rows is not None else
                   f"{budget.SYNTH_TOKENS} seeded N(0, 1) rows (GELU of them for GELU inputs)")
        if rows is None:
            rows = budget.synthetic_rows(layer, w.shape[1], bool(family.layer_options(layer, "svdq_w4a4")))
        wd, bd, rows = w.to(device), None if b is None else b.to(device), rows.to(device)
        opts = []
        for f in c:
            if f is None:
                n, k = w.shape
                opts.append(budget.Option(None, budget.option_bytes(None, n, k, rank, group_size, b is not None),
                                          budget.output_error(None, wd, bd, rows, DTYPE)))
                continue
            packed, _ = quantize_layer(layer, f, w, b)
            opts.append(budget.Option(f, packed.nbytes, budget.output_error(packed, wd, bd, rows, DTYPE)))
            del packed
        options[layer] = opts
        del w, b, wd, bd, rows
        if _TRIM is not None:
            _TRIM(0)
        if progress is not None:
            progress(done, len(cands) + len(units))
    calib_stats.missing.clear()  # the main pass reports them
    metric = f"relative squared output error per layer, summed; inputs: {' and '.join(sorted(metric))}"
    chosen, meta = budget.plan(options, family, fmt, max_bytes, fixed, reserve, metric)
    return (lambda layer, f: chosen[layer].fmt if layer in chosen else family.layer_format(layer, f)), len(cands), meta


@torch.no_grad()
def held_out_error(packed, w, b, x) -> float:
    """Relative L2 error of the quantized layer's output against the float layer's on rows x."""
    x = x.to(packed.weight.device)
    y = x @ w.to(x.device).float().t() + (0 if b is None else b.to(x.device).float())
    yq = module_from_packed(packed)(x.to(packed.dtype)).float()
    return ((yq - y).norm() / y.norm().clamp_min(1e-30)).item()


def output_estimate(src, fmt: str, rank: int = 32, group_size: int = 64) -> int:
    """The upper estimate of the checkpoint's size that quantize_file checks the free space against (headers only)."""
    _, plan, shapes, _, family = _plan(_Source(str(src)))
    return _output_bytes(_units(plan), shapes, family.layer_format, fmt, rank, group_size)


def _output_bytes(units, shapes, fmt_of, fmt, rank, group_size) -> int:
    """An upper estimate of the checkpoint's size (w4a16 counted with zero points), for the free-space check."""
    total = 1 << 20  # header
    for layer, parts in units:
        w = parts.get("weight")
        lfmt = fmt_of(layer, fmt) if w is not None and len(shapes[w]) == 2 else None
        if lfmt is None:
            total += sum(2 * math.prod(shapes[name]) for name in parts.values())
            continue
        n, k = shapes[w]
        total += packed_bytes(lfmt, n, k, rank, group_size, bias=True, zeros=True)
    return total


def _fetch(read, srcs, swap) -> torch.Tensor:
    parts = [read(s) for s in srcs]
    t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if swap:  # diffusers' final norm is (scale, shift); BFL's final_layer.adaLN_modulation.1 is (shift, scale)
        scale, shift = t.chunk(2, dim=0)
        t = torch.cat([shift, scale], dim=0)
    return t
