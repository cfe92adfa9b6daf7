"""ComfyUI `custom_operations` whose Linear turns into a lowbit module when the checkpoint quantizes it.

ComfyUI builds Linear layers without their names, so the decision is made while loading the state
dict: a layer whose keys include `<prefix>wscales` is quantized, and its format options come from the
checkpoint's `lowbit.layers` entry, found by the longest dotted suffix of the prefix (the module path
inside ComfyUI is `diffusion_model.<L>` or `t5xxl.transformer.<L>`). The instance's class is then
switched to a subclass of the quantized module, so `isinstance(m, LowBitLinear)` holds, the packed
tensors are buffers under their checkpoint names and `<L>.weight` stays in `model.state_dict()`.
Every other layer loads and runs exactly as ComfyUI's manual_cast Linear.
"""
import torch

import comfy.ops

from ..quant_ops import MODULES, LowBitLinear
from . import stream

FLOAT16 = (torch.bfloat16, torch.float16)


class _ComfyQuantLinear:
    """ComfyUI-side behaviour shared by the quantized classes (mixed in before the quantized module).

    comfy_cast_weights puts the layer in ModelPatcher's load list: in low-VRAM mode a layer that
    stays on the offload device gets comfy_cast_weights = True and its packed tensors are copied
    to the input's device for each call, like ComfyUI's own cast weights. Under ModelPatcherDynamic
    its Streamed companion is the castable layer instead and the forward streams it (nodes/stream.py).
    """

    comfy_cast_weights = False
    weight_function = []
    bias_function = []

    @property
    def weight_shape(self) -> torch.Size:
        """Logical (out_features, in_features); `weight` itself is the packed tensor."""
        return torch.Size((self.out_features, self.in_features))

    def forward(self, x, *args, **kwargs):
        comfy.ops.run_every_op()
        s = self.__dict__.get(stream.ATTR)
        if s is not None and s.comfy_cast_weights:  # DynamicVRAM: cast in through the VBAR, released after
            return stream.forward(self, s, x)
        if self.weight.device != x.device:  # offloaded (low VRAM): run on a copy on the input's device
            return self.copy_to(x.device)(x)
        return super().forward(x)


_QUANT_CLASSES = {
    fmt: type(f"Comfy{cls.__name__}", (_ComfyQuantLinear, cls), {}) for fmt, cls in MODULES.items()
}


def _find_layer(prefix: str, layers: dict) -> str | None:
    parts = prefix.rstrip(".").split(".")
    for i in range(len(parts)):
        name = ".".join(parts[i:])
        if name in layers:
            return name
    return None


def make_ops(layers: dict, compute_dtype: torch.dtype | None = None, source: str = "checkpoint"):
    """An operations class for comfy.sd loaders.

    layers: {L: packed.config()} from the lowbit checkpoint(s). compute_dtype: the 16-bit dtype for
    the quantized layers' scales / low-rank / bias tensors; None keeps the model's dtype when it is
    16-bit, else the checkpoint's (ComfyUI picks float32 on CPU).
    """

    class LowBitOps(comfy.ops.manual_cast):
        class Linear(comfy.ops.manual_cast.Linear):
            def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
                # No weight allocated here: quantized layers never need the 16-bit one.
                torch.nn.Module.__init__(self)
                self.in_features = in_features
                self.out_features = out_features
                self._init = (bool(bias), device, dtype)
                self.weight = None
                self.bias = None

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
                if prefix + "wscales" in state_dict:
                    return self._load_lowbit(state_dict, prefix, local_metadata, unexpected_keys)
                has_bias, device, dtype = self._init
                self.weight = torch.nn.Parameter(
                    torch.empty((self.out_features, self.in_features), device=device, dtype=dtype), requires_grad=False)
                if has_bias:
                    self.bias = torch.nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype),
                                                   requires_grad=False)
                for k in ("weight", "bias"):
                    p = getattr(self, k)
                    if p is not None:
                        setattr(self, f"{k}_comfy_model_dtype", p.dtype)
                return torch.nn.Linear._load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                                                             missing_keys, unexpected_keys, error_msgs)

            def _load_lowbit(self, state_dict, prefix, local_metadata, unexpected_keys):
                name = _find_layer(prefix, layers)
                if name is None:
                    raise ValueError(f"{source}: layer {prefix.rstrip('.')} has quantized tensors but no entry in "
                                     f"lowbit.layers (expected one of its dotted suffixes)")
                cfg = layers[name]
                cls = _QUANT_CLASSES.get(cfg.get("format"))
                if cls is None:
                    raise ValueError(f"{source}: layer {name}: unknown format {cfg.get('format')!r}, "
                                     f"expected one of {sorted(_QUANT_CLASSES)}")
                fmt_cls = cls.FORMAT_CLS
                found = {k: state_dict[prefix + k] for k in fmt_cls.TENSORS if prefix + k in state_dict}
                packed = fmt_cls.from_tensors(found, cfg, layer=name)
                if (packed.in_features, packed.out_features) != (self.in_features, self.out_features):
                    raise ValueError(f"{source}: layer {name}: checkpoint holds {packed.out_features}x{packed.in_features}, "
                                     f"the model expects {self.out_features}x{self.in_features}")
                model_dtype = self._init[2]
                dtype = compute_dtype or (model_dtype if model_dtype in FLOAT16 else None)
                if dtype is not None and packed.wscales.dtype != dtype:
                    packed = packed.to(dtype=dtype)
                for k in list(state_dict):
                    if k.startswith(prefix) and k[len(prefix):] not in fmt_cls.TENSORS and "." not in k[len(prefix):]:
                        unexpected_keys.append(k)
                self._become(cls, packed)

            def _become(self, cls, packed):
                for k in ("weight", "bias"):
                    self._parameters.pop(k, None)
                    self.__dict__.pop(k, None)
                    self.__dict__.pop(f"{k}_comfy_model_dtype", None)
                for k in ("in_features", "out_features", "_init"):
                    self.__dict__.pop(k, None)
                self.__class__ = cls
                self._options = {k: v for k, v in packed.config().items()
                                 if k not in ("format", "in_features", "out_features")}
                for k in cls.FORMAT_CLS.TENSORS:
                    self.register_buffer(k, getattr(packed, k))

    return LowBitOps


def lowbit_modules(model: torch.nn.Module) -> dict:
    """{module path: quantized module} inside a built model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowBitLinear)}
