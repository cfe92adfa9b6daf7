"""Quantize-on-load cache: a 16-bit (or fp8) model quantized once by quantize_file, kept as an ordinary lowbit
checkpoint in a cache folder, found again by what the source holds and the options it was made with.

The key. A source is identified by its content, cheaply: the file size, the whole safetensors header (every
tensor's name, dtype, shape and byte range, and the metadata) and three 4 KiB windows of every tensor's data (its
start, middle and end), about 10 MB read from a 24 GB FLUX.1-dev (780 tensors) instead of 24 GB. A full hash
would read the whole file on every load (12-25 s from a fast NVMe disk, minutes from a hard disk), longer than
loading the quantized file it is for. The sampled key tells apart everything that differs in practice: other
models and fine-tunes (same header, but every weight differs, so every window does), fp8 and bf16 copies (the
header differs), LoRA merges and model merges (every merged tensor differs everywhere), truncated or other-size
files. It does not see an edit confined to the bytes between the windows of one tensor; after such an edit, clear
the cache (`lowbit cache DIR --clear`). mtime and the file name are deliberately not in the key: a copy, a move or
a re-download of the same file finds its cache entry. The options (format, rank, group size, size budget,
quantizer options, the calibration file's own key) and the versions of comfyui-lowbit and of the lowbit format are
in the key, so a changed option or an update quantizes anew.

The files. `<source stem>.<format>[.<budget>].<key[:16]>.safetensors`, each carrying its full key in the metadata
(`lowbit.cache_key`); a file whose header does not validate, or whose key does not match, is refused (removed and
rebuilt). Written by quantize_file (a temp file, then a rename: an interrupted or failed write, a full disk
included, leaves no partial file). A size limit: before a new entry is written, the least recently used entries are
removed until the new one fits the limit and the disk; an entry is marked used when it is loaded. Only regular
files with the cache's metadata are ever removed.
"""
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass

from ..quant_ops import FORMAT_VERSION
from .errors import CheckpointError

log = logging.getLogger("comfyui_lowbit")

CACHE_KEY = "lowbit.cache_key"
CACHE_SOURCE = "lowbit.cache_source"
WINDOW = 4096
MAX_HEADER = 100 * 2 ** 20  # safetensors' own limit on the header size
STALE_TEMP_S = 24 * 3600  # a temp file this old belongs to a process that died (a live write renames it sooner)
_TEMP = ".lowbit-*.tmp"


