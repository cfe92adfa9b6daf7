"""Quantize on load: the 16-bit (or fp8) FLUX.1 / FLUX.2 file or text encoder a user already has, quantized by
the converter `lowbit quantize` runs, once, into a cache in ComfyUI's models folder (models/lowbit_cache, or
`lowbit_cache:` in extra_model_paths.yaml); later loads read the cached lowbit file (checkpoint/cache.py)."""
import logging
import os

import comfy.model_management
import comfy.utils
import folder_paths

from .. import quant_ops
from ..checkpoint import CheckpointError, NotALowbitCheckpoint, QuantCache, quantize_cached, read_info
from .loaders import ACTIVATIONS_TIP, BACKEND_INPUT, DTYPE_INPUT, DTYPES, check_backend, load_lowbit_diffusion_model
from .quantize import NO_CALIB, calibration_files

log = logging.getLogger("comfyui_lowbit")

CACHE_FOLDER = "lowbit_cache"
FORMATS = ("svdq_w4a4", "ternary")
DEFAULT_LIMIT_GB = 64.0
QUANT_VRAM = 4 * 2 ** 30  # one FLUX layer's quantization work in float32, with room (linear1: 21504 x 3072)


def cache_folder() -> str:
    """models/lowbit_cache unless extra_model_paths.yaml names another folder for `lowbit_cache`."""
    if CACHE_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(CACHE_FOLDER, os.path.join(folder_paths.models_dir, CACHE_FOLDER))
    return folder_paths.get_folder_paths(CACHE_FOLDER)[0]


def _gb_to_bytes(gb: float, what: str) -> int | None:
    if gb < 0:
        raise ValueError(f"{what} must be >= 0 GB (0: none), got {gb}")
    return int(round(gb * 1e9)) if gb > 0 else None


def _calib_path(calibration: str) -> str | None:
    if calibration == NO_CALIB:
        return None
    path = os.path.join(folder_paths.get_output_directory(), calibration)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibration file {path} not found")
    return path


def _refuse_lowbit(path: str, loader: str) -> None:
    from safetensors import safe_open

    from ..checkpoint import META_VERSION

    try:
        with safe_open(path, framework="pt") as f:  # the metadata alone: this runs on every load, hits included
            meta = f.metadata() or {}
    except Exception:  # not readable: the quantizer names the problem before any work
        return
    if META_VERSION in meta:
        raise ValueError(f"{path} is already a lowbit {meta.get('lowbit.model', '?')!r} checkpoint; load it with "
                         f"'{loader}' (this node quantizes 16-bit / fp8 files)")


def _quantize(src: str, fmt: str, calib: str | None, max_bytes: int | None, limit: int | None, rebuild=False):
    """The CachedModel of `src` (checkpoint/cache.py), quantized on ComfyUI's device with its progress bar."""
    bar = comfy.utils.ProgressBar(1)

    def progress(done, total):
        bar.update_absolute(done, total)
        comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel: nothing is written

    device = comfy.model_management.get_torch_device()  # the SVDs run on the GPU when ComfyUI has one
    cache = QuantCache(cache_folder(), limit)
    if device.type != "cpu":
        comfy.model_management.free_memory(QUANT_VRAM, device)
    try:
        got = quantize_cached(src, cache, fmt, calib=calib, max_bytes=max_bytes, device=device, progress=progress,
                              rebuild=rebuild, validate=False)  # load_through_cache's loader validates the hit
    finally:
        if device.type != "cpu":
            comfy.model_management.soft_empty_cache()
    if got.hit:
        log.info("comfyui-lowbit: %s: cached %s, %.2f s to find", os.path.basename(src), got.path, got.seconds)
    else:
        log.info("comfyui-lowbit: %s quantized (%s) in %.1f s into %s", os.path.basename(src), fmt, got.seconds,
                 got.path)
    return cache, got


def load_through_cache(srcs: list, fmt: str, load, calib=None, max_bytes=None, limit=None):
    """load([cached paths]) of the sources quantized through the cache. The lookup reads only an entry's metadata;
    a hit that then fails the loader's full validation (tensor names, shapes, dtypes, NaN) is removed and rebuilt
    once."""
    found = [_quantize(s, fmt, calib, max_bytes, limit) for s in srcs]
    try:
        return load([got.path for _, got in found])
    except CheckpointError as e:
        bad = [(i, cache, got) for i, (cache, got) in enumerate(found) if got.hit and str(e).startswith(got.path)]
        if not bad:
            raise
        i, cache, got = bad[0]
        cache.discard(got.path, f"refused by the loader ({e})")
        found[i] = _quantize(srcs[i], fmt, calib, max_bytes, limit, rebuild=True)
        return load([got.path for _, got in found])


