"""LowBitLoraStack: several LoRAs on a MODEL in one node (any model; lowbit ones route them into the branch).

Same mapping and patches as ComfyUI's LoraLoaderModelOnly chained once per LoRA (so the result is
identical), but the LoRA keys that match no layer are reported in one warning line per LoRA (count
and a few names) instead of one line per key.
"""
import contextlib
import logging

import comfy.lora
import comfy.lora_convert
import comfy.utils
import folder_paths

log = logging.getLogger("comfyui_lowbit")

SLOTS = 4
_NOT_LOADED = "lora key not loaded: "


class _CollectNotLoaded(logging.Filter):
    def __init__(self):
        super().__init__()
        self.keys = []

    def filter(self, record):
        msg = record.getMessage()
        if msg.startswith(_NOT_LOADED):
            self.keys.append(msg[len(_NOT_LOADED):])
            return False
        return True


@contextlib.contextmanager
def _collect_not_loaded():
    """Collect (and silence) comfy.lora.load_lora's per-key 'lora key not loaded' lines."""
    f = _CollectNotLoaded()
    root = logging.getLogger()
    root.addFilter(f)
    try:
        yield f.keys
    finally:
        root.removeFilter(f)


def apply_lora(model, lora: dict, strength: float, name: str = "lora"):
    """A clone of `model` (a ModelPatcher) with the LoRA state dict added at `strength` -> (clone, unmatched keys)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    lora = comfy.lora_convert.convert_lora(lora)
    with _collect_not_loaded() as unmatched:
        patches = comfy.lora.load_lora(lora, key_map)
    if unmatched:
        log.warning("lowbit: LoRA %s: %d of %d keys match no layer of the model and were not loaded: %s%s", name,
                    len(unmatched), len(lora), ", ".join(unmatched[:4]), ", ..." if len(unmatched) > 4 else "")
    out = model.clone()
    out.add_patches(patches, strength)
    return out, unmatched


class LowBitLoraStack:
    @classmethod
    def INPUT_TYPES(cls):
        names = ["None", *folder_paths.get_filename_list("loras")]
        optional = {}
        for i in range(1, SLOTS + 1):
            optional[f"lora_{i}"] = (names, {"default": "None", "tooltip": f"LoRA number {i} (from models/loras), or None."})
            optional[f"strength_{i}"] = ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                                   "tooltip": f"Strength of LoRA number {i} (negative works; 0 skips it)."})
        return {"required": {"model": ("MODEL", {"tooltip": "The diffusion model (lowbit or 16-bit)."})},
                "optional": optional}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "lowbit"
    DESCRIPTION = ("Applies up to four LoRAs to the model, in order (like chained LoraLoaderModelOnly nodes). On "
                   "lowbit models they go into the quantized layers' 16-bit low-rank branch; ranks add up.")

    def apply(self, model, **slots):
        for i in range(1, SLOTS + 1):
            name = slots.get(f"lora_{i}", "None")
            strength = float(slots.get(f"strength_{i}", 1.0))
            if name in (None, "None") or strength == 0.0:
                continue
            path = folder_paths.get_full_path_or_raise("loras", name)
            model, _ = apply_lora(model, comfy.utils.load_torch_file(path, safe_load=True), strength, name)
        return (model,)
