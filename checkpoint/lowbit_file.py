"""Lowbit checkpoint files: one safetensors file, metadata naming the format of every quantized layer."""
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field

from safetensors import safe_open
from safetensors.torch import save_file

from ..quant_ops import FORMAT_VERSION, FORMATS
from .errors import CheckpointError, NotALowbitCheckpoint
from .families import family_of
from .validate import DTYPES, META_VERSION, MODELS, check_finite, check_tensors, parse_metadata, validate_state_dict


@dataclass
class CheckpointInfo:
    path: str
    model: str
    format_version: int
    layers: dict            # layer name -> packed.config() (has "format")
    config: dict | None
    metadata: dict = field(default_factory=dict)

    @property
    def family(self):
        """The model family (checkpoint/families.py): FLUX.1 / FLUX.2 / T5 / CLIP-L / FLUX.2 text encoder."""
        return family_of(self.model, self.config)

    def format_counts(self) -> dict:
        counts = {}
        for cfg in self.layers.values():
            counts[cfg["format"]] = counts.get(cfg["format"], 0) + 1
        return counts


def unreadable_error(path: str, e: Exception) -> CheckpointError:
    why = str(e)
    if "not fully covered" in why or "incomplete" in why:
        why = f"shorter than its header says: truncated, e.g. an unfinished download ({why})"
    elif "invalid" in why and ("offset" in why or "shape" in why):
        why = f"its header's shapes, dtypes and offsets disagree ({why})"
    return CheckpointError(f"{path}: not a readable safetensors file: {why}")


def check_path(path: str) -> None:
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder, expected a .safetensors file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")


def read_header(path: str) -> tuple[dict, dict]:
    """(metadata, {key: (shape, torch dtype)}) without reading tensor data."""
    check_path(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            raw = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise unreadable_error(path, e) from None
    spec = {}
    for k, (shape, dtype) in raw.items():
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {k} has dtype {dtype}, which no lowbit checkpoint holds")
        spec[k] = (shape, DTYPES[dtype])
    return meta, spec


def _info(path: str, meta: dict) -> CheckpointInfo:
    if META_VERSION not in meta:
        found = "Nunchaku metadata: convert it with `lowbit convert-nunchaku`" \
            if any(k in meta for k in ("quantization_config", "comfy_config")) else \
            f"metadata keys {sorted(meta)[:5]}" if meta else "no metadata"
        raise NotALowbitCheckpoint(f"{path}: not a lowbit checkpoint ({found}; expected '{META_VERSION}' "
                                   f"in the safetensors metadata - make one with `lowbit quantize`)")
    model, version, layers, config = parse_metadata(path, meta)
    return CheckpointInfo(path, model, version, layers, config, meta)


def read_info(path: str) -> CheckpointInfo:
    """The lowbit metadata of `path`, types checked; NotALowbitCheckpoint names the file and what was found."""
    return _info(path, read_header(path)[0])


def load_checkpoint(path: str, device="cpu") -> tuple[dict, CheckpointInfo]:
    """(state dict, info) after the whole validation: metadata, every tensor's name, shape and dtype (before
    any data is read), then every floating-point tensor finite."""
    meta, spec = read_header(path)
    info = _info(path, meta)
    check_tensors(path, info.model, info.layers, info.config, spec)
    sd = {}
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            for k in f.keys():
                sd[k] = f.get_tensor(k)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensors ({e}); the file may be truncated") from None
    check_finite(path, sd)
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
            raise CheckpointError(f"{info.path}: {e}") from None
    return out


def check_output(path: str, inputs=(), force: bool = False, needed_bytes: int = 0) -> str:
    """Where a checkpoint will be written, checked before any work: not a folder, its folder exists and takes a
    new file, not one of `inputs`, not an existing file unless `force`, room for `needed_bytes`. The absolute path."""
    out = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(out):
        raise IsADirectoryError(f"{path}: is a folder; give the output file's name (e.g. {os.path.join(path, 'model-lowbit.safetensors')})")
    if os.path.islink(out) and os.path.isfile(out):
        out = os.path.realpath(out)  # a link to a file: --force replaces that file and the link stays
    if os.path.lexists(out) and not os.path.isfile(out):
        raise FileExistsError(f"{path}: is {_file_kind(out)}, not a regular file; lowbit never replaces one (with "
                              f"--force or not): give the output file's name")
    folder = os.path.dirname(out)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: the output folder {folder} does not exist")
    for src in inputs:
        src = os.path.abspath(os.fspath(src))
        if src == out or (os.path.exists(src) and os.path.exists(out) and os.path.samefile(src, out)):
            raise ValueError(f"{path}: output would overwrite the input {src}")
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    try:  # the only sure test that the folder takes a new file (permissions, ACLs, read-only mounts)
        fd, probe = tempfile.mkstemp(prefix=".lowbit-", suffix=".tmp", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"{path}: cannot write to the output folder {folder} ({e.strerror or e})") from None
    free = shutil.disk_usage(folder).free
    if needed_bytes > free:
        raise OSError(f"{path}: the output needs about {needed_bytes / 1e9:.2f} GB but {folder} has "
                      f"{free / 1e9:.2f} GB free")
    return out


def _file_kind(path: str) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "a symbolic link to a missing file"
    for test, kind in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def save_checkpoint(path: str, tensors: dict, layers: dict, model: str, config: dict | None,
                    force: bool = False, extra_meta: dict | None = None) -> str:
    """Validate (validate.py, as a reader would), then write atomically (temp file in the same folder, then
    rename); refuse to overwrite unless `force`."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    target = check_output(path, force=force)
    validate_state_dict(path, model, layers, config, tensors)
    meta = {META_VERSION: str(FORMAT_VERSION), "lowbit.model": model, "lowbit.layers": json.dumps(layers)}
    if config is not None:
        meta["lowbit.config"] = json.dumps(config)
    meta.update({k: str(v) for k, v in (extra_meta or {}).items()})
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    folder = os.path.dirname(target)
    fd, tmp = tempfile.mkstemp(prefix=".lowbit-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, target)
    except BaseException as e:  # Ctrl-C included: never leave the temp file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, Exception):
            raise write_error(path, folder, e) from None
        raise
    return path


def write_error(path: str, folder: str, e: Exception) -> OSError:
    """One line naming the file a failed write was for (safetensors' own error names none, e.g. a disk that
    fills during the write); the temp file is gone and `path` untouched."""
    why = str(e).splitlines()[0] if str(e) else type(e).__name__
    if getattr(e, "errno", None) == 28 or "os error 28" in why or "No space left" in why:
        why = f"the disk is full ({shutil.disk_usage(folder).free / 1e6:.0f} MB free in {folder})"
    return OSError(f"{path}: writing it failed: {why}; nothing was written (an existing {os.path.basename(path)} is "
                   f"unchanged)")


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


__all__ = ["CheckpointInfo", "CheckpointError", "NotALowbitCheckpoint", "check_output", "check_path",
           "read_header", "read_info", "load_checkpoint", "packed_layers", "save_checkpoint", "logical_size"]
