"""comfy-aimdo's VBAR emulated on the CPU, so that ComfyUI's DynamicVRAM cast path runs in CPU tests.

On a GPU, ModelPatcherDynamic gives every castable layer an allocation in a VBAR (virtual VRAM); `vbar_fault`
makes an allocation resident and returns its signature (the same one while its bytes stayed in VRAM, a new one
after they were evicted; None when there is no room, and ComfyUI then uses a temporary cast buffer),
`aimdo_to_tensor` maps it as a uint8 tensor, `vbar_unpin` lets it be evicted again. `FakeVBAR` does the same in
host memory with a byte budget standing in for the card: least recently used unpinned allocations are evicted
(their bytes overwritten with garbage, so a stale read would change the result), and it counts faults,
uploads (ComfyUI mapping the allocation to copy the layer in) and misses per allocation.

`install(monkeypatch, budget)` makes ModelPatcherDynamic use it (its own `_vbar_get` has no VBAR for a CPU
load device), maps allocations through it and turns pinned host memory off (cudaHostRegister). cast_bias_weight
takes its VBAR branch only for a layer whose weight is on another device than the one asked for, and refuses CPU
devices there (a GPU-only path): for a caller that passes the device explicitly (our Streamed layers; ComfyUI's
own layers derive it from the input and keep their plain CPU path) the CPU is given as "cpu:0", which is the
host to torch but compares unequal to the weights' "cpu", and that one check answers "not a CPU". Everything
ComfyUI does between is its own code: cast_modules_with_vbar, resolve_cast_module_with_vbar,
interpret_gathered_like over __tensor_flatten__, cast_to_gathered, uncast_bias_weight.
"""
import collections
import sys


class FakeVBAR:
    def __init__(self, budget: int):
        self.budget = budget
        self.offset = 0
        self.pages = {}  # offset -> uint8 tensor: the allocation's "VRAM" while resident
        self.resident = collections.OrderedDict()  # offset -> (size, signature), least recently used first
        self.pinned = set()
        self.serial = 0
        self.peak = 0
        self.faults, self.uploads, self.misses = collections.Counter(), collections.Counter(), collections.Counter()

    def prioritize(self):
        pass

    def alloc(self, num_bytes):
        self.offset = (self.offset + 511) & ~511
        alloc = (self, self.offset, num_bytes)
        self.offset += num_bytes
        return alloc

    def fault(self, offset, size):
        self.faults[offset] += 1
        if offset in self.resident:
            self.resident.move_to_end(offset)
            self.pinned.add(offset)
            return self.resident[offset][1]
        while self.loaded_size() + size > self.budget:
            victim = next((o for o in self.resident if o not in self.pinned), None)
            if victim is None:
                self.misses[offset] += 1
                return None
            self._evict(victim)
        import torch

        self.serial += 1
        signature = self.serial.to_bytes(8, "little")
        self.resident[offset] = (size, signature)
        self.pages[offset] = torch.full((size,), 0xA5, dtype=torch.uint8)
        self.pinned.add(offset)
        self.peak = max(self.peak, self.loaded_size())
        return signature

    def _evict(self, offset):
        del self.resident[offset]
        self.pages.pop(offset).fill_(0x5A)

    def unpin(self, offset, size):
        self.pinned.discard(offset)

    def loaded_size(self):
        return sum(size for size, _ in self.resident.values())

    def free_memory(self, size_bytes):
        freed = 0
        for offset in [o for o in self.resident if o not in self.pinned]:
            if freed >= size_bytes:
                break
            freed += self.resident[offset][0]
            self._evict(offset)
        return freed

    def tensor(self, alloc):
        """aimdo_to_tensor: ComfyUI maps an allocation only to copy a layer into it (not resident by signature)."""
        self.uploads[alloc[1]] += 1
        return self.pages[alloc[1]]


class VRAM:
    """The test's handle: `budget` for new VBARs, `set_budget` for all, the VBARs made so far."""

    def __init__(self, budget):
        self.budget = budget
        self.vbars = []

    def set_budget(self, budget):
        self.budget = budget
        for v in self.vbars:
            v.budget = budget
            v.free_memory(max(0, v.loaded_size() - budget))
            v.peak = v.loaded_size()

    def vbar(self, patcher):
        return patcher.model.dynamic_vbars[patcher.load_device]


def install(monkeypatch, budget: int) -> VRAM:
    import comfy.cli_args
    import comfy.model_management as mm
    import comfy.model_patcher as mpm
    import comfy.ops
    import comfy_aimdo.torch
    import torch

    vram = VRAM(budget)

    def vbar_get(self, create=False):
        vbar = self.model.dynamic_vbars.get(self.load_device)
        if create and vbar is None:
            vbar = self.model.dynamic_vbars[self.load_device] = FakeVBAR(vram.budget)
            vram.vbars.append(vbar)
        return vbar

    real_is_cpu, cast_code = mm.is_device_cpu, comfy.ops.cast_bias_weight.__code__

    def is_device_cpu(device):  # only cast_bias_weight's "VBAR layer on a CPU input" check answers no
        return False if sys._getframe(1).f_code is cast_code else real_is_cpu(device)

    real_cast = comfy.ops.cast_bias_weight

    def cast_bias_weight(s, input=None, dtype=None, device=None, *args, **kwargs):
        if hasattr(s, "_v") and device is not None and torch.device(device) == torch.device("cpu"):
            device = torch.device("cpu", 0)
        return real_cast(s, input, dtype, device, *args, **kwargs)

    monkeypatch.setattr(mpm.ModelPatcherDynamic, "_vbar_get", vbar_get)
    monkeypatch.setattr(comfy_aimdo.torch, "aimdo_to_tensor", lambda alloc, device: alloc[0].tensor(alloc))
    monkeypatch.setattr(mm, "is_device_cpu", is_device_cpu)
    monkeypatch.setattr(comfy.ops, "cast_bias_weight", cast_bias_weight)
    monkeypatch.setattr(comfy.cli_args.args, "disable_pinned_memory", True)
    return vram
