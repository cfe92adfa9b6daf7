"""Calibration nodes: record per-layer input absmax while a normal workflow samples, then save them.

LowBitCalibrate returns a clone of the 16-bit MODEL with an apply_model wrapper that hooks the block
linears only for the duration of each of the clone's model calls, so the original MODEL (which shares
the weights) is never affected. The statistics live in the clone's attachments.
"""
import json
import os

import torch
from safetensors.torch import save_file

import comfy.patcher_extension
import folder_paths

CALIB_VERSION = "1"
ATTACHMENT = "lowbit_calibration"
WRAPPER_KEY = "lowbit_calibrate"
BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")


class CalibrationStats:
    """Running per-input-channel absmax of every block linear (BFL names) and the model-call count."""

    def __init__(self):
        self.absmax: dict[str, torch.Tensor] = {}
        self.samples = 0

    def _hook(self, name):
        def hook(module, args):
            x = args[0].detach()
            am = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()  # stays on the device: no sync per layer
            prev = self.absmax.get(name)
            self.absmax[name] = am if prev is None else torch.maximum(prev.to(am.device), am)
        return hook

    def apply_model_wrapper(self, executor, *args, **kwargs):
        dm = executor.class_obj.diffusion_model
        handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in dm.named_modules()
                   if n.startswith(BLOCK_PREFIXES) and isinstance(m, torch.nn.Linear)]
        try:
            out = executor(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        self.samples += 1
        return out

    def tensors(self) -> dict:
        return {f"{name}.input_absmax": t.cpu().contiguous() for name, t in sorted(self.absmax.items())}

    def save(self, path: str) -> str:
        if not self.absmax:
            raise ValueError("no activations were recorded: run a sampler (e.g. KSampler) with the MODEL from "
                             "'LowBit Calibrate' before saving, and pass its LATENT output to the save node")
        if os.path.exists(path):
            raise FileExistsError(f"{path} already exists; choose another name (calibration files are never overwritten)")
        tmp = f"{path}.tmp-{os.getpid()}"
        meta = {"lowbit.calib_version": CALIB_VERSION, "lowbit.samples": str(self.samples),
                "lowbit.layers": json.dumps(sorted(self.absmax))}
        try:
            save_file(self.tensors(), tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path


class LowBitCalibrate:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "The 16-bit FLUX model to calibrate (e.g. from Load Diffusion Model). "
                                                             "It is cloned; the original is not changed."})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "wrap"
    CATEGORY = "lowbit"
    DESCRIPTION = ("Returns a copy of the model that records the input range of every block linear layer while it "
                   "samples. Sample your usual prompts with it, then save with 'LowBit Save Calibration'. Statistics "
                   "accumulate over every prompt sampled with this MODEL while ComfyUI keeps it cached.")

    def wrap(self, model):
        from .ops import lowbit_modules

        if lowbit_modules(model.model):
            raise ValueError("LowBit Calibrate needs the 16-bit model (e.g. from Load Diffusion Model), "
                             "not a lowbit one: calibration records the inputs of the layers before quantization")
        m = model.clone()
        stats = CalibrationStats()
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
