"""Packed weight formats: small dataclasses with explicit shapes and dtypes.

Every format stores its packed weight under `weight` so that ComfyUI's LoRA key mapping, which looks
for `<layer>.weight`, finds quantized layers; `in_features`/`out_features` give the logical shape.
"""
from dataclasses import dataclass, fields

import torch

from ..kernels.packing import pack_int4, pack_ternary, unpack_int4, unpack_ternary

FORMAT_VERSION = 1
FLOAT16 = (torch.bfloat16, torch.float16)
GROUP_SIZE = 64


def _expect(cond: bool, layer: str, key: str, what: str, got) -> None:
    if not cond:
        raise ValueError(f"{layer}.{key}: expected {what}, got {got}")


def _desc(t: torch.Tensor | None) -> str:
    return "None" if t is None else f"{tuple(t.shape)} {t.dtype}"


@dataclass
class _Packed:
    """Shared plumbing: tensors() for the state dict, from_tensors() back, config() for metadata."""

    FORMAT = ""
    TENSORS = ()  # tensor field names, in state-dict order
    OPTIONAL = ()
    CODES_PER_BYTE = 2  # packed `weight` is uint8 (N, K / CODES_PER_BYTE)

    def tensors(self) -> dict:
        return {k: getattr(self, k) for k in self.TENSORS if getattr(self, k) is not None}

    def config(self) -> dict:
        extra = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.TENSORS}
        return {"format": self.FORMAT, "in_features": self.in_features, "out_features": self.out_features, **extra}

    @classmethod
    def from_tensors(cls, tensors: dict, config: dict | None = None, layer: str = "layer"):
        missing = [k for k in cls.TENSORS if k not in tensors and k not in cls.OPTIONAL]
        if missing:
            raise ValueError(f"{layer}: {cls.FORMAT} layer is missing tensors {missing} (has {sorted(tensors)})")
        names = {f.name for f in fields(cls)}
        opts = {k: v for k, v in (config or {}).items() if k in names and k not in cls.TENSORS}
        obj = cls(**{k: tensors.get(k) for k in cls.TENSORS}, **opts)
        obj.validate(layer)
        return obj

    def to(self, device=None, dtype=None):
        """Copy with tensors moved to `device` and 16-bit floats cast to `dtype`."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
            kw[f.name] = v
        return type(self)(**kw)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def _check_lowrank(layer, proj_down, proj_up, n, k):
    if proj_down is None and proj_up is None:
        return
    _expect(proj_down is not None and proj_up is not None, layer, "proj_down/proj_up", "both or neither",
            f"proj_down {_desc(proj_down)}, proj_up {_desc(proj_up)}")
    _expect(proj_down.dim() == 2 and proj_down.shape[0] == k, layer, "proj_down", f"shape ({k}, rank)", _desc(proj_down))
    _expect(proj_up.shape == (n, proj_down.shape[1]), layer, "proj_up", f"shape ({n}, {proj_down.shape[1]})", _desc(proj_up))
    _expect(proj_down.dtype in FLOAT16 and proj_up.dtype == proj_down.dtype, layer, "proj_down/proj_up",
            "one 16-bit dtype", f"{proj_down.dtype}/{proj_up.dtype}")


def _check_bias(layer, bias, n, dtype):
    if bias is not None:
        _expect(bias.shape == (n,) and bias.dtype == dtype, layer, "bias", f"shape ({n},) {dtype}", _desc(bias))


@dataclass
class W4A4Weights(_Packed):
    """SVDQuant W4A4: y = Q(x/smooth) Q(R)^T + (x proj_down) proj_up^T + bias.

    weight uint8 (N, K/2) int4 residual; wscales (K/64, N) 16-bit; smooth (K,); proj_down (K, r);
    proj_up (N, r); bias (N,). act_unsigned: input is shifted by +0.171875 and quantized unsigned
    (post-GELU), the residual's share of the shift already folded into bias. act_unsigned_from: with
    act_unsigned, only input channels k >= act_unsigned_from (a multiple of 64) are shifted and unsigned,
    the ones before stay signed (Nunchaku's single-block linear2: attention output, then GELU output).
    """

    weight: torch.Tensor
    wscales: torch.Tensor
    smooth: torch.Tensor
    proj_down: torch.Tensor | None = None
    proj_up: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    act_unsigned: bool = False
    act_unsigned_from: int = 0

    FORMAT = "svdq_w4a4"
    TENSORS = ("weight", "wscales", "smooth", "proj_down", "proj_up", "bias")
    OPTIONAL = ("proj_down", "proj_up", "bias")

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] * 2

    @property
    def rank(self) -> int:
        return 0 if self.proj_down is None else self.proj_down.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.wscales.dtype

    @classmethod
    def pack(cls, q, wscales, smooth, proj_down=None, proj_up=None, bias=None, act_unsigned=False, act_unsigned_from=0):
        obj = cls(pack_int4(q), wscales, smooth, proj_down, proj_up, bias, act_unsigned, act_unsigned_from)
        obj.validate()
        return obj

    def unpack(self) -> torch.Tensor:
        return unpack_int4(self.weight)

    def validate(self, layer: str = "layer") -> None:
        w = self.weight
        _expect(w.dtype == torch.uint8 and w.dim() == 2, layer, "weight", "uint8 (N, K/2)", _desc(w))
        n, k = self.out_features, self.in_features
        _expect(k % GROUP_SIZE == 0, layer, "weight", f"K = 2 * weight.shape[1] a multiple of {GROUP_SIZE}", k)
        _expect(self.wscales.shape == (k // GROUP_SIZE, n) and self.wscales.dtype in FLOAT16, layer, "wscales",
                f"16-bit ({k // GROUP_SIZE}, {n})", _desc(self.wscales))
        _expect(self.smooth.shape == (k,) and self.smooth.dtype == self.dtype, layer, "smooth", f"({k},) {self.dtype}", _desc(self.smooth))
        _check_lowrank(layer, self.proj_down, self.proj_up, n, k)
        _check_bias(layer, self.bias, n, self.dtype)
        u = self.act_unsigned_from
        _expect(u == 0 or (self.act_unsigned and 0 < u < k and u % GROUP_SIZE == 0), layer, "act_unsigned_from",
                f"0, or with act_unsigned a multiple of {GROUP_SIZE} below K = {k}", u)


@dataclass
class W4A16Weights(_Packed):
    """Weight-only int4: W = q * wscales (+ wzeros) per group along K; 16-bit activations.

    weight uint8 (N, K/2); wscales (K/group, N) 16-bit; wzeros optional (K/group, N); bias (N,).
    """

    weight: torch.Tensor
    wscales: torch.Tensor
    wzeros: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    FORMAT = "w4a16"
    TENSORS = ("weight", "wscales", "wzeros", "bias")
    OPTIONAL = ("wzeros", "bias")

    out_features = W4A4Weights.out_features
    in_features = W4A4Weights.in_features
    dtype = W4A4Weights.dtype

    @property
    def group_size(self) -> int:
        return self.in_features // self.wscales.shape[0]

    @classmethod
    def pack(cls, q, wscales, wzeros=None, bias=None):
        obj = cls(pack_int4(q), wscales, wzeros, bias)
        obj.validate()
        return obj

    def unpack(self) -> torch.Tensor:
        return unpack_int4(self.weight)

    def validate(self, layer: str = "layer") -> None:
        w = self.weight
        _expect(w.dtype == torch.uint8 and w.dim() == 2, layer, "weight", "uint8 (N, K/2)", _desc(w))
        n, k = self.out_features, self.in_features
        s = self.wscales
        _expect(s.dim() == 2 and s.shape[1] == n and s.dtype in FLOAT16, layer, "wscales", f"16-bit (K/group, {n})", _desc(s))
        _expect(s.shape[0] > 0 and k % s.shape[0] == 0 and (k // s.shape[0]) in (64, 128), layer, "wscales",
                f"K/group rows with group 64 or 128 (K = {k})", _desc(s))
        if self.wzeros is not None:
            _expect(self.wzeros.shape == s.shape and self.wzeros.dtype == s.dtype, layer, "wzeros", _desc(s), _desc(self.wzeros))
        _check_bias(layer, self.bias, n, self.dtype)


@dataclass
class TernaryWeights(_Packed):
    """1.58-bit: W = T * wscales[n] with T in {-1, 0, 1}; optional low-rank branch on the raw input.

    weight uint8 (N, K/4); wscales (N,) 16-bit; proj_down (K, r), proj_up (N, r) optional; bias (N,).
    act_int8: activations quantized per token to int8 for the integer dot.
    """

    weight: torch.Tensor
    wscales: torch.Tensor
    proj_down: torch.Tensor | None = None
    proj_up: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    act_int8: bool = False

    FORMAT = "ternary"
    TENSORS = ("weight", "wscales", "proj_down", "proj_up", "bias")
    OPTIONAL = ("proj_down", "proj_up", "bias")
    CODES_PER_BYTE = 4

    out_features = W4A4Weights.out_features
    rank = W4A4Weights.rank
    dtype = W4A4Weights.dtype

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] * 4

    @classmethod
    def pack(cls, t, wscales, proj_down=None, proj_up=None, bias=None, act_int8=False):
        obj = cls(pack_ternary(t), wscales, proj_down, proj_up, bias, act_int8)
        obj.validate()
        return obj

    def unpack(self) -> torch.Tensor:
        return unpack_ternary(self.weight)

    def validate(self, layer: str = "layer") -> None:
        w = self.weight
        _expect(w.dtype == torch.uint8 and w.dim() == 2, layer, "weight", "uint8 (N, K/4)", _desc(w))
        n, k = self.out_features, self.in_features
        _expect(self.wscales.shape == (n,) and self.wscales.dtype in FLOAT16, layer, "wscales", f"16-bit ({n},)", _desc(self.wscales))
        _check_lowrank(layer, self.proj_down, self.proj_up, n, k)
        _check_bias(layer, self.bias, n, self.dtype)


FORMATS = {cls.FORMAT: cls for cls in (W4A4Weights, W4A16Weights, TernaryWeights)}
