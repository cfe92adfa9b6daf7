"""A stand-alone FLUX.1 transformer (no ComfyUI) for the benchmark, the demo and tests: the model, loading
from checkpoints, seeded random weights and whole-model quantization."""
from .calibrate import DEFAULT_BLOCK_INPUTS, block_input_item, calibrate_flux
from .loading import flux_from_checkpoint, flux_from_state_dict, flux_state_dict
from .model import FluxTransformer, apply_rope, make_inputs, rope_angles
from .quantize import quantize_flux, quantize_fn, quantized_layers, set_module, weight_bytes
from .refine import refine_flux_checkpoint
from .synthetic import random_flux

__all__ = ["DEFAULT_BLOCK_INPUTS", "block_input_item", "FluxTransformer", "apply_rope", "calibrate_flux", "refine_flux_checkpoint", "flux_from_checkpoint", "flux_from_state_dict", "flux_state_dict",
           "make_inputs", "quantize_flux", "quantize_fn", "quantized_layers", "random_flux", "rope_angles",
           "set_module", "weight_bytes"]
