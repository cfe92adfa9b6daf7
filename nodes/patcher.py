"""LoRA support for lowbit models in ComfyUI's standard LoRA loaders.

`wrap_patcher(model_patcher)` is called on every MODEL the lowbit loader returns. It switches the
patcher's class to a subclass of its own class (ModelPatcher or ModelPatcherDynamic) that routes
LoRA patches on quantized layers into their 16-bit low-rank branch (quant_ops/lora.py) instead of
merging them into the packed weight; 16-bit layers keep ComfyUI's usual merge.

How it fits ComfyUI's patcher:
- LoraLoader -> comfy.sd.load_lora_for_models maps keys with `model.state_dict()` (quantized layers
  keep their packed weight under `<layer>.weight`, so every format ComfyUI knows maps: BFL, kohya,
  diffusers / PEFT with q/k/v offsets into img_attn.qkv / linear1) and stores the patches per key.
- Quantized layers hold buffers, not parameters, so ComfyUI's load never merges into them (it only
  walks parameters). Each `load` (both patchers) first puts the original branches back, then sets each
  quantized layer's branch to original + its LoRAs (streamed layers: the LoRA columns, see below). A new
  strength or a removed LoRA recomposes only the small branch from the kept originals; packed weights
  are never reloaded, copied or cast.
- Legacy ModelPatcher: a LoRA change makes ComfyUI unpatch the whole model to the offload device and load
  it again; quantized layers are kept out of that move (`unpatch_model` inside `partially_load`), so
  their packed tensors are not copied to the host and back. A real unload still moves them.
- `patch_weight_to_device` (ComfyUI calls it for forced patching, small-module force loads and
  lazy saving) never casts or merges a quantized layer's tensors; `unpatch_model` puts back the exact
  original branch / bias tensors. Clones (also `clone(disable_dynamic=True)`) keep the behaviour.
Not routed (skipped with one warning line): DoRA, LoCon mid, LoHa / LoKr / full diffs and hook
(scheduled) LoRAs on quantized layers; they still apply to 16-bit layers.
Model merges (ModelMergeSimple & co. patch every key with the other model's tensors): a quantized layer holds its
own weight plus LoRAs, so a merge with the same model (same tensors) is exact (its LoRAs reweighted by the
merge, e.g. model + (model + LoRA) at 0.5 = the LoRA at 0.5); a merge with different weights leaves every quantized
layer as it is, says so in one warning line, and merges the 16-bit layers only. LoRA keys that match no
layer are ComfyUI's to report (one line per key; LowBitLoraStack reports them in one line).

ModelPatcherDynamic (DynamicVRAM, ComfyUI's default on NVIDIA with comfy-aimdo) streams the weights of castable
layers through its VBAR on demand, so a model larger than the card still runs. Quantized layers take part
(nodes/stream.py): each is listed in `_load_list(for_dynamic=True)` as its `Streamed` companion, whose weight is a
QuantizedTensor of the packed codes, scales and original branch, and whose bias is the original bias; the
module's buffers are hidden from ModelPatcherDynamic.load (which would cast every buffer to the device). Their
LoRAs are columns appended to the streamed branch at run time (kept on the device), so a LoRA change touches
no streamed tensor: their VBAR copies stay valid (`restore_residency`) and nothing is re-uploaded for it.
Without comfy-kitchen's QuantizedTensor (ComfyUI logs that it failed to import) quantized layers stay out of
the load list and resident, as in releases before streaming.
"""
import dataclasses
import logging

import comfy.lora
import comfy.model_patcher
import comfy.weight_adapter
import torch

from ..quant_ops import LoraFactor, LowBitLinear, apply_lora, check_factor, originals, remove_lora
from . import stream

log = logging.getLogger("comfyui_lowbit")


def lowbit_layers(model) -> dict:
    """{module path (as in patch keys): quantized module}."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowBitLinear)}


def _split_key(key: str, model):
    """(module path, quantized module, tensor name) when `key` names a quantized layer's tensor, else None."""
    path, _, name = key.rpartition(".")
    try:
        m = model.get_submodule(path)
    except AttributeError:
        return None
    return (path, m, name) if isinstance(m, LowBitLinear) else None


def _offsets(offset):
    """ComfyUI offset (dim, start, length) -> (out_offset, in_offset)."""
    if offset is None:
        return None, None
    dim, start, length = offset
    return ((start, length), None) if dim == 0 else (None, (start, length))


def _kind(v) -> str:
    if isinstance(v, comfy.weight_adapter.WeightAdapterBase):
        return v.name
    if isinstance(v, list):
        return "merge"
    return v[0] if isinstance(v, tuple) and len(v) == 2 else "diff"


