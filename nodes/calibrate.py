"""Calibration nodes: record per-layer input statistics and a sample of input rows while a normal workflow
samples, then save them.

LowBitCalibrate returns a clone of the 16-bit MODEL with an apply_model wrapper that hooks the block
linears only for the duration of each of the clone's model calls, so the original MODEL (which shares
the weights) is never affected. The recorder (quant_ops.InputRecorder) lives in the clone's attachments.
"""
import os

import comfy.patcher_extension
import folder_paths
import torch

from ..checkpoint import BLOCK_INPUT, save_calibration
from ..flux_model import DEFAULT_BLOCK_INPUTS, block_input_item
from ..quant_ops import DEFAULT_TOKENS, InputRecorder, ItemSampler

ATTACHMENT = "lowbit_calibration"
WRAPPER_KEY = "lowbit_calibrate"
BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")
FLUX_DEV_MB_PER_TOKEN = 3.5  # bf16 rows of every FLUX.1-dev block linear input (1.75M channels)
FLUX_DEV_MB_PER_BLOCK_INPUT = 31  # 1024x1024: (4096 + 512 tokens) x 3072 bf16 + rotary angles (fp32)
MAX_TOKENS = 4096
MAX_BLOCK_INPUTS = 64


class CalibrationStats:
    """The recorder plus the model-call count, hooked into each model call of the calibrating clone."""

    def __init__(self, tokens: int = DEFAULT_TOKENS, block_inputs: int = DEFAULT_BLOCK_INPUTS):
        self.recorder = InputRecorder(tokens)
        self.block_inputs = ItemSampler(block_inputs)
        self.samples = 0
        self.global_vec = None

    def global_modulation_hook(self, module, args):
        """FLUX.2: the blocks take the global modulation's outputs; the raw vec it reads is what is kept."""
        self.global_vec = args[0] if args else None

    def first_block_hook(self, module, args, kwargs):
        """ComfyUI calls double_blocks[0](img=, txt=, vec=, pe=, attn_mask=, ...); pe (B, 1, L, D/2, 2, 2) holds
        the rotations [[cos, -sin], [sin, cos]]. FLUX.2's `vec` is the global modulation's output: the raw vec
        comes from global_modulation_hook. Calls with masks or other modulation layouts are not recorded."""
        img, txt, vec, pe = (kwargs.get(k) for k in ("img", "txt", "vec", "pe"))
        if isinstance(vec, tuple):
            vec = self.global_vec
        if not all(isinstance(t, torch.Tensor) for t in (img, txt, vec, pe)) or kwargs.get("attn_mask") is not None \
                or pe.dim() != 6 or vec.dim() != 2:
            return
        self.block_inputs.record(block_input_item(img, txt, vec, pe[..., 0, 0], pe[..., 1, 0]))

    def apply_model_wrapper(self, executor, *args, **kwargs):
        dm = executor.class_obj.diffusion_model
        handles = self.recorder.attach(dm, lambda n: n.startswith(BLOCK_PREFIXES))
        if self.block_inputs.items and len(getattr(dm, "double_blocks", ())):
            if getattr(dm, "double_stream_modulation_img", None) is not None:
                handles.append(dm.double_stream_modulation_img.register_forward_pre_hook(self.global_modulation_hook))
            handles.append(dm.double_blocks[0].register_forward_pre_hook(self.first_block_hook, with_kwargs=True))
        try:
            out = executor(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        self.samples += 1
        return out

    def save(self, path: str) -> str:
        tensors = {**self.recorder.tensors(), **self.block_inputs.tensors(BLOCK_INPUT)}
        return save_calibration(path, tensors, self.samples, self.recorder.tokens)


class LowBitCalibrate:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The 16-bit FLUX model to calibrate (e.g. from Load Diffusion Model). "
                                           "It is cloned; the original is not changed."}),
        }, "optional": {
            "tokens_per_layer": ("INT", {"default": DEFAULT_TOKENS, "min": 0, "max": MAX_TOKENS, "step": 32,
                                         "tooltip": "Input rows kept per block linear (a uniform random sample over "
                                                    "every prompt and step) for the calibrated quantizers. Memory on "
                                                    f"the model's device: about {FLUX_DEV_MB_PER_TOKEN} MB per token "
                                                    f"for FLUX.1-dev ({DEFAULT_TOKENS} tokens = "
                                                    f"{DEFAULT_TOKENS * FLUX_DEV_MB_PER_TOKEN / 1000:.1f} GB), the same "
                                                    "in the saved file. 0 records the input ranges only."}),
            "block_inputs": ("INT", {"default": DEFAULT_BLOCK_INPUTS, "min": 0, "max": MAX_BLOCK_INPUTS,
                                     "tooltip": "Whole inputs of the first transformer block (image and text hidden "
                                                "states, vec, rotary angles; one per image, a uniform sample over every "
                                                "prompt and step) kept for block-wise refinement ('LowBit Quantize "
                                                "Model' refine_steps, `lowbit quantize --refine`). Memory, on the CPU "
                                                f"and in the file: about {FLUX_DEV_MB_PER_BLOCK_INPUT} MB each for "
                                                "FLUX.1-dev at 1024x1024. 0: none."}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "wrap"
    CATEGORY = "lowbit"
    DESCRIPTION = ("Returns a copy of the model that records the input range and a sample of the inputs of every "
                   "block linear layer while it samples. Sample 16 or more varied prompts with it, then save with 'LowBit Save "
                   "Calibration'. Statistics accumulate over every prompt sampled with this MODEL while ComfyUI keeps it cached.")

    def wrap(self, model, tokens_per_layer=DEFAULT_TOKENS, block_inputs=DEFAULT_BLOCK_INPUTS):
        from .ops import lowbit_modules

        if lowbit_modules(model.model):
            raise ValueError("LowBit Calibrate needs the 16-bit model (e.g. from Load Diffusion Model), "
                             "not a lowbit one: calibration records the inputs of the layers before quantization")
        m = model.clone()
        stats = CalibrationStats(tokens_per_layer, block_inputs)
        m.set_attachments(ATTACHMENT, stats)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, stats.apply_model_wrapper)
        return (m,)


class LowBitSaveCalibration:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The MODEL output of 'LowBit Calibrate' after sampling."}),
            "samples": ("LATENT", {"tooltip": "The sampler's output; connecting it makes this node run after sampling."}),
            "filename_prefix": ("STRING", {"default": "lowbit/calibration",
                                           "tooltip": "File name in ComfyUI's output folder; a counter is appended, "
                                                      "existing files are never overwritten."}),
        }}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = "lowbit"
    DESCRIPTION = "Saves the recorded activation statistics as a calibration file for `lowbit quantize --calib` or 'LowBit Quantize Model'."

    def save(self, model, samples, filename_prefix="lowbit/calibration"):
        stats = model.get_attachment(ATTACHMENT)
        if stats is None:
            raise ValueError("this MODEL does not come from 'LowBit Calibrate': connect that node's output")
        out_dir = folder_paths.get_output_directory()
        full_dir, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        os.makedirs(full_dir, exist_ok=True)
        path = stats.save(os.path.join(full_dir, f"{name}_{counter:05}_.safetensors"))
        return {"ui": {"text": [os.path.relpath(path, out_dir)]}}