def _file_windows(path: str, h) -> None:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file (its first 8 bytes give a header of {n} bytes "
                                  f"in a {size}-byte file)")
        header = f.read(n)
        try:
            entries = json.loads(header)
        except ValueError as e:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
        h.update(struct.pack("<Q", size) + head + header)
        try:
            spans = sorted((int(v["data_offsets"][0]), int(v["data_offsets"][1])) for k, v in entries.items()
                           if k != "__metadata__")
        except (TypeError, ValueError, KeyError, IndexError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (a header entry has no data offsets: {e})") from None
        end = 8 + n + (spans[-1][1] if spans else 0)
        if end != size:
            raise CheckpointError(f"{path}: not a readable safetensors file: its header describes {end} bytes, the "
                                  f"file has {size} (truncated, e.g. an unfinished download?)")
        for start, end in spans:
            if end - start <= 3 * WINDOW:
                offsets = [start]
                length = end - start
            else:
                offsets = [start, start + (end - start) // 2 // WINDOW * WINDOW, end - WINDOW]
                length = WINDOW
            for off in offsets:
                f.seek(8 + n + off)
                h.update(f.read(length))


_KNOWN: dict = {}  # (file, device, inode, size, mtime_ns) of every shard -> key, for this process


def source_key(path: str) -> str:
    """A hex digest of what a model file (or a sharded model's files) holds: size, header and sampled data (see
    the module doc for why not a full hash). Within one process a file whose inode, size and mtime are unchanged
    is not read again."""
    from .convert import _shards

    files = _shards(str(path))
    stamp = tuple((os.path.abspath(f), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                  for f, st in ((f, os.stat(f)) for f in files))
    if stamp not in _KNOWN:
        h = hashlib.sha256()
        for file in files:
            _file_windows(file, h)
        _KNOWN[stamp] = h.hexdigest()
    return _KNOWN[stamp]


def cache_key(source: str, **options) -> str:
    """The key of a cache entry: the source's key, the options and the versions that shape the output."""
    from .. import __version__

    body = {"source": source, "lowbit": __version__, "format_version": FORMAT_VERSION, **options}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _metadata(path: str) -> dict:
    from safetensors import safe_open

    from .lowbit_file import unreadable_error

    try:
        with safe_open(path, framework="pt") as f:  # checks the header against the file's size
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise unreadable_error(path, e) from None


def _checked_header(path: str) -> dict:
    """The metadata of a lowbit file whose header validates as a loader validates it before reading data."""
    from .lowbit_file import read_header
    from .validate import META_VERSION, check_tensors, parse_metadata

    meta, spec = read_header(path)
    if META_VERSION not in meta:
        raise CheckpointError(f"{path}: no '{META_VERSION}' in its metadata")
    model, _, layers, config = parse_metadata(path, meta)
    check_tensors(path, model, layers, config, spec)
    return meta


@dataclass
class Entry:
    path: str
    key: str
    source: str
    size: int
    used: float  # mtime: set when the entry is written or loaded


class QuantCache:
    """A folder of quantized models; `limit` in bytes (None: no limit)."""

    def __init__(self, folder: str, limit: int | None = None):
        self.folder = os.path.abspath(os.path.expanduser(str(folder)))
        if limit is not None and limit <= 0:
            raise ValueError(f"cache size limit must be > 0 bytes, got {limit}")
        self.limit = limit

    # ---- entries -------------------------------------------------------------------------------------------
    def _read_key(self, path: str) -> tuple[str, str] | None:
        """(key, source name) from a cache file's metadata, or None if it is not one (or not readable)."""
        from .lowbit_file import read_header

        try:
            meta, _ = read_header(path)
        except (OSError, ValueError):
            return None
        key = meta.get(CACHE_KEY)
        return (key, meta.get(CACHE_SOURCE, "?")) if key else None

    def entries(self) -> list[Entry]:
        """The cache's entries, least recently used first (regular files with the cache's metadata only)."""
        out = []
        for path in glob.glob(os.path.join(glob.escape(self.folder), "*.safetensors")):
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            found = self._read_key(path)
            if found is None:
                continue
            st = os.stat(path)
            out.append(Entry(path, found[0], found[1], st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: e.used)

    def size(self) -> int:
        return sum(e.size for e in self.entries())

    def path_for(self, key: str, source: str, fmt: str, max_bytes: int | None = None) -> str:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(os.path.normpath(source)))
        stem = re.sub(r"\.(safetensors|json)$", "", stem)[:80] or "model"
        budget = f".max{max_bytes / 1e9:g}GB" if max_bytes else ""
        return os.path.join(self.folder, f"{stem}.{fmt}{budget}.{key[:16]}.safetensors")

    def lookup(self, key: str, validate: bool = False) -> str | None:
        """The entry for `key`: a readable safetensors file whose recorded key matches (validate: its whole header
        and tensor list checked as a loader checks them; a loader does that anyway, so a hit read by one need not
        pay for it twice). A damaged or mismatched file is refused: removed, with one warning line."""
        for path in glob.glob(os.path.join(glob.escape(self.folder), f"*.{key[:16]}.safetensors")):
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            try:
                meta = _checked_header(path) if validate else _metadata(path)
                if meta.get(CACHE_KEY) != key:
                    raise CheckpointError(f"{path}: its {CACHE_KEY} is {meta.get(CACHE_KEY)!r}, not this entry's")
            except (OSError, ValueError) as e:
                self.discard(path, f"refused ({e})")
                continue
            return path
        return None

    def touch(self, path: str) -> None:
        try:
            os.utime(path)
        except OSError:
            pass  # a read-only cache still serves hits

    def discard(self, path: str, why: str = "") -> None:
        """Remove one entry (a regular file in the folder only)."""
        if os.path.dirname(os.path.abspath(path)) != self.folder or os.path.islink(path) or not os.path.isfile(path):
            raise ValueError(f"{path}: not a file of the cache folder {self.folder}; not removed")
        if why:
            log.warning("comfyui-lowbit: cache file %s %s; removing it", path, why)
        os.remove(path)

    def _stale_temps(self, age: float = STALE_TEMP_S) -> list[str]:
        now = time.time()
        return [p for p in glob.glob(os.path.join(glob.escape(self.folder), _TEMP))
                if os.path.isfile(p) and not os.path.islink(p) and now - os.path.getmtime(p) > age]

    def make_room(self, need: int, keep: str | None = None) -> list[Entry]:
        """Remove least recently used entries (never `keep`) until a new entry of `need` bytes fits the limit and
        the disk's free space (stale temp files of dead writers first). Refuses, before any work, an entry larger
        than the limit. Returns the removed entries."""
        if self.limit is not None and need > self.limit:
            raise ValueError(f"{self.folder}: the quantized model needs about {_gb(need)}, more than the cache's size "
                             f"limit of {_gb(self.limit)}; raise cache_limit_gb")
        os.makedirs(self.folder, exist_ok=True)
        for p in self._stale_temps():
            os.remove(p)
        entries = self.entries()
        used = sum(e.size for e in entries)
        entries = [e for e in entries if keep is None or not os.path.samefile(e.path, keep)]
        free = shutil.disk_usage(self.folder).free
        if free + sum(e.size for e in entries) < need:  # emptying the cache would not do: keep it, say so
            raise OSError(f"{self.folder}: the quantized model needs about {_gb(need)} but the disk has {_gb(free)} "
                          f"free (the cache's entries hold {_gb(sum(e.size for e in entries))}); free some space")
        removed = []
        while entries and ((self.limit is not None and used + need > self.limit)
                           or shutil.disk_usage(self.folder).free < need):
            e = entries.pop(0)
            self.discard(e.path)
            used -= e.size
            removed.append(e)
            log.info("comfyui-lowbit: cache: removed %s (%s, least recently used) to make room", e.path, _gb(e.size))
        return removed

    def clear(self) -> list[Entry]:
        """Remove every entry and every temp file older than a minute; other files are left alone."""
        entries = self.entries()
        for e in entries:
            self.discard(e.path)
        for p in self._stale_temps(age=60):
            os.remove(p)
        return entries


@dataclass
class CachedModel:
    path: str
    hit: bool
    key: str
    seconds: float  # key + lookup on a hit; key + quantization + write on a miss
    summary: dict | None = None  # quantize_file's summary on a miss


def _estimate(src: str, fmt: str, rank: int, group_size: int, max_bytes: int | None) -> int:
    """What quantize_file will check the free space against: its upper estimate, or with a budget the budget plus
    that estimate's slack (w4a16 zero points, the header)."""
    from .convert import output_estimate

    if max_bytes:
        return int(max_bytes * 1.04) + (1 << 20)
    return output_estimate(src, fmt, rank, group_size)


def quantize_cached(src: str, cache: QuantCache, fmt: str, rank: int | None = None, calib: str | None = None,
                    max_bytes: int | None = None, group_size: int = 64, options: dict | None = None,
                    device="cpu", progress=None, rebuild: bool = False, validate: bool = True) -> CachedModel:
    """The cached lowbit checkpoint of `src` quantized with these options: found in `cache`, or made by
    quantize_file (the converter `lowbit quantize` runs) and kept there. rebuild: skip the lookup (the entry
    found failed to load). validate=False: a hit's header is not checked here (the caller loads it through the
    lowbit loader, which checks everything, and rebuilds an entry it refuses)."""
    from .convert import quantize_file
    from .families import DEFAULT_RANK

    t0 = time.time()
    src = os.fspath(src)
    rank = DEFAULT_RANK.get(fmt, 0) if rank is None else rank
    calib_key = source_key(calib) if calib else None
    key = cache_key(source_key(src), format=fmt, rank=rank, group_size=group_size, calib=calib_key,
                    max_bytes=max_bytes, options=options or {})
    found = None if rebuild else cache.lookup(key, validate)
    if found is not None:
        cache.touch(found)
        log.info("comfyui-lowbit: cache hit for %s: %s (%.2f s)", src, found, time.time() - t0)
        return CachedModel(found, True, key, time.time() - t0)
    path = cache.path_for(key, src, fmt, max_bytes)
    if os.path.lexists(path) and (os.path.islink(path) or not os.path.isfile(path)):
        raise FileExistsError(f"{path}: is not a regular file; the cache never replaces one (remove it)")
    cache.make_room(_estimate(src, fmt, rank, group_size, max_bytes))
    log.info("comfyui-lowbit: cache miss for %s: quantizing to %s (%s) on %s", src, path, fmt, device)
    meta = {CACHE_KEY: key, CACHE_SOURCE: os.path.basename(os.path.normpath(src))}
    summary = quantize_file(src, path, fmt, rank=rank, calib=calib, progress=progress, force=True, device=device,
                            group_size=group_size, options=options, max_bytes=max_bytes, extra_meta=meta)
    cache.make_room(0, keep=path)  # the new entry is the most recently used: older ones go if the limit is passed
    return CachedModel(path, False, key, time.time() - t0, summary)
