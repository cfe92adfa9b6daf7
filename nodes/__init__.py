"""ComfyUI nodes (the only package besides the root __init__ that imports ComfyUI)."""
from .calibrate import LowBitCalibrate, LowBitSaveCalibration
from .loaders import LowBitDiffusionModelLoader, LowBitFlux2TextEncoderLoader, LowBitTextEncoderLoader
from .lora_stack import LowBitLoraStack
from .quantize import LowBitQuantizeModel
from .quantize_on_load import LowBitQuantizeOnLoad

NODE_CLASS_MAPPINGS = {
    "LowBitDiffusionModelLoader": LowBitDiffusionModelLoader,
    "LowBitQuantizeOnLoad": LowBitQuantizeOnLoad,
    "LowBitTextEncoderLoader": LowBitTextEncoderLoader,
    "LowBitFlux2TextEncoderLoader": LowBitFlux2TextEncoderLoader,
    "LowBitQuantizeModel": LowBitQuantizeModel,
    "LowBitCalibrate": LowBitCalibrate,
    "LowBitSaveCalibration": LowBitSaveCalibration,
    "LowBitLoraStack": LowBitLoraStack,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LowBitDiffusionModelLoader": "Load LowBit Diffusion Model",
    "LowBitQuantizeOnLoad": "Load Diffusion Model, Quantize on Load (LowBit, cached)",
    "LowBitTextEncoderLoader": "Load LowBit Text Encoders (FLUX)",
    "LowBitFlux2TextEncoderLoader": "Load LowBit Text Encoder (FLUX.2)",
    "LowBitQuantizeModel": "LowBit Quantize Model",
    "LowBitCalibrate": "LowBit Calibrate (record activations)",
    "LowBitSaveCalibration": "LowBit Save Calibration",
    "LowBitLoraStack": "LowBit LoRA Stack",
}
