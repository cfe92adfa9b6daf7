"""LoRA support for lowbit models in ComfyUI.

`wrap_patcher(model_patcher)` is called on every MODEL the lowbit loader returns.
It makes ComfyUI's standard LoRA loaders route LoRA factors on quantized layers into
their 16-bit low-rank branch instead of merging them into the packed weight.
(Placeholder: currently returns the patcher unchanged.)
"""


def wrap_patcher(model_patcher):
    return model_patcher
