"""Quantized linear layers: packed tensors as buffers, forward through the dispatched kernels."""
import torch
from torch import nn

from .. import kernels
from ..kernels.reference import ACT_SHIFT, dequant_int4
from .formats import TernaryWeights, W4A4Weights, W4A16Weights


# non-persistent buffers computed from a layer's tensors for an activation mode, dropped when those change
DERIVED = ("shift_comp", "int8_s1", "int8_s0")


class LowBitLinear(nn.Module):
    """Base: the buffers are the format's tensors under the same names as in a checkpoint."""

    FORMAT_CLS = None
    VALUES_PER_BYTE = 2
    activations = "int4"  # run-time activation mode (quant_ops/activations.py), never in a checkpoint
    int8_progressive = False  # int8 mode of svdq_w4a4: integer group scales (kernels.progressive_scales)

    def __init__(self, packed):
        super().__init__()
        packed.validate(type(self).__name__)
        self._options = {k: v for k, v in packed.config().items() if k not in ("format", "in_features", "out_features")}
        for k in packed.TENSORS:
            self.register_buffer(k, getattr(packed, k))

    @property
    def fmt(self) -> str:
        return self.FORMAT_CLS.FORMAT

    def packed(self):
        """The layer's format object (sharing this module's tensors)."""
        return self.FORMAT_CLS(**{k: getattr(self, k) for k in self.FORMAT_CLS.TENSORS}, **self._options)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] * self.VALUES_PER_BYTE

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.wscales.dtype

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Shapes (rank, group size) come from the checkpoint, so buffers are replaced rather than copied into.
        found = {k: state_dict[prefix + k] for k in self.FORMAT_CLS.TENSORS if prefix + k in state_dict}
        if not found:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        packed = self.FORMAT_CLS.from_tensors(found, self._options, layer=prefix.rstrip("."))
        for k in self.FORMAT_CLS.TENSORS:
            setattr(self, k, getattr(packed, k))
        for k in DERIVED:
            self._buffers.pop(k, None)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        if x.shape[-1] != k:
            raise ValueError(f"{type(self).__name__}: input last dimension is {x.shape[-1]}, expected in_features = {k}")
        return x.reshape(-1, k)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self._options.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, {opts}".rstrip(", ")

    def float_bias(self) -> torch.Tensor | None:
        """The bias of the float layer that `dequantize()` describes."""
        return None if self.bias is None else self.bias.float()

    # LoRA support (quant_ops/lora.py): the 16-bit low-rank branch can be replaced at run time.
    def forward(self, x):
        return self.forward_with(x, self.forward_tensors())

    def forward_tensors(self) -> dict:
        """{name: tensor} that forward() computes with: the format's tensors and the current low-rank branch
        (a runtime one for formats without a branch in their checkpoint). forward_with(x, t) takes the same
        names from elsewhere (nodes/stream.py passes the device copies ComfyUI's DynamicVRAM streams in)."""
        t = {k: self._buffers.get(k) for k in self.FORMAT_CLS.TENSORS}
        t["proj_down"], t["proj_up"] = self.branch()
        return t

    def branch(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(proj_down (K, r), proj_up (N, r)) of the low-rank branch, or (None, None)."""
        return self._buffers.get("proj_down"), self._buffers.get("proj_up")

    def set_branch(self, proj_down: torch.Tensor | None, proj_up: torch.Tensor | None) -> None:
        """Install a low-rank branch (both tensors, or None for none). Formats without a branch in
        their checkpoint (W4A16) get non-persistent buffers, so state_dict() and checkpoints are unchanged."""
        if (proj_down is None) != (proj_up is None):
            raise ValueError(f"{type(self).__name__}.set_branch: give both proj_down and proj_up, or neither")
        for name, t in (("proj_down", proj_down), ("proj_up", proj_up)):
            if name in self._buffers:
                setattr(self, name, t)
            else:
                self.register_buffer(name, t, persistent=False)

    def prepare(self) -> None:
        """Compute now the tensors the current activation mode derives from the weights (non-persistent buffers,
        DERIVED), which a first forward would otherwise add: a compiled model would then be traced again."""

    def copy_to(self, device) -> "LowBitLinear":
        """A plain lowbit module holding copies of this one's tensors on `device` (runtime branch, activation
        mode and the tensors derived for it included: computed once here, not on every offloaded call)."""
        self.prepare()
        m = module_from_packed(self.packed().to(device=device))
        down, up = self.branch()
        if down is not None and "proj_down" not in self.FORMAT_CLS.TENSORS:
            m.set_branch(down.to(device), up.to(device))
        m.activations, m.int8_progressive = self.activations, self.int8_progressive
        for k in DERIVED:
            if self._buffers.get(k) is not None:
                m.register_buffer(k, self._buffers[k].to(device), persistent=False)
        return m


class SVDQW4A4Linear(LowBitLinear):
    FORMAT_CLS = W4A4Weights

    def forward_with(self, x, t: dict):
        x2 = self._flat(x)
        if self.activations == "fp8":
            q, s, lr = kernels.quantize_act_fp8(x2, t["smooth"], t["proj_down"])
            y = kernels.int4_fp8_gemm(q, s, t["weight"], t["wscales"], lr, t["proj_up"], self._unshifted_bias(t),
                                      out_dtype=x.dtype)
        elif self.activations == "int8":
            q, s, lr = kernels.quantize_act_int8(x2, t["proj_down"], t["smooth"])
            ws, s0 = self._int8_scales(t)
            y = kernels.w4a8_gemm(q, s, t["weight"], ws, lr, t["proj_up"], self._unshifted_bias(t), out_dtype=x.dtype,
                                  s0=s0)
        else:
            q, s, lr = self._quantize(x2, t)
            y = kernels.w4a4_gemm(q, s, t["weight"], t["wscales"], lr, t["proj_up"], t["bias"], out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def prepare(self) -> None:
        if self.activations in ("fp8", "int8"):
            t = self.forward_tensors()
            self._unshifted_bias(t)
            if self.activations == "int8":
                self._int8_scales(t)

    def _unshifted_bias(self, t: dict) -> torch.Tensor | None:
        """FP8 and int8 activations are not shifted, so an unsigned layer gets back the shift's share that the
        checkpoint folded out of its bias: float32 bias + shift_compensation(). The compensation depends on the
        weights only and is computed once (t["shift_comp"] where the caller keeps it, else a non-persistent buffer);
        the bias is the current one, LoRA bias patches included."""
        bias = t["bias"]
        if not self._options["act_unsigned"]:
            return bias
        comp = t.get("shift_comp")
        if comp is None:
            if self._buffers.get("shift_comp") is None:
                self.register_buffer("shift_comp", self.shift_compensation(), persistent=False)
            comp = self.shift_comp
        return comp if bias is None else bias.float() + comp

    def _int8_scales(self, t: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(group scales, channel scales) for kernels.w4a8_gemm: the checkpoint's wscales (None), or with
        int8_progressive its integer group scales under float32 channel scales, computed once for the module's own
        wscales (buffers) and on every call for tensors streamed in from elsewhere."""
        if not self.int8_progressive:
            return t["wscales"], None
        if t["wscales"] is not self._buffers.get("wscales"):
            return kernels.progressive_scales(t["wscales"])
        if self._buffers.get("int8_s1") is None:
            s1, s0 = kernels.progressive_scales(self.wscales)
            self.register_buffer("int8_s1", s1, persistent=False)
            self.register_buffer("int8_s0", s0, persistent=False)
        return self.int8_s1, self.int8_s0

    def _quantize(self, x2, t: dict | None = None):
        # act_unsigned_from u > 0: signed channels [0, u), unsigned shifted channels [u, K), one kernel call
        t = self.forward_tensors() if t is None else t
        u = self._options.get("act_unsigned_from", 0)
        unsigned = u if u else bool(self._options["act_unsigned"])
        return kernels.quantize_act_int4(x2, t["smooth"], t["proj_down"], unsigned=unsigned)

    def _residual(self, t: dict | None = None) -> torch.Tensor:
        t = self.forward_tensors() if t is None else t
        return dequant_int4(t["weight"], t["wscales"], dtype=torch.float32) / t["smooth"].float()

    def shift_compensation(self, t: dict | None = None) -> torch.Tensor | None:
        """float32 (N,): the share of the +0.171875 input shift that the checkpoint folded out of the bias
        (None for a signed layer); float_bias() = bias + this. `t`: forward_with's tensors (default: own)."""
        if not self._options["act_unsigned"]:
            return None
        return ACT_SHIFT * self._residual(t)[:, self._options.get("act_unsigned_from", 0):].sum(dim=1)

    def dequantize(self) -> torch.Tensor:
        """float32 (N, K) weight: residual / smooth + proj_up @ proj_down^T."""
        w = self._residual()
        if self.proj_down is not None:
            w = w + self.proj_up.float() @ self.proj_down.float().t()
        return w

    def float_bias(self):
        comp = self.shift_compensation()
        if comp is None:
            return super().float_bias()
        return comp if self.bias is None else self.bias.float() + comp


