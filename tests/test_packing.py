import pytest
import torch

from comfyui_lowbit.kernels import pack_int4, pack_ternary, unpack_int4, unpack_ternary
from comfyui_lowbit.quant_ops import TernaryWeights, W4A4Weights, W4A16Weights


def _int4(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    q[0, 0], q[0, 1], q[-1, -1] = -8, 7, -8  # both extremes, in low and high nibbles
    return q


@pytest.mark.parametrize("k", [64, 192, 320])  # 1, 3 and 5 groups of 64
def test_int4_round_trip(k):
    q = _int4(7, k)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (7, k // 2)
    assert torch.equal(unpack_int4(p), q)


def test_int4_nibble_order():
    p = pack_int4(torch.tensor([[-8, 7, 1, -1]], dtype=torch.int8))
    assert p.tolist() == [[0x78, 0xF1]]  # element 2i in the low nibble


@pytest.mark.parametrize("k", [64, 192])
def test_ternary_round_trip(k):
    t = torch.randint(-1, 2, (5, k), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    p = pack_ternary(t)
    assert p.dtype == torch.uint8 and p.shape == (5, k // 4)
    assert torch.equal(unpack_ternary(p), t)
    assert pack_ternary(torch.tensor([[-1, 0, 1, 1]])).tolist() == [[0b10100100]]


def test_pack_rejects_out_of_range_and_odd_k():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[8, 0]]))
    with pytest.raises(ValueError, match="multiple of 2"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_ternary(torch.zeros(2, 6, dtype=torch.int8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_format_round_trips(dtype):
    n, k, r = 24, 192, 16
    q = _int4(n, k, seed=2)
    s = torch.rand(k // 64, n).to(dtype)
    w4a4 = W4A4Weights.pack(q, s, torch.rand(k).to(dtype), torch.randn(k, r).to(dtype), torch.randn(n, r).to(dtype),
                            torch.randn(n).to(dtype))
    assert torch.equal(w4a4.unpack(), q) and (w4a4.in_features, w4a4.out_features, w4a4.rank) == (k, n, r)
    again = W4A4Weights.from_tensors(w4a4.tensors(), w4a4.config())
    assert all(torch.equal(a, b) for a, b in zip(again.tensors().values(), w4a4.tensors().values()))

    w4a16 = W4A16Weights.pack(q, torch.rand(k // 64, n).to(dtype))
    assert torch.equal(w4a16.unpack(), q) and w4a16.group_size == 64

    t = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    tern = TernaryWeights.pack(t, torch.rand(n).to(dtype), act_int8=True)
    assert torch.equal(tern.unpack(), t) and tern.rank == 0 and tern.config()["act_int8"] is True


def test_format_validation_names_the_tensor():
    q = _int4(8, 128)
    with pytest.raises(ValueError, match=r"blk\.wscales: expected 16-bit \(2, 8\)"):
        W4A4Weights(pack_int4(q), torch.rand(3, 8, dtype=torch.bfloat16), torch.ones(128, dtype=torch.bfloat16)).validate("blk")
    with pytest.raises(ValueError, match=r"layer\.proj_up"):
        W4A4Weights.pack(q, torch.rand(2, 8, dtype=torch.bfloat16), torch.ones(128, dtype=torch.bfloat16),
                         torch.zeros(128, 16, dtype=torch.bfloat16), torch.zeros(8, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="missing tensors"):
        W4A16Weights.from_tensors({"weight": pack_int4(q)}, layer="x")
