"""Calibrated quantizers on a seeded layer whose inputs are correlated (a decaying spectrum, like real
activations) with outlier channels: each improvement must beat the quantizer it replaces on held-out inputs."""
import hashlib

import pytest
import torch

from comfyui_lowbit.quant_ops import InputRecorder, TernaryLinear, quantize_linear, quantizers
from comfyui_lowbit.quant_ops.datafit import Whitener, gptq_int4_groups, gram_lowrank, second_moment, svd_lowrank
from comfyui_lowbit.quant_ops.refine import refine_block

from synthetic import heavy_tailed_linear


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LOWBIT_BACKEND", "reference")


def correlated_inputs(m, k=128, seed=1, mix_seed=9):
    """Rows z @ A: A has singular values ~ 1/i (a few directions dominate) and 3 channels x20."""
    ga = torch.Generator().manual_seed(mix_seed)
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=ga))
    a = q * (1.0 / torch.arange(1, k + 1).float()).unsqueeze(0) @ torch.linalg.qr(torch.randn(k, k, generator=ga))[0]
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) @ a.t() * 4
    x[:, [5, 40, 99]] *= 20
    return x


@pytest.fixture(scope="module")
def layer():
    lin = heavy_tailed_linear(k=128, n=96, seed=3)
    x_cal, x_test = correlated_inputs(512, seed=1), correlated_inputs(256, seed=2)
    with torch.no_grad():
        y = lin(x_test)
    return lin, x_cal, x_test, y


def _err(m, x, y):
    with torch.no_grad():
        return ((m(x.bfloat16()).float() - y).norm() / y.norm()).item()


def _q(layer, fmt, rank, **kw):
    lin, x_cal, x_test, y = layer
    return _err(quantize_linear(lin, fmt, rank=rank, act_absmax=x_cal.abs().amax(0), **kw), x_test, y)


def test_w4a4_improvements_each_beat_todays_calibrated(layer):
    x_cal = layer[1]
    today = _q(layer, "svdq_w4a4", 8, iters=5)
    whiten = _q(layer, "svdq_w4a4", 8, calib_inputs=x_cal, gptq=False, act_fit=0)
    gptq = _q(layer, "svdq_w4a4", 8, calib_inputs=x_cal, whiten=False, act_fit=0)
    both = _q(layer, "svdq_w4a4", 8, calib_inputs=x_cal, act_fit=0)
    print(f"W4A4 held-out error: today {today:.4f}, whiten {whiten:.4f}, gptq {gptq:.4f}, both {both:.4f}")
    assert whiten < today and gptq < today and both < 0.85 * today, (today, whiten, gptq, both)


def test_w4a4_act_fit_lowers_the_error_with_int4_activations(layer):
    """Training lambda and the branch against the output error with int4 activations simulated beats the
    calibrated quantizer without it on held-out inputs; act_fit=0 is that quantizer."""
    x_cal = layer[1]
    without = _q(layer, "svdq_w4a4", 8, calib_inputs=x_cal, act_fit=0)
    with_fit = _q(layer, "svdq_w4a4", 8, calib_inputs=x_cal, act_fit=100)
    print(f"W4A4 held-out error: calibrated {without:.4f}, + act_fit {with_fit:.4f}")
    assert with_fit < 0.97 * without, (without, with_fit)


def test_act_fit_trains_under_inference_mode(layer):
    """ComfyUI runs nodes under torch.inference_mode: act_fit must still get gradients."""
    with torch.inference_mode():
        assert _q(layer, "svdq_w4a4", 8, calib_inputs=layer[1], iters=1, search_iters=1, alphas=(0.5,), act_fit=3) < 1


def test_ternary_improvements_each_beat_todays(layer):
    x_cal = layer[1]
    off = dict(gptq=False, whiten=False, fit_scales=False)
    today = _q(layer, "ternary", 16, iters=5)
    res = {name: _q(layer, "ternary", 16, calib_inputs=x_cal, **{**off, name: True}) for name in off}
    both = _q(layer, "ternary", 16, calib_inputs=x_cal)
    print(f"ternary held-out error: today {today:.4f}, {res}, all {both:.4f}")
    assert all(e < today for e in res.values()) and both < 0.7 * today, (today, res, both)


def test_switches_off_is_todays_calibrated_path(layer):
    lin, x_cal, _, _ = layer
    a = quantize_linear(lin, "svdq_w4a4", rank=8, act_absmax=x_cal.abs().amax(0), calib_inputs=x_cal, iters=2,
                        gptq=False, whiten=False, act_fit=0).packed()
    b = quantizers.svdquant(lin.weight.detach(), lin.bias.detach(), 8, x_cal.abs().amax(0), x_cal, iters=2,
                            gptq=False, whiten=False, act_fit=0)
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())


