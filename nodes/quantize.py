"""LowBitQuantizeModel: quantize a 16-bit model from diffusion_models / text_encoders next to itself."""
import os

import comfy.model_management
import comfy.utils
import folder_paths

FOLDERS = ("diffusion_models", "text_encoders")
FORMATS = ("svdq_w4a4", "ternary")
NO_CALIB = "none (data-free)"
AUTO_RANK = -1  # the format's default rank, as `lowbit quantize` without --rank


def _sources() -> list[str]:
    return [f"{folder}/{name}" for folder in FOLDERS for name in folder_paths.get_filename_list(folder)
            if name.endswith(".safetensors")]


def calibration_files() -> list[str]:
    out = folder_paths.get_output_directory()
    found = []
    for root, _, files in os.walk(out):
        found += [os.path.relpath(os.path.join(root, f), out) for f in files if f.endswith(".safetensors")]
    return sorted(found)


def _output_path(src: str, output_name: str) -> str:
    name = output_name.strip()
    if not name or os.path.basename(name) != name or name in (".", ".."):
        raise ValueError(f"output_name must be a plain file name (no folders), got {output_name!r}")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    path = os.path.join(os.path.dirname(src), name)
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; choose another output_name (existing files are never overwritten)")
    return path


class LowBitQuantizeModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (_sources(), {"tooltip": "A 16-bit FLUX.1 / FLUX.2 transformer (diffusion_models) or text "
                                                   "encoder (text_encoders: T5, CLIP-L, FLUX.2's Mistral 3 / Qwen3) "
                                                   "to quantize."}),
            "format": (list(FORMATS), {"default": "svdq_w4a4",
                       "tooltip": "svdq_w4a4: 4-bit weights and activations with a 16-bit low-rank branch (SVDQuant). "
                                  "ternary: 1.58-bit weights with a low-rank branch."}),
            "rank": ("INT", {"default": AUTO_RANK, "min": AUTO_RANK, "max": 512, "step": 1,
                             "tooltip": "Rank of the 16-bit low-rank branch; -1: the format's default, as the lowbit "
                                        "command (32 for svdq_w4a4, 64 for ternary; 64-128 helps ternary); 0: none."}),
            "calibration": ([NO_CALIB] + calibration_files(),
                            {"tooltip": "A calibration file from 'LowBit Save Calibration' (ComfyUI output folder), "
                                        "or none for data-free quantization."}),
            "output_name": ("STRING", {"default": "flux-lowbit.safetensors",
                                       "tooltip": "File name written next to the source model; an existing file is "
                                                  "never overwritten."}),
        }, "optional": {
            "data_aware": ("BOOLEAN", {"default": True,
                           "tooltip": "With a calibration file that holds input samples (LowBit Calibrate with "
                                      "tokens_per_layer > 0): GPTQ rounding and low-rank branch / ternary scales fitted "
                                      "to the activation-weighted error; svdq_w4a4's smoothing and branch trained "
                                      "against the output error with int4 activations. Off: only the smoothing uses the "
                                      "calibration (as before). Data-free quantization ignores it."}),
            "refine_steps": ("INT", {"default": 0, "min": 0, "max": 10000, "step": 10,
                             "tooltip": "FLUX only: block-wise refinement after quantizing. Per transformer block, in "
                                        "order, this many steps adjust the svdq_w4a4 / ternary layers' scales, low-rank "
                                        "branches and biases (codes untouched) so that the block matches the 16-bit block on "
                                        "the calibration file's block inputs (LowBit Calibrate block_inputs > 0). "
                                        "Time: about 3 x steps block passes per block (FLUX.1-dev on one GPU: "
                                        "estimated 10-20 min at 100 steps); memory: one 16-bit block in fp32 plus "
                                        "the block inputs (about 60 MB each at 1024x1024). 0: off."}),
        }}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "quantize"
    CATEGORY = "lowbit"
    DESCRIPTION = "Writes a lowbit checkpoint of a 16-bit model next to it (then load it with the LowBit loaders)."

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # always run: a queued quantization must write (or say why it cannot), never be cached

    def quantize(self, model_name, format, rank, calibration, output_name, data_aware=True, refine_steps=0):
        from .. import checkpoint

        folder, _, name = model_name.partition("/")
        if folder not in FOLDERS:
            raise ValueError(f"model_name must start with one of {FOLDERS}, got {model_name!r}")
        src = folder_paths.get_full_path_or_raise(folder, name)
        dst = _output_path(src, output_name)  # quantize_file checks the rest (input, folder, space) before layer 1
        calib = None
        if calibration != NO_CALIB:
            calib = os.path.join(folder_paths.get_output_directory(), calibration)
            if not os.path.isfile(calib):
                raise FileNotFoundError(f"calibration file {calib} not found")
        if refine_steps:
            checkpoint.CalibrationFile(calib).check_block_inputs()  # before quantizing, not after
        bar = comfy.utils.ProgressBar(1)

        def progress(done, total):
            bar.update_absolute(done, total)
            comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel: nothing is written

        device = comfy.model_management.get_torch_device()  # the SVDs run on the GPU when ComfyUI has one
        rank = checkpoint.DEFAULT_RANK[format] if rank == AUTO_RANK else rank
        options = {"gptq": data_aware, "whiten": data_aware}
        if format == "ternary":
            options["fit_scales"] = data_aware
        elif not data_aware:
            options["act_fit"] = 0
        s = checkpoint.quantize_file(src, dst, fmt=format, rank=rank, calib=calib, progress=progress, device=device,
                                     options=options)
        errors = sorted(s["layer_errors"].values())
        text = [dst] + ([f"held-out relative output error per layer: median {errors[len(errors) // 2]:.4f}, "
                         f"worst {errors[-1]:.4f} ({len(errors)} layers)"] if errors else [])
        if refine_steps and s["model"] == "flux":
            from ..flux_model import refine_flux_checkpoint

            r = refine_flux_checkpoint(dst, src, calib, refine_steps, device=device, progress=progress)
            mean = lambda i: sum(b[i] for b in r["blocks"]) / len(r["blocks"])  # noqa: E731
            text.append(f"block-wise refinement ({refine_steps} steps): mean block error {mean(1):.4f} -> "
                        f"{mean(2):.4f} over {len(r['blocks'])} blocks, {r['seconds']:.0f} s")
        return {"ui": {"text": text}}
