"""The quantization core: packed formats, quantized modules, quantizers and LoRA composition (pure torch)."""
from . import quantizers
from .actfit import ACT_FIT_STEPS
from .activations import ACTIVATIONS, resolve_activations, set_activations, use_activations, use_fp8
from .calibration import DEFAULT_TOKENS, SAMPLE_DTYPE, InputRecorder, ItemSampler, sample_bytes
from .formats import FORMAT_VERSION, FORMATS, TernaryWeights, W4A4Weights, W4A16Weights
from .linear import MODULES, LowBitLinear, SVDQW4A4Linear, TernaryLinear, W4A16Linear, module_from_packed
from .lora import LoraFactor, apply_lora, check_factor, compose_branch, lora_columns, originals, remove_lora
from .quantize import QUANT_FORMATS, quantize_linear, quantize_weight
from .refine import REFINE_FORMATS, REFINE_LR, REFINE_TENSORS, refine_block

__all__ = ["ACT_FIT_STEPS", "ACTIVATIONS", "resolve_activations", "set_activations", "use_activations", "use_fp8", "DEFAULT_TOKENS",
           "InputRecorder", "ItemSampler", "SAMPLE_DTYPE",
           "sample_bytes", "FORMAT_VERSION", "FORMATS", "QUANT_FORMATS", "MODULES", "LowBitLinear", "SVDQW4A4Linear",
           "W4A16Linear",
           "TernaryLinear", "W4A4Weights", "W4A16Weights", "TernaryWeights", "module_from_packed",
           "quantize_linear", "quantize_weight", "quantizers", "LoraFactor", "apply_lora", "check_factor",
           "compose_branch", "lora_columns", "originals", "remove_lora", "REFINE_FORMATS", "REFINE_LR", "REFINE_TENSORS",
           "refine_block"]