def _same(t, own) -> bool:
    """`t` (another model's tensor for this key) holds exactly this layer's own tensor. Another model's tensors
    differ in their first row already: only that row is moved to compare them."""
    if t is own:
        return True
    if not (isinstance(t, torch.Tensor) and own is not None and t.shape == own.shape and t.dtype == own.dtype):
        return False
    if t.dim() and not torch.equal(t[:1].to(own.device), own[:1]):
        return False
    return torch.equal(t.to(own.device), own)


def _lora_factor(path: str, module: LowBitLinear, v, strength, offset) -> LoraFactor:
    """The LoraFactor of one ComfyUI LoRA weight patch on a quantized layer, checked against the layer's shape."""
    up, down, alpha = v.weights[:3]
    out_off, in_off = _offsets(offset)
    where = "" if offset is None else f" offset {tuple(offset)}"
    f = LoraFactor.from_alpha(up.flatten(1), down.flatten(1), alpha, strength, out_offset=out_off, in_offset=in_off,
                              name=f"{path}.weight{where}")
    check_factor(f, module.out_features, module.in_features, layer=path)
    return f


def _merge_terms(path: str, module: LowBitLinear, patches: list, own_weight):
    """A quantized layer's patches as c * (its own weight) + LoRA factors, following ComfyUI's calculate_weight
    (each patch first scales what came before by its strength_model, then adds strength x its value): (c, factors),
    or a reason string where the patches hold something else (another model's weights, a diff, ...)."""
    c, factors = 1.0, []
    for strength, v, strength_model, offset, function in patches:
        if strength_model != 1.0:
            c *= strength_model
            factors = [dataclasses.replace(f, scale=f.scale * strength_model) for f in factors]
        kind = _kind(v)
        if kind == "merge" and offset is None and function is None:
            if strength == 0.0:
                continue
            if not _same(v[0][0], own_weight):
                return "another model's weights"
            sub = _merge_terms(path, module, v[1:], own_weight)
            if isinstance(sub, str):
                return sub
            c += strength * sub[0]
            factors += [dataclasses.replace(f, scale=f.scale * strength) for f in sub[1]]
        elif kind == "lora" and function is None and all(t is None for t in v.weights[3:6]):
            factors.append(_lora_factor(path, module, v, strength, offset))
        else:
            return f"a {kind} patch"
    return c, factors


def _merged(path, module, weight_patches, bias_patches, other_patches):
    """(factors, bias delta) when the patches of a quantized layer include a model merge that its format can hold:
    the other model's layer is this very layer (same tensors: the same model with other LoRAs), so the merge
    reweights LoRAs and leaves the packed weight as it is. Else a reason string (not merged); None: no merge."""
    if not any(_kind(p[1]) == "merge" for p in weight_patches + bias_patches):
        return None
    terms = _merge_terms(path, module, weight_patches, module.weight)
    if isinstance(terms, str):
        return terms
    c, factors = terms
    if abs(c - 1.0) > 1e-6:
        return f"a weighted sum with coefficient {c:g} on its own weight"
    for name, patches in (other_patches or {}).items():  # scales, smoothing, branch: must be this layer's too
        own = getattr(module, name, None)
        if any(_kind(p[1]) != "merge" or (p[0] != 0.0 and not _same(p[1][0][0], own)) for p in patches):
            return "another model's weights"
    bias_delta = None
    if bias_patches:  # a 16-bit vector: ComfyUI's own arithmetic is exact on it
        own = module.bias.float()
        bias_delta = comfy.lora.calculate_weight(bias_patches, own.clone(), f"{path}.bias") - own
    return [f for f in factors if f.scale != 0.0], bias_delta