def _digest(packed) -> str:
    h = hashlib.sha256()
    for k, t in sorted(packed.tensors().items()):
        h.update(k.encode() + t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# sha256 prefixes of the packed tensors computed by main before the calibrated quantizers (788bcf9, torch 2.13
# CPU): data-free, and with act_absmax only (what a version 1 calibration file gives)
BEFORE = {("svdq_w4a4", False): "624089912b7161bd", ("ternary", False): "e147eaa3d0822816",
          ("svdq_w4a4", True): "52974d0a8bc2ad10", ("ternary", True): "d153beebd72901db"}


@pytest.mark.parametrize("fmt,absmax", sorted(BEFORE))
def test_without_samples_unchanged_bit_for_bit(fmt, absmax):
    lin = heavy_tailed_linear(k=128, n=64, seed=4)
    kw = {"act_absmax": torch.linspace(0.1, 10, 128), **({"search_iters": 1} if fmt == "svdq_w4a4" else {})} if absmax else {}
    packed = quantize_linear(lin, fmt, rank=8, iters=3, **kw).packed()
    assert _digest(packed) == BEFORE[(fmt, absmax)]


def test_gptq_groups_beat_round_to_nearest_in_weighted_norm(layer):
    lin, x_cal, _, _ = layer
    w = lin.weight.detach().float()
    h = second_moment(x_cal)
    q_rtn, s_rtn = quantizers.quantize_int4_groups(w, 64, torch.bfloat16)
    q, s = gptq_int4_groups(w, h, lambda cols: quantizers.quantize_int4_groups(cols, 64, torch.bfloat16)[1][0])
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7 and s.shape == (2, 96)

    def deq(q, s):
        return q.float() * s.float().t().repeat_interleave(64, dim=1)
    wh = Whitener(h)
    assert wh.error(w - deq(q, s)) < 0.8 * wh.error(w - deq(q_rtn, s_rtn))


def test_recorder_sample_is_uniform_rows_and_leaves_global_rng():
    rec = InputRecorder(tokens=50)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    rows = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    rows[:, 0], rows[:, 1] = torch.arange(300) // 16, torch.arange(300) % 16  # exact in bf16: the row index
    for part in rows.split([7, 100, 193]):
        rec.record("l", part.reshape(1, -1, 64))
    assert torch.equal(torch.random.get_rng_state(), before)
    s = rec.sample("l").float()
    assert s.shape == (50, 64)
    idx = (s[:, 0] * 16 + s[:, 1]).long()
    assert torch.equal(s, rows[idx].bfloat16().float()) and idx.unique().numel() == 50
    assert idx.max() > 150 and idx.min() < 150  # from every call, not only the first
    assert torch.equal(rec.absmax["l"], rows.abs().amax(0))
    t = rec.tensors()
    assert set(t) == {"l.input_absmax", "l.input_sample"} and t["l.input_sample"].dtype == torch.bfloat16
    assert set(InputRecorder(tokens=0).tensors()) == set()


def test_refine_block_lowers_block_error():
    torch.manual_seed(0)
    fp = torch.nn.Sequential(heavy_tailed_linear(128, 192, seed=5), torch.nn.GELU(), heavy_tailed_linear(192, 128, seed=6))
    xs = [correlated_inputs(64, seed=s) for s in range(4)]
    with torch.no_grad():
        ys = [fp(x) for x in xs]
    x_cal = torch.cat(xs)
    q = torch.nn.Sequential(quantize_linear(fp[0], "ternary", rank=8, calib_inputs=x_cal), torch.nn.GELU(),
                            quantize_linear(fp[2], "ternary", rank=8, calib_inputs=torch.nn.functional.gelu(fp[0](x_cal)).detach()))
    codes = [m.weight.clone() for m in q if isinstance(m, TernaryLinear)]
    before, after = refine_block(q, lambda b, x: b(x.bfloat16()), xs, ys, steps=60)
    assert after < 0.95 * before, (before, after)
    assert all(torch.equal(c, m.weight) for c, m in zip(codes, [m for m in q if isinstance(m, TernaryLinear)]))
    with torch.no_grad():  # the refined 16-bit values are what the module now computes with
        err = sum(((q(x.bfloat16()).float() - y) ** 2).sum() / (y ** 2).sum() for x, y in zip(xs, ys)) / len(xs)
    assert abs(err.sqrt().item() - after) < 1e-3 * max(1.0, after) + 1e-4


@pytest.mark.parametrize("shape", [(300, 128), (96, 200)])
def test_gram_lowrank_is_the_truncated_svd(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * torch.linspace(3, 0.1, shape[1])
    up, down = svd_lowrank(w, 8)
    gu, gd = gram_lowrank(w, 8)
    assert gu.shape == up.shape and gd.shape == down.shape
    assert ((gu @ gd.t() - up @ down.t()).norm() / (up @ down.t()).norm()).item() < 1e-4
    assert torch.allclose(gu.norm(dim=0), up.norm(dim=0), rtol=1e-4)  # balanced: U sqrt(S), V sqrt(S)


def test_calib_inputs_errors():
    lin = torch.nn.Linear(64, 32)
    with pytest.raises(ValueError, match=r"calib_inputs must be a \(tokens, 64\) tensor"):
        quantize_linear(lin, "svdq_w4a4", rank=0, calib_inputs=torch.ones(10, 32))
    with pytest.raises(ValueError, match="finite"):
        quantize_linear(lin, "ternary", rank=0, calib_inputs=torch.full((4, 64), float("nan")))
