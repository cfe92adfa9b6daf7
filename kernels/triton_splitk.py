"""Split reductions in one launch: every program of a tile stores its float32 partial, the last to arrive
(counted with an atomic) sums all partials in split order (deterministic) and writes the result."""
import torch
import triton
import triton.language as tl

_COUNTERS = {}


def tile_counters(device, n: int) -> torch.Tensor:
    """Zeroed int32 arrival counters, one per output tile, cached per device; kernels reset the ones they
    used. Launches that share them must not run concurrently (one stream)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


@triton.jit
def arrived_last(cnt_ptr, tile, nsplit):
    """Call after storing this program's partial: True in the last of the tile's `nsplit` programs, which
    must then read the partials (load_partial) and call reset_arrivals."""
    tl.debug_barrier()  # every thread's partial store precedes the release below
    return tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == nsplit - 1


@triton.jit
def load_partial(ptrs, mask):
    return tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")  # from L2: written by other SMs


@triton.jit
def reset_arrivals(cnt_ptr, tile):
    tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def split_total(acc, part_ptr, cnt_ptr, pid_s, tile, offs_m, offs_n, M, N, NSPLIT: tl.constexpr):
    """Store this program's (BLOCK_N, BLOCK_M) partial of out^T and count it in; returns (last, total): in the
    tile's last program to arrive, last is true and total the sum of all partials in split order, and that
    program finishes the tile and calls reset_arrivals."""
    parts = part_ptr + offs_m[None, :] * N + offs_n[:, None]
    mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    tl.store(parts + pid_s * M * N, acc, mask=mask)
    last = arrived_last(cnt_ptr, tile, NSPLIT)
    total = tl.zeros(acc.shape, acc.dtype)
    if last:
        for s in range(0, NSPLIT):
            total += load_partial(parts + s * M * N, mask)
    return last, total