def lora_plan(path: str, module: LowBitLinear, weight_patches: list, bias_patches: list, other_patches=None):
    """(LoRA factors, bias delta or None, skipped descriptions, merge not applied: reason or None) for one quantized
    layer from ComfyUI patches; other_patches {tensor name: patches} are those on its other tensors (a model merge
    patches every one).

    Raises ValueError naming the key and both shapes when a LoRA does not fit the layer.
    """
    merged = _merged(path, module, weight_patches, bias_patches, other_patches)
    if isinstance(merged, tuple):
        return (*merged, [], None)
    merge_not_applied = merged
    if merged is not None:  # not representable: the merge is left out, the LoRAs still go in
        weight_patches = [p for p in weight_patches if _kind(p[1]) != "merge"]
        bias_patches = [p for p in bias_patches if _kind(p[1]) != "merge"]
    n = module.out_features
    factors, skipped, bias_delta = [], [], None
    for strength, v, strength_model, offset, function in weight_patches:
        key = f"{path}.weight"
        if _kind(v) != "lora" or strength_model != 1.0 or function is not None:
            why = ", strength_model" if strength_model != 1.0 else ", function" if function is not None else ""
            skipped.append(f"{key} ({_kind(v)}{why})")
            continue
        mid, dora_scale, reshape = v.weights[3:6]
        if mid is not None or dora_scale is not None or reshape is not None:
            skipped.append(f"{key} ({'dora' if dora_scale is not None else 'locon mid/reshape'})")
            continue
        f = _lora_factor(path, module, v, strength, offset)
        if strength != 0.0:
            factors.append(f)
    for strength, v, strength_model, offset, function in bias_patches:
        key = f"{path}.bias"
        if (isinstance(v, tuple) and len(v) in (1, 2) and (len(v) == 1 or v[0] == "diff")
                and strength_model == 1.0 and function is None):
            diff = (v[0] if len(v) == 1 else v[1][0]).float().reshape(-1)
            start, length = (0, n) if offset is None else (offset[1], offset[2])
            if diff.numel() != length or start + length > n:
                raise ValueError(f"LoRA bias patch {key}{'' if offset is None else f' offset {tuple(offset)}'}: "
                                 f"shape {tuple(diff.shape)} does not fit bias ({n},) at {start}:{start + length}")
            if bias_delta is None:
                bias_delta = diff.new_zeros(n)
            bias_delta[start:start + length] += strength * diff
        else:
            skipped.append(f"{key} (bias {type(v).__name__})")
    return factors, bias_delta, skipped, merge_not_applied


