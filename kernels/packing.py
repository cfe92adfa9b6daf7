"""Bit layouts shared by the formats, the reference ops and the Triton kernels.

int4: two signed values per byte along K; element 2i in the low nibble, 2i+1 in the high nibble,
two's complement. Ternary: four values per byte along K; element 4i+j in bits 2j..2j+1, stored as
value + 1 (0, 1, 2).
"""
import torch


def _check_last_dim(t: torch.Tensor, multiple: int, what: str) -> None:
    if t.shape[-1] % multiple != 0:
        raise ValueError(f"{what}: last dimension is {t.shape[-1]}, must be a multiple of {multiple}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int tensor (..., K) with values in [-8, 7] -> uint8 (..., K/2)."""
    _check_last_dim(q, 2, "pack_int4")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"pack_int4: values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 (..., K/2) -> int8 (..., K) with values in [-8, 7]."""
    p = p.to(torch.int16)
    lo = ((p & 0xF) ^ 8) - 8
    hi = (((p >> 4) & 0xF) ^ 8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2).to(torch.int8)


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """int tensor (..., K) with values in {-1, 0, 1} -> uint8 (..., K/4)."""
    _check_last_dim(t, 4, "pack_ternary")
    if t.numel() and (int(t.min()) < -1 or int(t.max()) > 1):
        raise ValueError(f"pack_ternary: values must lie in {{-1, 0, 1}}, got [{int(t.min())}, {int(t.max())}]")
    u = (t.to(torch.int16) + 1).to(torch.uint8)
    return u[..., 0::4] | (u[..., 1::4] << 2) | (u[..., 2::4] << 4) | (u[..., 3::4] << 6)


def unpack_ternary(p: torch.Tensor) -> torch.Tensor:
    """uint8 (..., K/4) -> int8 (..., K) with values in {-1, 0, 1}."""
    p = p.to(torch.int16)
    parts = [((p >> (2 * j)) & 0x3) - 1 for j in range(4)]
    return torch.stack(parts, dim=-1).flatten(-2).to(torch.int8)
