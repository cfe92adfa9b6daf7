"""Quantized layers (reference backend): forward == float math on the dequantized operands."""
import pytest
import torch

from comfyui_lowbit.kernels import reference as ref
from comfyui_lowbit.quant_ops import MODULES, quantize_linear

from synthetic import heavy_tailed_linear, outlier_inputs

MS = (1, 3, 130)


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LOWBIT_BACKEND", "reference")


@pytest.fixture(scope="module")
def layers():
    lin = heavy_tailed_linear(k=192, n=80)  # 3 groups of 64: an odd number
    x = outlier_inputs(m=130, k=192)
    amax = x.abs().amax(0)
    fast = dict(iters=3, search_iters=1, alphas=(0.5,))
    return lin, {
        "svdq_w4a4": quantize_linear(lin, "svdq_w4a4", rank=16, act_absmax=amax, **fast),
        "svdq_w4a4_unsigned": quantize_linear(lin, "svdq_w4a4", rank=16, act_unsigned=True, iters=3),
        "w4a16": quantize_linear(lin, "w4a16", group_size=64),
        "ternary": quantize_linear(lin, "ternary", rank=16, iters=3),
        "ternary_int8": quantize_linear(lin, "ternary", rank=16, act_int8=True, iters=3),
    }


def _lowrank(x, m):
    if m.proj_down is None:
        return 0.0
    lr = (x.double() @ m.proj_down.double()).float()  # float32, as the kernels keep it
    hi = lr.to(m.proj_up.dtype)  # the up projection's two 16-bit halves
    lo = (lr - hi.float()).to(m.proj_up.dtype)
    return (hi.double() + lo.double()) @ m.proj_up.double().t()


def _float_forward(name, m, x):
    """float64 computation on dequantized operands, independent of the kernels' loop structure."""
    b = m.bias.double()
    if name.startswith("svdq"):
        q, s, _ = ref.quantize_act_int4(x, m.smooth, None, unsigned=m._options["act_unsigned"])
        xq = (q.double().reshape(x.shape[0], -1, 64) * s.double().unsqueeze(-1)).reshape(x.shape)
        r = ref.unpack_int4(m.weight).double() * m.wscales.double().t().repeat_interleave(64, dim=1)
        return xq @ r.t() + _lowrank(x, m) + b
    if name == "w4a16":
        w = m.dequantize().to(m.compute_dtype)  # the 16-bit dot takes the weight rounded to 16 bits
        return x.to(m.compute_dtype).double() @ w.double().t() + b
    t = ref.unpack_ternary(m.weight).double() * m.wscales.double().unsqueeze(1)
    if name == "ternary_int8":
        q, s, _ = ref.quantize_act_int8(x, None)
        return (q.double() * s.double().unsqueeze(1)) @ t.t() + _lowrank(x, m) + b
    return x.to(m.compute_dtype).double() @ t.t() + _lowrank(x, m) + b


@pytest.mark.parametrize("m_tokens", MS)
@pytest.mark.parametrize("name", ["svdq_w4a4", "svdq_w4a4_unsigned", "w4a16", "ternary", "ternary_int8"])
def test_forward_matches_float_on_dequantized(layers, name, m_tokens):
    lin, mods = layers
    m = mods[name]
    x = outlier_inputs(m=m_tokens, k=192, seed=5).to(torch.bfloat16)
    expect = _float_forward(name, m, x)
    y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == (m_tokens, 80)
    # only the final bf16 rounding (and fp32 accumulation order) separates the two
    torch.testing.assert_close(y.double(), expect, rtol=8e-3, atol=1e-3 * expect.abs().max().item())
    y32 = m(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), expect, rtol=1e-4, atol=1e-5 * expect.abs().max().item())


def test_forward_keeps_leading_dims_and_rejects_wrong_k(layers):
    _, mods = layers
    m = mods["svdq_w4a4"]
    x = outlier_inputs(m=6, k=192).reshape(2, 3, 192).to(torch.float16)
    assert m(x).shape == (2, 3, 80)
    with pytest.raises(ValueError, match="in_features = 192"):
        m(torch.zeros(4, 128))


def test_dequantize_approximates_the_float_layer(layers):
    lin, mods = layers
    w = lin.weight.detach()
    for name in ("svdq_w4a4", "w4a16", "ternary"):
        err = (mods[name].dequantize() - w).norm() / w.norm()
        assert err < (0.7 if name == "ternary" else 0.25), (name, err)
    m = mods["svdq_w4a4_unsigned"]
    # the stored bias carries the shift compensation; float_bias() undoes it
    assert (m.float_bias() - lin.bias.float()).abs().max() < 1e-2


def test_state_dict_round_trip(layers):
    _, mods = layers
    for name in ("svdq_w4a4", "w4a16", "ternary_int8"):
        m = mods[name]
        fresh = type(m)(m.packed())
        fresh.load_state_dict(m.state_dict())
        x = outlier_inputs(m=3, k=192).to(torch.bfloat16)
        assert torch.equal(fresh(x), m(x))
        assert set(m.state_dict()) == set(m.packed().tensors())
        assert "weight" in m.state_dict()


def test_modules_registry():
    assert set(MODULES) == {"svdq_w4a4", "w4a16", "ternary"}
