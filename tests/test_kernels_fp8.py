"""FP8 (e4m3) activations: the reference semantics (kernels/reference.py), and the Triton kernels
(kernels/triton_fp8.py) equal to it: codes and scales bit for bit, float results up to summation order.

Without a GPU the kernels run under the Triton interpreter on CPU tensors; `gpu` tests run them compiled.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from comfyui_lowbit.kernels import reference as ref  # noqa: E402
from comfyui_lowbit.kernels.packing import pack_int4, pack_ternary, unpack_int4  # noqa: E402

E4M3 = torch.float8_e4m3fn


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def codes(q):
    return q.view(torch.uint8)


# ---- reference semantics ----

def test_to_e4m3_rounds_half_to_even_and_clamps():
    # 1.0625 lies halfway between 1.0 (mantissa 000) and 1.125 (001): even is 1.0; 1.1875 -> 1.25 (010)
    v = torch.tensor([1.0625, 1.1875, -1.0625, 3 * 2.0 ** -10, 2.0 ** -10, 448.0, 448.5, 470.0, -1e9, 0.0])
    got = ref.to_e4m3(v).float().tolist()
    assert got == [1.0, 1.25, -1.0, 2.0 ** -8, 0.0, 448.0, 448.0, 448.0, -448.0, 0.0]
    assert not ref.to_e4m3(torch.tensor([1e30, -1e30])).float().isnan().any()


def test_quantize_act_fp8_per_token_scale():
    x = torch.tensor([[1.0, -3.5, 0.25, 2.0], [0.0, 0.0, 0.0, 0.0]]).repeat(1, 16).to(torch.bfloat16)
    smooth = torch.full((64,), 0.5, dtype=torch.bfloat16)
    q, s, lr = ref.quantize_act_fp8(x, smooth)
    assert q.dtype == E4M3 and s.dtype == torch.float32 and lr is None
    assert s[0].item() == (torch.tensor(7.0) * ref.RCP[448]).item() and s[1].item() == 0.0
    assert q[0].float().abs().max().item() == 448.0 and codes(q[1]).eq(0).all()
    # codes times scale give back the smoothed input within e4m3 rounding (3 mantissa bits: 2^-4 relative)
    back = q[0].float() * s[0]
    assert torch.allclose(back, x[0].float() / 0.5, rtol=2.0 ** -4, atol=0)


def test_int4_fp8_gemm_is_dequantized_float_math():
    g = gen(1)
    m, n, k = 5, 24, 192
    x = torch.randn(m, k, generator=g)
    q, s, _ = ref.quantize_act_fp8(x)
    qw = pack_int4(torch.randint(-8, 8, (n, k), generator=g))
    ws = (torch.rand(k // 64, n, generator=g) * 0.1).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    w = unpack_int4(qw).double() * ws.double().t().repeat_interleave(64, dim=1)
    exact = (q.double() * s.double().unsqueeze(1)) @ w.t() + bias.double()
    out = ref.int4_fp8_gemm(q, s, qw, ws, bias=bias, out_dtype=torch.float32)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())


def test_ternary_fp8_gemm_is_dequantized_float_math():
    g = gen(2)
    m, n, k = 3, 16, 128
    x = torch.randn(m, k, generator=g)
    q, s, _ = ref.quantize_act_fp8(x)
    t = torch.randint(-1, 2, (n, k), generator=g)
    ws = torch.rand(n, generator=g).to(torch.bfloat16)
    exact = (q.double() * s.double().unsqueeze(1)) @ (t.double() * ws.double().unsqueeze(1)).t()
    out = ref.ternary_fp8_gemm(q, s, pack_ternary(t), ws, out_dtype=torch.float32)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
