"""Checkpoint layouts and IO: the lowbit file format, the FLUX / T5 / CLIP-L layouts, 16-bit -> lowbit
conversion and the Nunchaku importer."""
from . import clip_l, flux, nunchaku, t5
from .calibration import CALIB_VERSION, CalibrationFile, save_calibration
from .convert import DEFAULT_RANK, held_out_error, quantize_file
from .lowbit_file import (META_VERSION, MODELS, CheckpointInfo, NotALowbitCheckpoint, load_checkpoint, logical_size,
                          packed_layers, read_info, save_checkpoint)
from .nunchaku import convert_state_dict, is_nunchaku, load_nunchaku, read_nunchaku

__all__ = ["CALIB_VERSION", "CalibrationFile", "held_out_error", "save_calibration", "CheckpointInfo", "DEFAULT_RANK", "META_VERSION", "MODELS", "NotALowbitCheckpoint", "clip_l",
           "convert_state_dict", "flux", "is_nunchaku", "load_checkpoint", "load_nunchaku", "logical_size",
           "nunchaku", "packed_layers", "quantize_file", "read_info", "read_nunchaku", "save_checkpoint", "t5"]