class W4A16Linear(LowBitLinear):
    """Weight-only int4. The format has no low-rank branch; `set_branch` adds an optional runtime one
    (non-persistent buffers proj_down / proj_up, used to carry LoRAs), computed like the other formats'
    branch: lr = x proj_down in float32, out = x W^T + lr proj_up^T in float32, then + bias (kernels/reference.py)."""

    FORMAT_CLS = W4A16Weights

    def forward_with(self, x, t: dict):
        x2 = self._flat(x)
        lr = kernels.lora_down(x2, t["proj_down"])
        y = kernels.w4a16_gemm(x2, t["weight"], t["wscales"], t["wzeros"], t["bias"], out_dtype=x.dtype, lr=lr,
                               proj_up=t["proj_up"])
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def dequantize(self) -> torch.Tensor:
        w = dequant_int4(self.weight, self.wscales, self.wzeros, dtype=torch.float32)
        down, up = self.branch()
        if down is not None:
            w = w + up.float() @ down.float().t()
        return w


class TernaryLinear(LowBitLinear):
    FORMAT_CLS = TernaryWeights
    VALUES_PER_BYTE = 4

    def forward_with(self, x, t: dict):
        x2 = self._flat(x)
        w, ws, down, up, bias = t["weight"], t["wscales"], t["proj_down"], t["proj_up"], t["bias"]
        if self.activations == "fp8":
            q, s, lr = kernels.quantize_act_fp8(x2, None, down)
            y = kernels.ternary_fp8_gemm(q, s, w, ws, lr, up, bias, out_dtype=x.dtype)
        elif self._options["act_int8"] or self.activations == "int8":
            q, s, lr = kernels.quantize_act_int8(x2, down)
            y = kernels.ternary_int8_gemm(q, s, w, ws, lr, up, bias, out_dtype=x.dtype)
        else:
            lr = kernels.lora_down(x2, down)
            y = kernels.ternary_gemm(x2, w, ws, lr, up, bias, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def dequantize(self) -> torch.Tensor:
        w = kernels.unpack_ternary(self.weight).float() * self.wscales.float().unsqueeze(1)
        if self.proj_down is not None:
            w = w + self.proj_up.float() @ self.proj_down.float().t()
        return w


MODULES = {cls.FORMAT_CLS.FORMAT: cls for cls in (SVDQW4A4Linear, W4A16Linear, TernaryLinear)}


def module_from_packed(packed) -> LowBitLinear:
    return MODULES[packed.FORMAT](packed)