def load_quantized_diffusion_model(src: str, fmt: str, calib: str | None = None, max_bytes: int | None = None,
                                   limit: int | None = None, dtype=None, backend: str = "auto",
                                   activations: str = "auto", disable_dynamic: bool = False):
    """A ComfyUI ModelPatcher of the 16-bit FLUX file `src` quantized on load (cached)."""
    _refuse_lowbit(src, "Load LowBit Diffusion Model")
    check_backend(backend)  # bad input before the quantization, not after
    if activations not in quant_ops.ACTIVATIONS:
        raise ValueError(f"activations must be one of {quant_ops.ACTIVATIONS}, got {activations!r}")
    patcher = load_through_cache([src], fmt, lambda p: load_lowbit_diffusion_model(
        p[0], dtype, backend, activations, disable_dynamic=disable_dynamic), calib, max_bytes, limit)
    # ComfyUI rebuilds a patcher from this (a non-dynamic delegate): through the cache, which may have moved on
    patcher.cached_patcher_init = (load_quantized_diffusion_model,
                                   (src, fmt, calib, max_bytes, limit, dtype, backend, activations))
    return patcher


def quantize_text_encoders(paths: list, limit: int | None, load):
    """load(paths) with every 16-bit text encoder among `paths` replaced by its cached W4A16 file (lowbit files
    are used as they are)."""
    todo = []
    for p in paths:
        try:
            read_info(p)
        except NotALowbitCheckpoint:
            todo.append(p)

    def swap(cached):
        done = dict(zip(todo, cached))
        return load([done.get(p, p) for p in paths])

    if not todo:
        return load(paths)
    return load_through_cache(todo, "w4a16", swap, limit=limit)


class LowBitQuantizeOnLoad:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": ([n for n in folder_paths.get_filename_list("diffusion_models") if n.endswith(".safetensors")],
                           {"tooltip": "A 16-bit or fp8 FLUX.1 / FLUX.2 transformer in models/diffusion_models (the "
                                       "file ComfyUI's own downloads put there). Quantized on the first load, read "
                                       "from models/lowbit_cache afterwards."}),
            "format": (list(FORMATS), {"default": "svdq_w4a4",
                       "tooltip": "svdq_w4a4: 4-bit weights and activations with a 16-bit low-rank branch (SVDQuant, "
                                  "rank 32). ternary: 1.58-bit weights with a low-rank branch (rank 64). Modulation "
                                  "layers are w4a16, embedders and the final layer 16-bit."}),
            "max_size_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.01,
                            "tooltip": "Size budget of the quantized model in GB (1e9 bytes). 0: none, every layer "
                                       "in the format's plan. Otherwise each layer takes the format, w4a16 or 16-bit, "
                                       "chosen by measured error per byte: the best quality that fits. Quantizing "
                                       "with a budget measures every layer first (about twice the time)."}),
            "calibration": ([NO_CALIB] + calibration_files(),
                            {"tooltip": "A calibration file from 'LowBit Save Calibration' (ComfyUI output folder) "
                                        "for the quantizers and the budget's error measurements, or none (data-free)."}),
            "backend": BACKEND_INPUT,
            "compute_dtype": DTYPE_INPUT,
        }, "optional": {
            "activations": (list(quant_ops.ACTIVATIONS), {"default": "auto", "tooltip": ACTIVATIONS_TIP}),
            "cache_limit_gb": ("FLOAT", {"default": DEFAULT_LIMIT_GB, "min": 0.0, "max": 100000.0, "step": 1.0,
                               "tooltip": "Size limit of models/lowbit_cache in GB: the least recently used entries "
                                          "are removed to make room for a new one (0: no limit). `lowbit cache "
                                          "<folder> --clear` empties it."}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "lowbit"
    DESCRIPTION = ("Loads a 16-bit or fp8 FLUX.1 / FLUX.2 file quantized to 4-bit or 1.58-bit: the first time it "
                   "quantizes it layer by layer on ComfyUI's device (progress bar) and keeps the result in "
                   "models/lowbit_cache; afterwards it loads the cached file, as fast as any lowbit file.")

    def load(self, model_name, format, max_size_gb, calibration, backend="auto", compute_dtype="auto",
             activations="auto", cache_limit_gb=DEFAULT_LIMIT_GB):
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        src = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        max_bytes = _gb_to_bytes(max_size_gb, "max_size_gb")
        limit = _gb_to_bytes(cache_limit_gb, "cache_limit_gb")
        return (load_quantized_diffusion_model(src, format, _calib_path(calibration), max_bytes, limit,
                                               DTYPES[compute_dtype], backend, activations),)
