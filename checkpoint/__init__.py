"""Checkpoint layouts and IO: the lowbit file format and its validation, the model families (which layer gets
which format, real configs, sizes), the FLUX / T5 / CLIP-L / FLUX.2 text-encoder layouts, 16-bit -> lowbit
conversion and the Nunchaku importer."""
from . import budget, cache, clip_l, families, flux, llm, nunchaku, t5
from .cache import CachedModel, QuantCache, quantize_cached, source_key
from .calibration import BLOCK_INPUT, CALIB_VERSION, CalibrationFile, save_calibration
from .convert import FluxSource, held_out_error, inspect_source, output_estimate, quantize_file
from .families import DEFAULT_RANK, FAMILIES, Family, family_of
from .errors import CheckpointError, NotALowbitCheckpoint
from .lowbit_file import (META_VERSION, MODELS, CheckpointInfo, check_output, check_path, load_checkpoint,
                          logical_size, packed_layers, read_header, read_info, save_checkpoint)
from .nunchaku import convert_state_dict, is_nunchaku, load_nunchaku, read_nunchaku
from .validate import check_finite, check_tensors, validate_state_dict

__all__ = ["budget", "cache", "CachedModel", "QuantCache", "quantize_cached", "source_key", "output_estimate", "FAMILIES", "Family", "families", "family_of", "inspect_source", "llm", "BLOCK_INPUT", "CALIB_VERSION", "CalibrationFile", "FluxSource", "CheckpointError", "CheckpointInfo", "DEFAULT_RANK", "META_VERSION",
           "MODELS", "NotALowbitCheckpoint", "check_finite", "check_output", "check_path", "check_tensors", "clip_l",
           "convert_state_dict", "flux", "held_out_error", "is_nunchaku", "load_checkpoint", "load_nunchaku",
           "logical_size", "nunchaku", "packed_layers", "quantize_file", "read_header", "read_info", "read_nunchaku",
           "save_calibration", "save_checkpoint", "t5", "validate_state_dict"]