class LowBitPatcherMixin:
    """Mixed in before ComfyUI's patcher class by `wrap_patcher`."""

    lowbit_lora = True

    def lowbit_apply_patches(self):
        """Set every quantized layer's branch to its original plus its current LoRA patches (streamed layers: their
        LoRA columns, on the load device); the count."""
        plans, skipped, not_merged = [], [], {}
        for path, m in lowbit_layers(self.model).items():
            wp = self.patches.get(f"{path}.weight", [])
            bp = self.patches.get(f"{path}.bias", [])
            other = {name: self.patches[f"{path}.{name}"] for name, _ in m.named_buffers(recurse=False)
                     if name not in ("weight", "bias") and f"{path}.{name}" in self.patches}
            if wp or bp or other:
                # validates every layer before changing any
                factors, bias_delta, skip, merge = lora_plan(path, m, wp, bp, other)
                skipped += skip
                if merge is not None:
                    not_merged.setdefault(merge, []).append(path)
                plans.append((path, m, factors, bias_delta))
        done, extra = 0, 0
        try:
            for path, m, factors, bias_delta in plans:
                if stream.active(m):
                    extra += stream.set_lora(m, factors, bias_delta, self.load_device, layer=path)
                    done += stream.streamed(m).lora is not None
                else:
                    apply_lora(m, factors, bias_delta, layer=path)
                    done += originals(m) is not None
        except Exception:
            self.lowbit_restore()  # all or nothing
            raise
        self.model.model_loaded_weight_memory += extra
        if skipped:
            log.warning("lowbit: %d LoRA patches on quantized layers cannot go into the low-rank branch and were "
                        "skipped: %s%s", len(skipped), ", ".join(skipped[:4]), ", ..." if len(skipped) > 4 else "")
        if not_merged and getattr(self, "_lowbit_merge_warned", None) != self.patches_uuid:
            self._lowbit_merge_warned = self.patches_uuid  # once per set of patches, not at every load
            n = sum(len(v) for v in not_merged.values())
            why, paths = max(not_merged.items(), key=lambda kv: len(kv[1]))
            log.warning("lowbit: model merge: %d quantized layers (e.g. %s: %s) were not merged and keep this model's "
                        "weights; a 4-bit / ternary layer cannot hold a weighted sum of different weights without "
                        "quantizing again, so the merge changed only the 16-bit layers (embedders, norms, final layer). "
                        "Merge the 16-bit models and quantize the result instead (merging a lowbit model with itself "
                        "plus LoRAs works)", n, paths[0], why)
        return done

    def lowbit_restore(self):
        """Put back every quantized layer's original branch and bias (the very tensors); the count."""
        return sum(remove_lora(m) | stream.clear_lora(m) for m in lowbit_layers(self.model).values())

    def _lowbit_streams(self) -> bool:
        return self.is_dynamic() and stream.AVAILABLE

    def load(self, *args, **kwargs):
        # Originals back first, so that whatever ComfyUI backs up during load is the original branch; the LoRAs go
        # in after, from the patches as they are now.
        self.lowbit_restore()
        if self._lowbit_streams():
            layers = lowbit_layers(self.model).values()
            for m in layers:
                stream.streamed(m, create=True)
            kept = stream.keep_residency(layers)
            with stream.hidden_buffers(layers):
                out = super().load(*args, **kwargs)
            stream.restore_residency(kept)
        else:
            out = super().load(*args, **kwargs)
        if not self.is_dynamic():
            self._offload_left_resident()
        self.lowbit_apply_patches()
        for m in lowbit_layers(self.model).values():
            if not stream.active(m):  # streamed layers derive theirs per device from the streamed tensors
                m.prepare()  # before any forward, so that a compiled model is traced once
        return out

    def _offload_left_resident(self):
        """Legacy low-VRAM load: a quantized layer kept on the device by a LoRA change (unpatch_model) but now
        chosen for offloading (not loaded completely) goes to the offload device, as ComfyUI assumes."""
        device = torch.device(self.load_device)
        if device == torch.device(self.offload_device):
            return
        for m in lowbit_layers(self.model).values():
            if not getattr(m, "comfy_patched_weights", False) and m.weight.device == device:
                m.to(self.offload_device)

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        self._lowbit_in_partially_load = True  # tells unpatch_model that a new set of patches is being loaded
        try:
            return super().partially_load(device_to, extra_memory=extra_memory, force_patch_weights=force_patch_weights)
        finally:
            self._lowbit_in_partially_load = False

    def _load_list(self, for_dynamic=False, default_device=None):
        loading = super()._load_list(for_dynamic=for_dynamic, default_device=default_device)
        if not for_dynamic:  # legacy ModelPatcher: quantized layers take part in low-VRAM partial loading
            return loading
        loading = [x for x in loading if not isinstance(x[-2], LowBitLinear)]  # (..., module_mem, name, module, params)
        if stream.AVAILABLE:  # ModelPatcherDynamic: their Streamed companions instead
            loading += stream.load_entries(lowbit_layers(self.model))
        return loading

    def restore_loaded_backups(self):
        # ModelPatcherDynamic only: first thing in its load, and when ComfyUI frees VRAM (LoRA columns freed too;
        # the next load puts them back).
        self.lowbit_restore()
        return super().restore_loaded_backups()

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        # Before ComfyUI's own restore, which may move the model (device_to) or put back buffers it backed up.
        if unpatch_weights:
            self.lowbit_restore()
        stay = self._stay_resident() if unpatch_weights and device_to is not None else {}
        try:
            return super().unpatch_model(device_to=device_to, unpatch_weights=unpatch_weights)
        finally:
            for m, buffers in stay.items():
                m._buffers.update(buffers)

    def _stay_resident(self) -> dict:
        """Legacy ModelPatcher, patches changed (a LoRA added, re-weighted or removed): partially_load unpatches
        the model to the offload device and loads it again. Quantized layers on the device are hidden from
        that move (their LoRAs only recompose the branch), so their packed tensors are not copied to the host
        and back. {module: its buffers} to put back after the move; empty for any other unpatch."""
        if (self.is_dynamic() or not getattr(self, "_lowbit_in_partially_load", False)
                or self.model.current_weight_patches_uuid in (None, self.patches_uuid)):
            return {}
        device, stay = torch.device(self.load_device), {}
        for m in lowbit_layers(self.model).values():
            if m.weight.device == device:
                stay[m] = dict(m._buffers)
                m._buffers.update({k: None for k in stay[m]})  # Module._apply skips None buffers
        return stay

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False, return_weight=False, force_cast=False):
        hit = _split_key(key, self.model)
        if hit is None:
            return super().patch_weight_to_device(key, device_to=device_to, inplace_update=inplace_update,
                                                  return_weight=return_weight, force_cast=force_cast)
        # Never cast or merge a quantized layer's tensors; its LoRAs go into the branch after `load`
        # (composing here, inside ModelPatcherDynamic.load, would get the LoRA branch backed up as original).
        path, m, name = hit
        return getattr(m, name) if return_weight else None

    def patch_hook_weight_to_device(self, hooks, combined_patches, key, original_weights, memory_counter):
        if _split_key(key, self.model) is not None:
            if key in combined_patches:
                log.warning("lowbit: hook (scheduled) LoRA patches are not supported on quantized layers; %s skipped", key)
            return
        return super().patch_hook_weight_to_device(hooks, combined_patches, key, original_weights, memory_counter)

    def clone(self, *args, **kwargs):
        return wrap_patcher(super().clone(*args, **kwargs))


_CLASSES = {}


def _lowbit_class(cls):
    if issubclass(cls, LowBitPatcherMixin):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"LowBit{cls.__name__}", (LowBitPatcherMixin, cls), {})
    return _CLASSES[cls]


def wrap_patcher(model_patcher):
    """Make a ModelPatcher (any subclass) route LoRAs on quantized layers into their low-rank branch.

    The instance keeps its state; only its class changes (to LowBit<its class>), so clones keep it.
    """
    if model_patcher is None or not isinstance(model_patcher, comfy.model_patcher.ModelPatcher):
        return model_patcher
    model_patcher.__class__ = _lowbit_class(type(model_patcher))
    return model_patcher
