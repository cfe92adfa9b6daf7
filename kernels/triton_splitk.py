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
