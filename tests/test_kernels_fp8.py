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


# ---- Triton kernels == reference ----

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from comfyui_lowbit.kernels import triton_fp8, triton_rounding, triton_rowquant  # noqa: E402
from comfyui_lowbit.kernels.triton_common import INTERPRET  # noqa: E402

DEV = "cpu" if INTERPRET else "cuda"
if DEV == "cuda" and not torch.cuda.is_available():
    pytest.skip("Triton kernels were imported compiled and there is no GPU", allow_module_level=True)
DTYPES = (torch.bfloat16, torch.float16)
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2e-6}


def close(out, expected):
    tol = ULP[expected.dtype]
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol * expected.float().abs().max().item())


def rand(*shape, dtype=torch.float32, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


@triton.jit
def _to_e4m3_kernel(v_ptr, q_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(q_ptr + offs, triton_rounding.to_e4m3(tl.load(v_ptr + offs, mask=offs < N)), mask=offs < N)


def e4m3_midpoints():
    """Every value halfway between two neighbouring finite e4m3 values, both signs: all rounding ties."""
    vals = torch.arange(127, dtype=torch.uint8).view(E4M3).float()  # 0 .. 448
    mid = (vals[1:] + vals[:-1]) / 2
    return torch.cat([mid, -mid])


def test_to_e4m3_kernel_matches_reference_bits():
    g = gen(3)
    v = torch.cat([e4m3_midpoints(), torch.arange(127, dtype=torch.uint8).view(E4M3).float(),
                   torch.randn(4000, generator=g) * 60, torch.randn(1000, generator=g) * 0.01,
                   torch.tensor([448.0, 448.1, 463.9, 464.0, 1e30, -1e30, 2.0 ** -10, -(2.0 ** -10), -0.0, 1e-30])])
    q = torch.empty(v.numel(), dtype=E4M3)
    _to_e4m3_kernel[(triton.cdiv(v.numel(), 1024),)](v.to(DEV), q.to(DEV) if DEV == "cuda" else q, v.numel(), BLOCK=1024)
    assert torch.equal(codes(q.cpu()), codes(ref.to_e4m3(v)))


def tie_activations(m, k, dtype, g):
    """Rows with absmax 448 * 2^e (then scale = 2^e exactly) and values on e4m3 rounding ties."""
    mid = e4m3_midpoints()
    x = mid[torch.randint(0, mid.numel(), (m, k), generator=g)]
    x[:, 0] = 448.0
    return (x * 2.0 ** torch.randint(-4, 5, (m, 1), generator=g).float()).to(dtype).to(DEV)


# (M, K, rank, smooth): M = 1, M not a multiple of the row block, ranks 16 and 48
ACT_CASES = [(1, 192, 16, True), (33, 128, 48, True), (17, 320, 0, False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,rank,has_smooth", ACT_CASES)
def test_quantize_act_fp8(dtype, m, k, rank, has_smooth):
    g = gen(4)
    x = rand(m, k, dtype=dtype, g=g, scale=2.0)
    x[-1] = 0  # an all-zero token: scale 0, codes 0
    smooth = (torch.rand(k, generator=g) + 0.5).to(dtype).to(DEV) if has_smooth else None
    down = rand(k, rank, dtype=dtype, g=g, scale=0.1) if rank else None
    q, s, lr = triton_rowquant.quantize_act_fp8(x, smooth, down)
    eq, es, elr = ref.quantize_act_fp8(x, smooth, down)
    assert torch.equal(codes(q), codes(eq)) and torch.equal(s, es)
    if rank:
        close(lr, elr)
    else:
        assert lr is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_act_fp8_ties(dtype):
    x = tie_activations(9, 256, dtype, gen(5))
    eq, es, _ = ref.quantize_act_fp8(x)
    assert (es == es.log2().round().exp2()).all()  # powers of two: codes = x / scale exactly on the ties
    q, s, _ = triton_rowquant.quantize_act_fp8(x)
    assert torch.equal(codes(q), codes(eq)) and torch.equal(s, es)


# (M, N, K, rank, bias)
GEMM_CASES = [(1, 48, 192, 16, True), (33, 40, 128, 48, True), (20, 32, 64, 0, False)]


@pytest.fixture(params=[True, False], ids=["subnormal_w", "float16_w"])
def weight_encoding(request, monkeypatch):
    monkeypatch.setattr(triton_fp8, "SUBNORMAL_WEIGHTS", request.param)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,rank,has_bias", GEMM_CASES)
def test_int4_fp8_gemm(dtype, m, n, k, rank, has_bias, weight_encoding):
    g = gen(6)
    x = rand(m, k, dtype=dtype, g=g)
    down = rand(k, rank, dtype=dtype, g=g, scale=0.1) if rank else None
    qx, s, lr = triton_rowquant.quantize_act_fp8(x, (torch.rand(k, generator=g) + 0.5).to(dtype).to(DEV), down)
    qw = pack_int4(torch.randint(-8, 8, (n, k), generator=g)).to(DEV)
    ws = rand(k // 64, n, dtype=dtype, g=g, scale=0.05)
    up = rand(n, rank, dtype=dtype, g=g, scale=0.1) if rank else None
    bias = rand(n, dtype=dtype, g=g) if has_bias else None
    for out_dtype in (dtype, torch.float32):
        out = triton_fp8.int4_fp8_gemm(qx, s, qw, ws, lr, up, bias, out_dtype=out_dtype)
        close(out, ref.int4_fp8_gemm(qx, s, qw, ws, lr, up, bias, out_dtype=out_dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,rank,has_bias", [(1, 48, 192, 16, True), (33, 40, 320, 48, False)])
def test_ternary_fp8_gemm(dtype, m, n, k, rank, has_bias):
    g = gen(7)
    x = rand(m, k, dtype=dtype, g=g)
    down, up = rand(k, rank, dtype=dtype, g=g, scale=0.1), rand(n, rank, dtype=dtype, g=g, scale=0.1)
    qx, s, lr = triton_rowquant.quantize_act_fp8(x, None, down)
    tw = pack_ternary(torch.randint(-1, 2, (n, k), generator=g)).to(DEV)
    ws = rand(n, dtype=dtype, g=g, scale=0.05).abs()
    bias = rand(n, dtype=dtype, g=g) if has_bias else None
    for out_dtype in (dtype, torch.float32):
        close(triton_fp8.ternary_fp8_gemm(qx, s, tw, ws, lr, up, bias, out_dtype=out_dtype),
              ref.ternary_fp8_gemm(qx, s, tw, ws, lr, up, bias, out_dtype=out_dtype))


def test_fp8_shape_checks_and_empty_batch():
    g = gen(8)
    qx, s, _ = triton_rowquant.quantize_act_fp8(rand(0, 128, dtype=torch.bfloat16, g=g))
    qw, ws = pack_int4(torch.zeros(16, 128, dtype=torch.int8)).to(DEV), rand(2, 16, dtype=torch.bfloat16, g=g)
    assert qx.shape == (0, 128) and s.shape == (0,)
    assert triton_fp8.int4_fp8_gemm(qx, s, qw, ws).shape == (0, 16)
    with pytest.raises(ValueError, match="do not match"):
        triton_fp8.int4_fp8_gemm(qx[:, :64], s, qw, ws)


@pytest.mark.skipif(not INTERPRET, reason="forcing Triton on CPU tensors needs the interpreter")
@pytest.mark.parametrize("fmt,options,ops", [
    ("svdq_w4a4", {"rank": 16}, ("quantize_act_fp8", "int4_fp8_gemm")),
    ("svdq_w4a4", {"rank": 48, "act_unsigned": True}, ("quantize_act_fp8", "int4_fp8_gemm")),
    ("ternary", {"rank": 16}, ("quantize_act_fp8", "ternary_fp8_gemm")),
])
def test_fp8_layer_runs_the_kernels(monkeypatch, fmt, options, ops):
    from comfyui_lowbit.kernels import dispatch, triton_ops
    from comfyui_lowbit.quant_ops import quantize_linear, set_activations

    torch.manual_seed(9)
    layer = quantize_linear(torch.nn.Linear(128, 48), fmt, dtype=torch.float16, iters=2, **options)
    set_activations(layer, "fp8")
    x = torch.nn.functional.gelu(torch.randn(5, 128)).to(torch.float16)
    monkeypatch.setattr(dispatch, "_forced", None)
    monkeypatch.setenv("LOWBIT_BACKEND", "reference")
    expected = layer(x)
    monkeypatch.setenv("LOWBIT_BACKEND", "triton")
    calls = []
    for op in ops:
        orig = getattr(triton_ops, op)
        monkeypatch.setattr(triton_ops, op, lambda *a, _o=orig, _n=op, **kw: calls.append(_n) or _o(*a, **kw))
    close(layer(x), expected)
    assert calls == list(ops)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 300, 4608])
def test_gpu_fp8_flux_shapes(m, weight_encoding):
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1: the gpu tests check compiled kernels")
    g, dt, r = gen(10), torch.bfloat16, 32
    for k, n in ((3072, 9216), (15360, 3072)):
        x = rand(m, k, dtype=dt, g=g)
        smooth = (torch.rand(k, generator=g) + 0.5).to(dt).cuda()
        down, up = rand(k, r, dtype=dt, g=g, scale=0.05), rand(n, r, dtype=dt, g=g, scale=0.05)
        q, s, lr = triton_rowquant.quantize_act_fp8(x, smooth, down)
        eq, es, elr = ref.quantize_act_fp8(x, smooth, down)
        assert torch.equal(codes(q), codes(eq)) and torch.equal(s, es)
        close(lr, elr)
        qw = pack_int4(torch.randint(-8, 8, (n, k), generator=g)).cuda()
        ws, bias = rand(k // 64, n, dtype=dt, g=g, scale=0.02), rand(n, dtype=dt, g=g)
        close(triton_fp8.int4_fp8_gemm(q, s, qw, ws, lr, up, bias, out_dtype=dt),
              ref.int4_fp8_gemm(q, s, qw, ws, lr, up, bias, out_dtype=dt))
        tw, tws = pack_ternary(torch.randint(-1, 2, (n, k), generator=g)).cuda(), rand(n, dtype=dt, g=g, scale=0.01).abs()
        q2, s2, lr2 = triton_rowquant.quantize_act_fp8(x, None, down)
        close(triton_fp8.ternary_fp8_gemm(q2, s2, tw, tws, lr2, up, bias, out_dtype=dt),
              ref.ternary_fp8_gemm(q2, s2, tw, tws, lr2, up, bias, out_dtype=dt))
