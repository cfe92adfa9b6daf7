"""Shared pieces of the Triton kernels: interpreter switch, autotune helpers, float helpers, epilogue.

Weight decoders live in triton_decode.py.
"""
import os

import torch
import triton
import triton.language as tl
from triton.language.target_info import is_cuda
from triton.runtime.jit import constexpr_function

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
MAX_RANK = 256
_UPCAST = tl.constexpr(INTERPRET)


@constexpr_function
def inline_ptx():
    """Inline PTX allowed: compiling for an NVIDIA GPU (not interpreting, not compiling for AMD)."""
    return not INTERPRET and is_cuda()


def configs(full, interpreted):
    """Autotune candidates: `full` on a device, the single `interpreted` one under TRITON_INTERPRET=1
    (one config means no benchmarking). Each is a dict of meta-parameters plus num_warps/num_stages."""
    def one(c):
        c = dict(c)
        warps, stages, hook = c.pop("num_warps", 4), c.pop("num_stages", 2), c.pop("pre_hook", None)
        return triton.Config(c, num_warps=warps, num_stages=stages, pre_hook=hook)

    return [one(interpreted)] if INTERPRET else [one(c) for c in full]


def candidates(cfgs, m: int):
    """Configs (dicts or triton.Config) worth running for m tokens: token blocks no taller than m needs,
    tallest first."""
    need = max(16, triton.next_power_of_2(m))
    get = lambda c: c["BLOCK_M"] if isinstance(c, dict) else c.kwargs["BLOCK_M"]
    return sorted([c for c in cfgs if get(c) <= need], key=lambda c: -get(c)) or cfgs[-1:]


def prune_by_m(cfgs, named_args, **kwargs):
    """early_config_prune without a tuned entry (kernels/configs): at most 3 candidates, token blocks no
    taller than needed."""
    return candidates(cfgs, named_args["M"])[:3]


def m_bucket(m: int) -> int:
    """Autotune key for the token count: next power of two, so each shape family tunes once."""
    return min(triton.next_power_of_2(max(m, 1)), 8192)


def check_rank(lr, proj_up, what):
    """(lr float32, proj_up) contiguous, or (None, None); lr may come in 16 bits (exact in float32)."""
    if lr is None:
        return None, None
    r = proj_up.shape[1]
    if r % 16 or r > MAX_RANK or lr.shape[1] != r:
        raise ValueError(f"{what}: low-rank branch rank must be a multiple of 16 up to {MAX_RANK} "
                         f"(lr {tuple(lr.shape)}, proj_up {tuple(proj_up.shape)})")
    return lr.float().contiguous(), proj_up.contiguous()


@triton.jit
def dot16(a, b, acc):
    """acc + a @ b for 16-bit a, b. The interpreter (Triton 3.9) multiplies bfloat16 as raw uint16 bits,
    so there the operands go through float32 (exact for 16-bit values)."""
    if _UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def cast(x, dtype: tl.constexpr):
    """float32 -> dtype rounding to nearest even. The interpreter truncates float32 -> bfloat16, so
    there the rounding is done on the bits (compiled code already rounds to nearest even)."""
    if _UPCAST and dtype == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def split16(v, dtype: tl.constexpr):
    """float32 -> (hi, lo) in a 16-bit dtype as reference.split16: hi = v rounded, lo = (v - hi) rounded
    (v - hi is exact in float32)."""
    hi = cast(v, dtype)
    return hi, cast(v - hi.to(tl.float32), dtype)


@triton.jit
def up_branch_t(acc, up, lr_t):
    """acc + up @ lr_t for a (BLOCK_N, BLOCK_R) 16-bit proj_up tile and a float32 (BLOCK_R, BLOCK_M) lr^T tile:
    lr as its two 16-bit halves (split16), two 16-bit dots into the float32 accumulator."""
    hi, lo = split16(lr_t, up.dtype)
    return dot16(up, lo, dot16(up, hi, acc))


@triton.jit
def swizzle(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n), GROUP_M row blocks at a time so weight tiles stay in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def lowrank_bias_t(acc, lr_ptr, up_ptr, bias_ptr, offs_m, offs_n, M, N, R,
                   HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc (BLOCK_N, BLOCK_M), a transposed output tile, + proj_up @ lr^T (float32 lr, up_branch_t) +
    bias[:, None], as reference._epilogue; accumulated straight into acc (no second tile: register pressure)."""
    if HAS_LR:
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            a = tl.load(up_ptr + offs_n[:, None] * R + offs_r[None, :],
                        mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)
            b = tl.load(lr_ptr + offs_m[None, :] * R + offs_r[:, None],
                        mask=(offs_m[None, :] < M) & (offs_r[:, None] < R), other=0.0)
            acc = up_branch_t(acc, a, b)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def store_tile_t(out_ptr, acc, offs_m, offs_n, M, N):
    """Store a transposed tile acc (BLOCK_N, BLOCK_M) into the (M, N) output."""
    tl.store(out_ptr + offs_m[None, :] * N + offs_n[:, None], cast(acc, out_ptr.dtype.element_ty),
             mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))


def rank_block(proj_down, what):
    """BLOCK_R for a down projection of rank r (a power of two >= 16)."""
    if proj_down is None:
        return 16
    r = proj_down.shape[1]
    if r > MAX_RANK:
        raise ValueError(f"{what}: proj_down rank {r} exceeds {MAX_RANK}")
    return max(16, triton.next_power_of_2(r))


_SMS = {}


def sm_count(device) -> int:
    """Streaming multiprocessors of `device` (4 under the interpreter, so tests exercise the split paths)."""
    if INTERPRET or device.type != "cuda":
        return 4
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]
