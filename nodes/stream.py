"""Quantized layers streamed by ComfyUI's DynamicVRAM (ModelPatcherDynamic) like its own weights.

ModelPatcherDynamic gives every castable layer of its load list an allocation in comfy-aimdo's VBAR and, when the
layer runs, `comfy.ops.cast_bias_weight(layer, ..., offloadable=True)` faults that allocation in: if the bytes are
still resident (same VBAR signature) they are used as they are, else `layer.weight` and `layer.bias` are copied in
from the host (through a pinned buffer) or, when the VBAR has no room, into a temporary cast buffer;
`uncast_bias_weight` releases them after. What it streams is `weight` and `bias`; any *buffer* it casts to the
device in every load instead. A weight of several tensors streams as core's QuantizedTensor: comfy/memory_management
sizes, gathers and rebuilds it through `__tensor_flatten__`.

So under ModelPatcherDynamic each quantized module gets a `Streamed` companion (the module attribute
`lowbit_stream`, not a submodule: the model's state dict and module tree stay as they are):
- `weight`: a QuantizedTensor of our own registered layout (`LowBitPacked`) whose data is the module's packed codes
  and whose parameters are its scales, smoothing, zero points and *original* low-rank branch: the very host
  tensors, nothing copied; `bias`: the original bias. These never change while the model lives, so the VBAR copies
  and the pinned host copies ComfyUI keeps stay valid across prompts and LoRA changes.
- `lora`: the columns LoRAs add to the branch (quant_ops.lora_columns) and a bias with its LoRA delta, on the
  load device; the forward concatenates them to the streamed branch, which gives exactly the branch that
  apply_lora installs on a resident layer (no repacking, no dequantization, bit-identical results).
The patcher (nodes/patcher.py) lists the companions instead of the modules in `_load_list(for_dynamic=True)` and
hides the modules' buffers from ModelPatcherDynamic.load, so nothing of a quantized layer is cast to the device
there. The module's forward (nodes/ops.py) then runs `forward()` below: cast, our kernels, uncast.
"""
import contextlib
import dataclasses

import torch

import comfy.memory_management
import comfy.ops
import comfy.quant_ops

from ..quant_ops import SVDQW4A4Linear, lora_columns, originals

ATTR = "lowbit_stream"
LAYOUT = "LowBitPacked"
QuantizedTensor = comfy.quant_ops.QuantizedTensor
# comfy-kitchen (a ComfyUI 0.29 requirement) provides QuantizedTensor; when it failed to import, ComfyUI logs it and
# runs without quantized formats: quantized layers then stay resident under DynamicVRAM (nodes/patcher.py)
AVAILABLE = isinstance(QuantizedTensor, type) and issubclass(QuantizedTensor, torch.Tensor)
_PARAMS = ("scale", "smooth", "wzeros", "proj_down", "proj_up")  # scale: wscales

if AVAILABLE:
    from comfy_kitchen.tensor import BaseLayoutParams

    @dataclasses.dataclass(frozen=True)
    class LowBitParams(BaseLayoutParams):
        """scale = wscales; the other tensors of the format (None where it has none); fmt names it."""

        fmt: str = ""
        smooth: torch.Tensor | None = None
        wzeros: torch.Tensor | None = None
        proj_down: torch.Tensor | None = None
        proj_up: torch.Tensor | None = None

        def _tensor_fields(self) -> list[str]:
            return [f for f in _PARAMS if getattr(self, f) is not None]

    class LowBitLayout(comfy.quant_ops.QuantizedLayout):
        """A container for core's memory management, not a format core computes with: our module calls our
        kernels on its parts. dequantize() (core's fallback for ops it has no handler for) is exact."""

        Params = LowBitParams

        @classmethod
        def quantize(cls, tensor, **kwargs):
            raise NotImplementedError("lowbit layers are quantized by `lowbit quantize` / LowBit Quantize Model")

        @classmethod
        def dequantize(cls, qdata, params):
            from ..quant_ops import FORMATS, module_from_packed

            fmt = FORMATS[params.fmt]
            tensors = {"weight": qdata, "wscales": params.scale, "smooth": params.smooth, "wzeros": params.wzeros,
                       "proj_down": params.proj_down, "proj_up": params.proj_up}
            packed = fmt(**{k: v for k, v in tensors.items() if k in fmt.TENSORS})
            return module_from_packed(packed).dequantize().to(params.orig_dtype)

        @classmethod
        def get_plain_tensors(cls, qtensor):
            p = qtensor._params
            return (qtensor._qdata, *(getattr(p, f) for f in _PARAMS))

        @classmethod
        def state_dict_tensors(cls, qdata, params):
            raise NotImplementedError("a lowbit layer's tensors are saved under their own names by the module")

    comfy.quant_ops.register_layout_class(LAYOUT, LowBitLayout)


