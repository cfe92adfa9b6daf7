"""Triton kernels == kernels/reference.py.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set here before Triton is
imported) on CPU tensors, on small shapes; with one they run compiled on CUDA. Integer parts (codes,
scales) must be bit-equal; float results may differ only by summation order: within 1 unit in the last
place of the output dtype relative to the largest output (float32 outputs: 2e-6 relative).
`gpu` tests run the compiled kernels at FLUX shapes.
"""
import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from comfyui_lowbit import kernels  # noqa: E402
from comfyui_lowbit.kernels import dispatch, reference as ref  # noqa: E402
from comfyui_lowbit.kernels.packing import pack_int4, pack_ternary  # noqa: E402

triton_ops = pytest.importorskip("comfyui_lowbit.kernels.triton_ops")
from comfyui_lowbit.kernels.triton_common import INTERPRET  # noqa: E402

DEV = "cpu" if INTERPRET else "cuda"
if DEV == "cuda" and not torch.cuda.is_available():
    pytest.skip("Triton kernels were imported compiled and there is no GPU", allow_module_level=True)
DTYPES = (torch.bfloat16, torch.float16)
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2e-6}


def close(out, expected, dtype=None):
    tol = ULP[dtype or expected.dtype]
    assert out.dtype == expected.dtype and out.shape == expected.shape
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol * scale)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand(*shape, dtype=torch.float32, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def int4_weight(n, k, g):
    return pack_int4(torch.randint(-8, 8, (n, k), generator=g)).to(DEV)


def ternary_weight(n, k, g):
    return pack_ternary(torch.randint(-1, 2, (n, k), generator=g)).to(DEV)


# (M, K, rank, unsigned): M = 1, M not a multiple of the row block, K = 192 (3 groups), ranks 16 and 48;
# K = 1024 splits K over 4 programs (partials of the down projection summed by the last), 512 over 2;
# unsigned 256: channels [256, K) take the unsigned variant
ACT_CASES = [(1, 192, 16, False), (33, 128, 48, True), (17, 64, 0, False), (1, 1024, 32, 256), (40, 512, 16, True),
             (3, 1024, 0, 768)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,rank,unsigned", ACT_CASES)
def test_quantize_act_int4(dtype, m, k, rank, unsigned):
    g = gen(1)
    x = rand(m, k, dtype=dtype, g=g, scale=2.0)
    x[0, 64:128 if k > 64 else 64] = 0  # an all-zero group: scale 0, codes 0
    smooth = None if rank == 0 else (torch.rand(k, generator=g) + 0.5).to(dtype).to(DEV)
    down = rand(k, rank, dtype=dtype, g=g, scale=0.1) if rank else None
    if k >= 512:
        from comfyui_lowbit.kernels.triton_act import k_splits
        assert k_splits(m, k // 64, torch.device(DEV)) == k // 256
    q, s, lr = triton_ops.quantize_act_int4(x, smooth, down, unsigned=unsigned)
    eq, es, elr = ref.quantize_act_int4(x, smooth, down, unsigned=unsigned)
    assert torch.equal(q, eq) and torch.equal(s, es)
    if rank:
        close(lr, elr)
    else:
        assert lr is None


def tie_inputs(m, k, qmax, dtype, g, shift=0.0):
    """Halves of integers times 2^e per group (exact in bf16) with absmax qmax * 2^e: then scale = 2^e and
    every odd half is a rounding tie. `shift` is subtracted (the unsigned variant adds it back)."""
    halves = torch.randint(0 if shift else -2 * qmax, 2 * qmax + 1, (m, k), generator=g).float() / 2
    halves[:, ::64] = qmax
    e = torch.randint(-3, 4, (m, k // 64), generator=g).float().repeat_interleave(64, dim=1)
    return (halves * 2.0 ** e - shift).to(dtype).to(DEV)


def test_act_rounding_ties_to_even():
    x = torch.zeros(2, 64)
    x[:, :8] = torch.tensor([7.0, 2.5, -2.5, 0.5, -0.5, 1.5, 3.5, -3.5])
    x[1] *= 0.25  # scale 0.25, same codes
    q, s, _ = ref.quantize_act_int4(x.to(torch.bfloat16), None)
    assert s.flatten().tolist() == [1.0, 0.25]
    assert q[:, :8].tolist() == [[7, 2, -2, 0, 0, 2, 4, -4]] * 2
    q8, s8, _ = ref.quantize_act_int8(torch.tensor([[127.0, 2.5, -0.5, 126.5]]))
    assert s8.tolist() == [1.0] and q8.tolist() == [[127, 2, 0, 126]]


@pytest.mark.parametrize("dtype,unsigned", [(torch.bfloat16, False), (torch.float16, False), (torch.float16, True)])
def test_quantize_act_int4_ties(dtype, unsigned):
    g = gen(13)
    shift = ref.ACT_SHIFT if unsigned else 0.0  # x + shift exact needs float16's mantissa
    x = tie_inputs(19, 256, 15 if unsigned else 7, dtype, g, shift)
    eq, es, _ = ref.quantize_act_int4(x, None, unsigned=unsigned)
    exact = (x.float() + shift) / es.repeat_interleave(64, dim=1)
    assert ((exact - exact.floor()) == 0.5).float().mean() > 0.2  # ties are common here
    q, s, _ = triton_ops.quantize_act_int4(x, None, unsigned=unsigned)
    assert torch.equal(q, eq) and torch.equal(s, es)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_act_int8_ties(dtype):
    g = gen(14)
    x = tie_inputs(9, 128, 127, dtype, g)
    x[:, 64:] = x[:, :64]  # one group over K: the absmax is that of the first 64
    eq, es, _ = ref.quantize_act_int8(x)
    q, s, _ = triton_ops.quantize_act_int8(x)
    assert torch.equal(q, eq) and torch.equal(s, es)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,rank", [(1, 192, 16), (33, 320, 48)])
def test_quantize_act_int8_and_lora_down(dtype, m, k, rank):
    g = gen(2)
    x = rand(m, k, dtype=dtype, g=g)
    down = rand(k, rank, dtype=dtype, g=g, scale=0.1)
    q, s, lr = triton_ops.quantize_act_int8(x, down)
    eq, es, elr = ref.quantize_act_int8(x, down)
    assert torch.equal(q, eq) and torch.equal(s, es)
    close(lr, elr)
    close(triton_ops.lora_down(x, down), elr)
    assert triton_ops.lora_down(x, None) is None


# (M, N, K, rank, bias, unsigned); K = 1024 and 512 at M <= 64 split K over 4 and 2 programs; M = 32 fills
# whole token blocks (no token mask)
GEMM_CASES = [(1, 48, 192, 16, True, False), (33, 40, 128, 48, True, True), (20, 32, 64, 0, False, False),
              (1, 40, 1024, 16, True, False), (33, 96, 512, 48, False, True), (65, 64, 256, 32, True, False),
              (32, 40, 192, 16, True, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,rank,has_bias,unsigned", GEMM_CASES)
def test_w4a4_gemm(dtype, m, n, k, rank, has_bias, unsigned):
    from comfyui_lowbit.kernels.triton_w4a4 import k_splits

    g = gen(3)
    x = rand(m, k, dtype=dtype, g=g)
    smooth = (torch.rand(k, generator=g) + 0.5).to(dtype).to(DEV)
    down = rand(k, rank, dtype=dtype, g=g, scale=0.1) if rank else None
    qx, s, lr = triton_ops.quantize_act_int4(x, smooth, down, unsigned=unsigned)
    qw, ws = int4_weight(n, k, g), rand(k // 64, n, dtype=dtype, g=g, scale=0.05)
    up = rand(n, rank, dtype=dtype, g=g, scale=0.1) if rank else None
    bias = rand(n, dtype=dtype, g=g) if has_bias else None
    assert k_splits(m, n, k // 64, torch.device(DEV)) == (k // 256 if k >= 512 else 1)
    for out_dtype in (dtype, torch.float32):
        expected = ref.w4a4_gemm(qx, s, qw, ws, lr, up, bias, out_dtype=out_dtype)
        close(triton_ops.w4a4_gemm(qx, s, qw, ws, lr, up, bias, out_dtype=out_dtype), expected)
    # scales as the reference lays them out ((M, G) row-major) give the same result
    close(triton_ops.w4a4_gemm(qx, s.contiguous(), qw, ws, lr, up, bias, out_dtype=dtype),
          ref.w4a4_gemm(qx, s, qw, ws, lr, up, bias, out_dtype=dtype))


# (M, N, K, rank, bias): K = 1024 and 512 at M <= 64 split K over 4 and 2 programs; M = 65 many tokens, ragged
W4A8_CASES = [(1, 48, 192, 16, True), (33, 40, 512, 48, False), (65, 64, 256, 32, True), (3, 40, 1024, 0, True)]


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("m,n,k,rank,has_bias", W4A8_CASES)
def test_w4a8_gemm(m, n, k, rank, has_bias, progressive):
    """int8 activations (after smoothing) x int4 weights: float group scales, or progressive (integer group scales,
    exact int32 sum over K, one float rescale) - both against the reference."""
    g, dtype = gen(19), torch.bfloat16
    x = rand(m, k, dtype=dtype, g=g)
    smooth = (torch.rand(k, generator=g) + 0.5).to(dtype).to(DEV)
    down = rand(k, rank, dtype=dtype, g=g, scale=0.1) if rank else None
    qx, s, lr = triton_ops.quantize_act_int8(x, down, smooth)
    eq, es, elr = ref.quantize_act_int8(x, down, smooth)
    assert torch.equal(qx, eq) and torch.equal(s, es) and (lr is None or lr.dtype == torch.float32)
    qw, ws = int4_weight(n, k, g), rand(k // 64, n, dtype=dtype, g=g, scale=0.05).abs()
    up = rand(n, rank, dtype=dtype, g=g, scale=0.1) if rank else None
    bias = rand(n, dtype=dtype, g=g) if has_bias else None
    s0 = None
    if progressive:
        ws, s0 = ref.progressive_scales(ws)
    for out_dtype in (dtype, torch.float32):
        close(triton_ops.w4a8_gemm(qx, s, qw, ws, lr, up, bias, out_dtype=out_dtype, s0=s0),
              ref.w4a8_gemm(qx, s, qw, ws, lr, up, bias, out_dtype=out_dtype, s0=s0))


def test_w4a8_progressive_int32_is_exact():
    """The largest codes everywhere at the largest group scale give the exact sum (127 * 8 * 127 * 4096, a quarter
    of 2^31); progressive_limit keeps K * 127 * 8 * limit below 2^31 for every K up to FLUX.2's 24576."""
    assert ref.progressive_limit(3072) == ref.progressive_limit(15360) == 127
    assert all(k * 127 * 8 * ref.progressive_limit(k) < 2 ** 31 for k in range(64, 24577, 64))
    m, n, k = 2, 32, 4096
    qx = torch.full((m, k), 127, dtype=torch.int8, device=DEV)
    qx[1] = -127
    qw = pack_int4(torch.full((n, k), -8)).to(DEV)
    ws = torch.full((k // 64, n), 1.0, dtype=torch.bfloat16, device=DEV)
    s1, s0 = ref.progressive_scales(ws)
    assert int(s1.max()) == ref.progressive_limit(k) == 127
    xs = torch.ones(m, device=DEV)
    got = triton_ops.w4a8_gemm(qx, xs, qw, s1, out_dtype=torch.float32, s0=torch.ones(n, device=DEV))
    assert torch.equal(got[:, 0], torch.tensor([-127.0 * 8 * 127 * k, 127.0 * 8 * 127 * k], device=DEV))


def test_w4a8_shape_checks():
    g = gen(20)
    qx, s = torch.zeros(2, 64, dtype=torch.int8, device=DEV), torch.ones(2, device=DEV)
    qw, ws = int4_weight(16, 64, g), rand(1, 16, dtype=torch.bfloat16, g=g)
    s1, s0 = ref.progressive_scales(ws)
    with pytest.raises(ValueError, match="int16 group scales need s0"):
        triton_ops.w4a8_gemm(qx, s, qw, s1)
    with pytest.raises(ValueError, match="do not match"):
        triton_ops.w4a8_gemm(qx.float(), s, qw, ws)


def test_progressive_scales():
    """s1 * s0 is each group scale to within s0 / 2; the largest group of a channel keeps its scale (s1 = limit)."""
    g = gen(21)
    ws = (torch.rand(48, 40, generator=g) * 0.05 + 1e-4).to(torch.bfloat16)
    ws[:, 3] = 0  # an all-zero channel: s0 0, s1 0
    s1, s0 = ref.progressive_scales(ws)
    assert s1.dtype == torch.int16 and s0.dtype == torch.float32 and s1.shape == ws.shape and s0.shape == (40,)
    assert int(s1.max()) == 127 and int(s1.min()) >= 0 and not s1[:, 3].any() and s0[3] == 0
    assert ((s1.float() * s0 - ws.float()).abs() <= s0 / 2 + 1e-9).all()


# (M, N, K, group, zeros): M = 1 and 5 few-token tiles; K = 192 ends in a half step, 1088 splits K over 2 programs
# (17 odd groups); M = 65 and 130 (ragged) the many-token tiles
W4A16_CASES = [(1, 48, 192, 64, True), (5, 40, 1088, 64, False), (3, 24, 1280, 128, True), (33, 32, 384, 128, False),
               (65, 32, 128, 64, True), (130, 40, 320, 64, False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,gs,zeros", W4A16_CASES)
def test_w4a16_gemm(dtype, m, n, k, gs, zeros):
    g = gen(4)
    x = rand(m, k, dtype=dtype, g=g)
    qw, ws = int4_weight(n, k, g), rand(k // gs, n, dtype=dtype, g=g, scale=0.05)
    wz = rand(k // gs, n, dtype=dtype, g=g, scale=0.02) if zeros else None
    bias = rand(n, dtype=dtype, g=g)
    close(triton_ops.w4a16_gemm(x, qw, ws, wz, bias), ref.w4a16_gemm(x, qw, ws, wz, bias))
    close(triton_ops.w4a16_gemm(x, qw, ws, wz, out_dtype=torch.float32),
          ref.w4a16_gemm(x, qw, ws, wz, out_dtype=torch.float32))


# (M, N, K, rank, bias): K = 192 one partial step, 2304 splits K over 2 programs, M = 65 / 70 many-token tiles
TERNARY_CASES = [(1, 48, 192, 16, True), (7, 40, 2304, 48, False), (65, 32, 128, 48, False), (70, 24, 576, 16, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,rank,has_bias", TERNARY_CASES)
def test_ternary_gemm(dtype, m, n, k, rank, has_bias):
    g = gen(5)
    x = rand(m, k, dtype=dtype, g=g)
    tw, ws = ternary_weight(n, k, g), rand(n, dtype=dtype, g=g, scale=0.05).abs()
    lr, up = rand(m, rank, g=g), rand(n, rank, dtype=dtype, g=g, scale=0.1)  # float32 lr, as lora_down gives
    bias = rand(n, dtype=dtype, g=g) if has_bias else None
    close(triton_ops.ternary_gemm(x, tw, ws, lr, up, bias), ref.ternary_gemm(x, tw, ws, lr, up, bias))
    close(triton_ops.ternary_gemm(x, tw, ws), ref.ternary_gemm(x, tw, ws))


def test_wonly_splits_k_for_few_tokens_and_few_rows():
    from comfyui_lowbit.kernels import triton_wonly

    dev = torch.device(DEV)
    assert triton_wonly.k_splits(65, 48, 64, dev) == 1  # many tokens: never
    assert triton_wonly.k_splits(1, 48, 8, dev) == 2  # one row block, 8 steps: 2 splits of >= 4 steps
    assert triton_wonly.k_splits(1, 48, 3, dev) == 1
    assert triton_wonly.k_splits(1, 64 * 1024, 64, dev) == 1  # enough row blocks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt,zeros,rank", [("w4a16", True, 0), ("w4a16", False, 0), ("ternary", False, 16),
                                            ("ternary", False, 0)])
def test_wonly_dequant_path(monkeypatch, dtype, fmt, zeros, rank):
    """Many tokens through the dequantize + vendor GEMM path (the committed table's other choice)."""
    from comfyui_lowbit.kernels import triton_wonly

    monkeypatch.setattr(triton_wonly, "wonly_path", lambda *a: "dequant")
    g = gen(15)
    m, n, k = 70, 40, 384
    x, bias = rand(m, k, dtype=dtype, g=g), rand(n, dtype=dtype, g=g)
    if fmt == "w4a16":
        qw, ws = int4_weight(n, k, g), rand(k // 128, n, dtype=dtype, g=g, scale=0.05)
        wz = rand(k // 128, n, dtype=dtype, g=g, scale=0.02) if zeros else None
        assert torch.equal(triton_wonly.dequantize(qw, ws, wz), ref.dequant_int4(qw, ws, wz))
        close(triton_ops.w4a16_gemm(x, qw, ws, wz, bias), ref.w4a16_gemm(x, qw, ws, wz, bias))
    else:
        tw, ws = ternary_weight(n, k, g), rand(n, dtype=dtype, g=g, scale=0.05).abs()
        lr, up = (rand(m, rank, g=g), rand(n, rank, dtype=dtype, g=g, scale=0.1)) if rank else (None, None)
        w = triton_wonly.dequantize(tw, ws, None, up, ternary=True)
        assert torch.equal(w[:, :k], (kernels.unpack_ternary(tw).float() * ws.float()[:, None]).to(dtype))
        assert rank == 0 or (torch.equal(w[:, k:k + rank], up) and torch.equal(w[:, k + rank:], up))
        close(triton_ops.ternary_gemm(x, tw, ws, lr, up, bias), ref.ternary_gemm(x, tw, ws, lr, up, bias))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,rank", [(1, 48, 192, 16), (5, 40, 576, 48), (33, 40, 320, 48), (70, 24, 256, 0)])
def test_ternary_int8_gemm(dtype, m, n, k, rank):
    """M = 5, K = 576: K split over 2 programs (int32 partials); M = 70: many-token tiles."""
    g = gen(6)
    x = rand(m, k, dtype=dtype, g=g)
    down, up = (rand(k, rank, dtype=dtype, g=g, scale=0.1), rand(n, rank, dtype=dtype, g=g, scale=0.1)) if rank \
        else (None, None)
    q, s, lr = triton_ops.quantize_act_int8(x, down)
    tw, ws = ternary_weight(n, k, g), rand(n, dtype=dtype, g=g, scale=0.05).abs()
    bias = rand(n, dtype=dtype, g=g)
    close(triton_ops.ternary_int8_gemm(q, s, tw, ws, lr, up, bias, out_dtype=dtype),
          ref.ternary_int8_gemm(q, s, tw, ws, lr, up, bias, out_dtype=dtype))


def test_rows_do_not_depend_on_the_batch(monkeypatch):
    """A token's codes, scales, lr and outputs are bitwise the same alone and as the first row of a batch. The act
    kernel's split count along K follows the token count: lr, summed in fixed chunks of K, is the same for 1, 2 and
    4 programs. The GEMMs are compared within one split regime (K is split only at <= 64 tokens)."""
    from comfyui_lowbit.kernels import triton_act

    g, dt, n, r = gen(18), torch.bfloat16, 40, 32
    x = rand(66, 1024, dtype=dt, g=g)
    smooth = (torch.rand(1024, generator=g) + 0.5).to(dt).to(DEV)
    down = rand(1024, r, dtype=dt, g=g, scale=0.1)
    outs = []
    for nsplit in (1, 2, 4):
        monkeypatch.setattr(triton_act, "k_splits", lambda *a, nsplit=nsplit: nsplit)
        outs.append(triton_ops.quantize_act_int4(x[:40], smooth, down))
    monkeypatch.undo()
    assert outs[0][2].dtype == torch.float32 and all(torch.equal(a, b) for o in outs[1:] for a, b in zip(o, outs[0]))
    x, smooth, down = x[:, :512], smooth[:512], down[:512]
    u8 = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    for quant in (lambda v: triton_ops.quantize_act_int4(v, smooth, down), lambda v: triton_ops.quantize_act_int8(v, down),
                  lambda v: triton_ops.quantize_act_fp8(v, smooth, down)):
        assert all(torch.equal(u8(a[:1]), u8(b)) for a, b in zip(quant(x[:40]), quant(x[:1])))
    q4, s4, lr = triton_ops.quantize_act_int4(x, smooth, down)
    q8, s8, _ = triton_ops.quantize_act_int8(x, down)
    qs8, ss8, _ = triton_ops.quantize_act_int8(x, down, smooth)
    up, bias = rand(n, r, dtype=dt, g=g, scale=0.1), rand(n, dtype=dt, g=g)
    qw, ws = int4_weight(n, 512, g), rand(8, n, dtype=dt, g=g, scale=0.05)
    tw, tws = ternary_weight(n, 512, g), rand(n, dtype=dt, g=g, scale=0.05).abs()
    f32 = torch.float32
    runs = [lambda i: triton_ops.w4a4_gemm(q4[:i], s4[:i], qw, ws, lr[:i], up, bias, out_dtype=f32),
            lambda i: triton_ops.ternary_int8_gemm(q8[:i], s8[:i], tw, tws, lr[:i], up, bias, out_dtype=f32),
            lambda i: triton_ops.ternary_gemm(x[:i], tw, tws, lr[:i], up, bias, out_dtype=f32),
            lambda i: triton_ops.w4a16_gemm(x[:i], qw, ws, None, bias, f32, lr[:i], up),
            lambda i: triton_ops.w4a8_gemm(qs8[:i], ss8[:i], qw, ws, lr[:i], up, bias, out_dtype=f32),
            lambda i: triton_ops.w4a8_gemm(qs8[:i], ss8[:i], qw, *ref.progressive_scales(ws)[:1], lr[:i], up, bias,
                                           out_dtype=f32, s0=ref.progressive_scales(ws)[1])]
    for run in runs:
        assert torch.equal(run(40)[:20], run(20)) and torch.equal(run(2)[:1], run(1))
    assert torch.equal(runs[0](66)[:65], runs[0](65))  # many tokens: no split


def test_empty_batch():
    g = gen(9)
    x = rand(0, 128, dtype=torch.bfloat16, g=g)
    q, s, lr = triton_ops.quantize_act_int4(x, None, rand(128, 16, dtype=torch.bfloat16, g=g))
    assert q.shape == (0, 128) and s.shape == (0, 2) and lr.shape == (0, 16)
    qw, ws = int4_weight(32, 128, g), rand(2, 32, dtype=torch.bfloat16, g=g)
    assert triton_ops.w4a4_gemm(q, s, qw, ws).shape == (0, 32)
    assert triton_ops.w4a16_gemm(x, qw, ws).shape == (0, 32)


def test_rank_checks():
    g = gen(7)
    qx, s = torch.zeros(2, 64, dtype=torch.int8, device=DEV), torch.ones(2, 1, device=DEV)
    qw, ws = int4_weight(16, 64, g), rand(1, 16, dtype=torch.bfloat16, g=g)
    lr, up = rand(2, 8, dtype=torch.bfloat16, g=g), rand(16, 8, dtype=torch.bfloat16, g=g)
    with pytest.raises(ValueError, match="multiple of 16"):
        triton_ops.w4a4_gemm(qx, s, qw, ws, lr, up)
    with pytest.raises(ValueError, match="do not match"):
        triton_ops.w4a4_gemm(qx[:, :32], s, qw, ws)


# ---- dispatch ----

def test_dispatch_default_cpu_is_reference(monkeypatch):
    monkeypatch.delenv("LOWBIT_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_forced", None)
    assert kernels.backend_for(torch.device("cpu")) is ref


@pytest.mark.skipif(not INTERPRET, reason="forcing Triton on CPU tensors needs the interpreter")
@pytest.mark.parametrize("fmt,options,op", [
    ("svdq_w4a4", {"rank": 16}, "w4a4_gemm"),
    ("svdq_w4a4", {"rank": 16, "act_unsigned": True}, "w4a4_gemm"),
    ("w4a16", {"group_size": 128}, "w4a16_gemm"),
    ("ternary", {"rank": 16}, "ternary_gemm"),
    ("ternary", {"rank": 16, "act_int8": True}, "ternary_int8_gemm"),
])
def test_dispatch_forced_triton_runs_a_layer(monkeypatch, fmt, options, op):
    from comfyui_lowbit.quant_ops import quantize_linear

    torch.manual_seed(8)
    layer = quantize_linear(torch.nn.Linear(128, 48), fmt, dtype=torch.bfloat16, **options)
    x = torch.randn(3, 128).to(torch.bfloat16)
    monkeypatch.setattr(dispatch, "_forced", None)
    monkeypatch.setenv("LOWBIT_BACKEND", "reference")
    expected = layer(x)
    monkeypatch.setenv("LOWBIT_BACKEND", "triton")
    assert kernels.backend_for(torch.device("cpu")) is triton_ops
    calls = []
    orig = getattr(triton_ops, op)
    monkeypatch.setattr(triton_ops, op, lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    close(layer(x), expected)
    assert calls == [1]


@pytest.mark.skipif(not INTERPRET, reason="forcing Triton on CPU tensors needs the interpreter")
def test_mixed_signedness_layer_quantizes_in_one_call(monkeypatch):
    from comfyui_lowbit.quant_ops import SVDQW4A4Linear, W4A4Weights

    g, bf = gen(15), torch.bfloat16
    q = torch.randint(-8, 8, (48, 256), generator=g)
    ws, smooth = (torch.rand(4, 48, generator=g) * 0.02).to(bf), (torch.rand(256, generator=g) + 0.5).to(bf)
    down, up = rand(256, 16, dtype=bf, g=g, scale=0.1), rand(48, 16, dtype=bf, g=g, scale=0.1)
    layer = SVDQW4A4Linear(W4A4Weights.pack(q, ws, smooth, down, up, None, act_unsigned=True, act_unsigned_from=128))
    x = torch.cat([rand(5, 128, dtype=bf, g=g), rand(5, 128, dtype=bf, g=g).abs()], 1)
    monkeypatch.setattr(dispatch, "_forced", None)
    monkeypatch.setenv("LOWBIT_BACKEND", "reference")
    expected = layer(x)
    monkeypatch.setenv("LOWBIT_BACKEND", "triton")
    calls = []
    orig = triton_ops.quantize_act_int4
    monkeypatch.setattr(triton_ops, "quantize_act_int4", lambda *a, **kw: calls.append(kw["unsigned"]) or orig(*a, **kw))
    close(layer(x), expected)
    assert calls == [128]


def test_interpreter_autotunes_one_config():
    from comfyui_lowbit.kernels import triton_act, triton_rowquant, triton_ternary, triton_w4a4, triton_w4a8, triton_wonly

    tuners = [triton_act._act_int4_kernel, triton_rowquant._row_quant_kernel, triton_w4a4._w4a4_kernel,
              triton_w4a8._w4a8_kernel,
              triton_ternary._ternary_int8_kernel, *triton_wonly._TUNED.values()]
    assert all(len(t.configs) == (1 if INTERPRET else len(t.configs)) for t in tuners)
    assert INTERPRET or all(len(t.configs) > 1 for t in tuners)


def test_dispatch_fallback_warns_once(monkeypatch, caplog):
    monkeypatch.delenv("LOWBIT_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_forced", None)
    monkeypatch.setattr(dispatch, "_triton_ops", None)
    monkeypatch.setattr(dispatch, "_triton_error", "ImportError: No module named 'triton'")
    monkeypatch.setattr(dispatch, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="comfyui_lowbit"):
        assert dispatch.backend_for(torch.device("cuda")) is ref
        assert dispatch.backend_for(torch.device("cuda")) is ref
    msgs = [r.getMessage() for r in caplog.records if r.name == "comfyui_lowbit"]
    assert len(msgs) == 1 and "\n" not in msgs[0]
    assert "reference" in msgs[0] and "No module named 'triton'" in msgs[0]
    monkeypatch.setenv("LOWBIT_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="cannot load"):
        dispatch.backend_for(torch.device("cpu"))


# ---- compiled kernels at FLUX shapes (GPU only) ----

def _gpu_ready():
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1: the gpu tests check compiled kernels")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 300, 4608])
def test_gpu_w4a4_flux_qkv(m):
    _gpu_ready()
    g, dt, k, n, r = gen(10), torch.bfloat16, 3072, 9216, 32
    x = rand(m, k, dtype=dt, g=g)
    smooth = (torch.rand(k, generator=g) + 0.5).to(dt).cuda()
    down, up = rand(k, r, dtype=dt, g=g, scale=0.05), rand(n, r, dtype=dt, g=g, scale=0.05)
    q, s, lr = triton_ops.quantize_act_int4(x, smooth, down)
    eq, es, elr = ref.quantize_act_int4(x, smooth, down)
    assert torch.equal(q, eq) and torch.equal(s, es)
    close(lr, elr)
    qw, ws, bias = int4_weight(n, k, g), rand(k // 64, n, dtype=dt, g=g, scale=0.02), rand(n, dtype=dt, g=g)
    close(triton_ops.w4a4_gemm(q, s, qw, ws, lr, up, bias, out_dtype=dt), ref.w4a4_gemm(q, s, qw, ws, lr, up, bias, out_dtype=dt))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 64, 512])
def test_gpu_w4a16_flux_modulation(m):
    _gpu_ready()
    g, dt, k, n = gen(11), torch.bfloat16, 3072, 18432
    x = rand(m, k, dtype=dt, g=g)
    qw, ws, bias = int4_weight(n, k, g), rand(k // 64, n, dtype=dt, g=g, scale=0.02), rand(n, dtype=dt, g=g)
    close(triton_ops.w4a16_gemm(x, qw, ws, None, bias), ref.w4a16_gemm(x, qw, ws, None, bias))


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["fused", "dequant"])
@pytest.mark.parametrize("m,zeros,gs", [(1, True, 128), (512, True, 128), (512, False, 64), (4608, False, 64)])
def test_gpu_w4a16_t5_paths(monkeypatch, path, m, zeros, gs):
    """T5-XXL's feed-forward input (4096 -> 10240) through both weight-only paths (the table picks one)."""
    from comfyui_lowbit.kernels import triton_wonly

    _gpu_ready()
    monkeypatch.setattr(triton_wonly, "wonly_path", lambda *a: path)
    g, dt, k, n = gen(16), torch.bfloat16, 4096, 10240
    x = rand(m, k, dtype=dt, g=g)
    qw, ws = int4_weight(n, k, g), rand(k // gs, n, dtype=dt, g=g, scale=0.02)
    wz = rand(k // gs, n, dtype=dt, g=g, scale=0.01) if zeros else None
    close(triton_ops.w4a16_gemm(x, qw, ws, wz), ref.w4a16_gemm(x, qw, ws, wz))


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["fused", "dequant"])
@pytest.mark.parametrize("m", [1, 16, 4608])
def test_gpu_ternary_flux_qkv_paths(monkeypatch, path, m):
    from comfyui_lowbit.kernels import triton_wonly

    _gpu_ready()
    monkeypatch.setattr(triton_wonly, "wonly_path", lambda *a: path)
    g, dt, k, n, r = gen(17), torch.bfloat16, 3072, 9216, 32
    x = rand(m, k, dtype=dt, g=g)
    lr, up = rand(m, r, dtype=dt, g=g), rand(n, r, dtype=dt, g=g, scale=0.05)
    tw, ws, bias = ternary_weight(n, k, g), rand(n, dtype=dt, g=g, scale=0.01).abs(), rand(n, dtype=dt, g=g)
    close(triton_ops.ternary_gemm(x, tw, ws, lr, up, bias), ref.ternary_gemm(x, tw, ws, lr, up, bias))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 1024])
def test_gpu_ternary_flux_linear2(m):
    _gpu_ready()
    g, dt, k, n, r = gen(12), torch.bfloat16, 15360, 3072, 64
    x = rand(m, k, dtype=dt, g=g)
    down, up = rand(k, r, dtype=dt, g=g, scale=0.02), rand(n, r, dtype=dt, g=g, scale=0.05)
    tw, ws, bias = ternary_weight(n, k, g), rand(n, dtype=dt, g=g, scale=0.01).abs(), rand(n, dtype=dt, g=g)
    lr = triton_ops.lora_down(x, down)
    close(lr, ref.lora_down(x, down))
    close(triton_ops.ternary_gemm(x, tw, ws, lr, up, bias), ref.ternary_gemm(x, tw, ws, lr, up, bias))
    q, s, lr8 = triton_ops.quantize_act_int8(x, down)
    eq, es, _ = ref.quantize_act_int8(x, down)
    assert torch.equal(q, eq) and torch.equal(s, es)
    close(triton_ops.ternary_int8_gemm(q, s, tw, ws, lr8, up, bias, out_dtype=dt),
          ref.ternary_int8_gemm(q, s, tw, ws, lr8, up, bias, out_dtype=dt))