class Streamed:
    """What ModelPatcherDynamic loads and cast_bias_weight casts for one quantized module (see the module doc).
    ComfyUI sets its own attributes on it as on a castable layer (comfy_cast_weights, _v, _v_signature, _pins,
    seed_key, weight_function, weight_lowvram_function, ...)."""

    comfy_cast_weights = False
    weight_function = []
    bias_function = []

    def __init__(self, module):
        orig = originals(module)
        down, up = (orig["proj_down"], orig["proj_up"]) if orig else module.branch()
        if "proj_down" not in module.FORMAT_CLS.TENSORS:  # W4A16: a runtime branch only ever carries LoRAs
            down = up = None
        buf = module._buffers
        params = LowBitParams(scale=buf["wscales"], orig_dtype=module.compute_dtype,
                              orig_shape=(module.out_features, module.in_features), fmt=module.fmt,
                              smooth=buf.get("smooth"), wzeros=buf.get("wzeros"), proj_down=down, proj_up=up)
        self.weight = QuantizedTensor(buf["weight"], LAYOUT, params)
        self.bias = orig["bias"] if orig else buf.get("bias")
        self.nbytes = comfy.memory_management.vram_aligned_size([self.weight, self.bias])
        self.lora = None  # {"proj_down", "proj_up", "bias"} from set_lora, on the load device
        self.shift_comp = {}  # device -> float32 shift compensation (fp8 / int8 activations on act_unsigned layers)

    def __deepcopy__(self, memo):
        # a deep copy of the model (ComfyUI's multi-GPU clones) gets companions of its own tensors at its first load
        return None

    def tensors(self, weight, bias) -> dict:
        """forward_with's tensors from a cast weight (our QuantizedTensor) and bias, with the LoRA columns."""
        p = weight._params
        t = {"weight": weight._qdata, "wscales": p.scale, "smooth": p.smooth, "wzeros": p.wzeros,
             "proj_down": p.proj_down, "proj_up": p.proj_up, "bias": bias}
        lora = self.lora
        if lora is not None:
            if lora["proj_down"] is not None:
                down, up = lora["proj_down"], lora["proj_up"]
                if t["proj_down"] is not None:
                    down, up = torch.cat([t["proj_down"], down], dim=1), torch.cat([t["proj_up"], up], dim=1)
                t["proj_down"], t["proj_up"] = down, up
            if lora["bias"] is not None:
                t["bias"] = lora["bias"]
        return t


def streamed(module, create: bool = False) -> Streamed | None:
    s = module.__dict__.get(ATTR)
    if s is None and create:
        s = module.__dict__[ATTR] = Streamed(module)
    return s


def active(module) -> bool:
    """True once ModelPatcherDynamic has loaded the module's companion as a castable layer."""
    s = module.__dict__.get(ATTR)
    return s is not None and s.comfy_cast_weights


def load_entries(layers: dict) -> list:
    """ModelPatcher._load_list(for_dynamic=True) rows for the companions of {path: module} (the rows ComfyUI makes
    for a castable layer: sort key (small first, then largest), bytes, key prefix, layer, its other parameters)."""
    rows = []
    for path, m in layers.items():
        s = streamed(m, create=True)
        rows.append((s.nbytes >= 64 * 1024, -s.nbytes, s.nbytes, f"{path}.{ATTR}", s, {}))
    return rows


@contextlib.contextmanager
def hidden_buffers(modules):
    """The modules' buffers set to None (which named_buffers, state_dict and Module._apply skip) while inside."""
    saved = [(m, dict(m._buffers)) for m in modules]
    for m, b in saved:
        m._buffers.update(dict.fromkeys(b))
    try:
        yield
    finally:
        for m, b in saved:
            m._buffers.update(b)


def keep_residency(modules):
    """{companion: (VBAR allocation, signature)} to hand to restore_residency after a load. ModelPatcherDynamic
    marks every layer's VBAR copy stale when the patches change (a LoRA added or re-weighted): right for its own
    layers, whose LoRA is merged into that copy, not for ours, whose streamed tensors never change."""
    kept = {}
    for m in modules:
        s = m.__dict__.get(ATTR)
        if s is not None and hasattr(s, "_v"):
            kept[s] = (s._v, getattr(s, "_v_signature", None))
    return kept


def restore_residency(kept: dict) -> None:
    for s, (v, signature) in kept.items():
        if getattr(s, "_v", None) is v:
            s._v_signature = signature


def set_lora(module, factors, bias_delta, device, layer: str) -> int:
    """Put the module's LoRAs (quant_ops LoraFactor list, bias delta or None) on its companion; bytes on `device`."""
    s = streamed(module, create=True)
    down, up, bias = lora_columns(module, factors, bias_delta, layer=layer, device=device)
    s.lora = None if down is None and bias is None else {"proj_down": down, "proj_up": up, "bias": bias}
    return sum(t.nbytes for t in (down, up, bias) if t is not None)


def clear_lora(module) -> bool:
    s = module.__dict__.get(ATTR)
    if s is None or s.lora is None:
        return False
    s.lora = None
    return True


def forward(module, s: Streamed, x: torch.Tensor) -> torch.Tensor:
    """The module's forward on the tensors ComfyUI streams in (cast_bias_weight / uncast_bias_weight)."""
    bias_dtype = None if s.bias is None else s.bias.dtype
    weight, bias, handle = comfy.ops.cast_bias_weight(s, None, dtype=s.weight.dtype, device=x.device,
                                                      bias_dtype=bias_dtype, offloadable=True)
    try:
        if not isinstance(weight, QuantizedTensor):
            # core dequantizes a VBAR layer that is asked to run on the CPU (a custom node moved the input there):
            # compute with the module's own tensors, which are host tensors under DynamicVRAM
            weight, bias = s.weight, s.bias
        t = s.tensors(weight, bias)
        if module.activations in ("fp8", "int8") and isinstance(module, SVDQW4A4Linear) and module._options["act_unsigned"]:
            comp = s.shift_comp.get(x.device)
            if comp is None:
                comp = s.shift_comp[x.device] = module.shift_compensation(t)
            t["shift_comp"] = comp
        for k in ("proj_down", "proj_up", "bias"):  # LoRA columns were made on the load device
            if t[k] is not None and t[k].device != x.device:
                t[k] = t[k].to(x.device)
        return module.forward_with(x, t)
    finally:
        comfy.ops.uncast_bias_weight(s, weight, bias, handle)
