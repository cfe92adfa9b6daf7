"""Activation modes (quant_ops/activations.py) on quantized layers, reference backend: fp8 == float math on the
e4m3 codes, unsigned layers included; the mode changes no weight and reaches no checkpoint."""
import dataclasses
import logging

import pytest
import torch

from comfyui_lowbit import kernels
from comfyui_lowbit.kernels import reference as ref
from comfyui_lowbit.quant_ops import (activations, module_from_packed, quantize_linear, resolve_activations,
                                      set_activations, use_fp8)

from synthetic import heavy_tailed_linear, outlier_inputs


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LOWBIT_BACKEND", "reference")


@pytest.fixture(scope="module")
def layers():
    lin = heavy_tailed_linear(k=192, n=80)
    x = outlier_inputs(m=130, k=192)
    fast = dict(iters=3, search_iters=1, alphas=(0.5,))
    svdq = quantize_linear(lin, "svdq_w4a4", rank=16, act_absmax=x.abs().amax(0), **fast)
    # Nunchaku's single-block linear2: channels >= 64 shifted and unsigned, their share folded out of the bias
    p = svdq.packed()
    comp = ref.ACT_SHIFT * svdq._residual()[:, 64:].sum(dim=1)
    p = dataclasses.replace(p, bias=(p.bias.float() - comp).to(p.bias.dtype), act_unsigned=True, act_unsigned_from=64)
    return lin, {
        "svdq": svdq,
        "svdq_unsigned": quantize_linear(lin, "svdq_w4a4", rank=16, act_unsigned=True, iters=3),
        "svdq_unsigned_from": module_from_packed(p),
        "ternary": quantize_linear(lin, "ternary", rank=16, iters=3),
        "ternary_int8": quantize_linear(lin, "ternary", rank=16, act_int8=True, iters=3),
    }


def _fp8_float_forward(m, x):
    """float64 on the e4m3 codes and the dequantized weight: x_q @ W^T + branch + the float layer's bias."""
    smooth = m.smooth if hasattr(m, "smooth") else None
    q, s, _ = ref.quantize_act_fp8(x, smooth)
    xq = q.double() * s.double().unsqueeze(1)
    if smooth is not None:
        w = ref.unpack_int4(m.weight).double() * m.wscales.double().t().repeat_interleave(64, dim=1)
    else:
        w = ref.unpack_ternary(m.weight).double() * m.wscales.double().unsqueeze(1)
    lr = (x.double() @ m.proj_down.double()).to(m.proj_down.dtype).double() @ m.proj_up.double().t()
    return xq @ w.t() + lr + m.float_bias().double()


@pytest.mark.parametrize("name", ["svdq", "svdq_unsigned", "svdq_unsigned_from", "ternary", "ternary_int8"])
def test_fp8_forward_matches_float_on_codes(layers, name):
    _, mods = layers
    m = mods[name]
    x = outlier_inputs(m=7, k=192, seed=5)
    x[:, 64:] = torch.nn.functional.gelu(x[:, 64:] / 50)  # post-GELU channels for the unsigned layers
    x = x.to(torch.bfloat16)
    set_activations(m, "fp8")
    try:
        y = m(x)
    finally:
        set_activations(m, "int4")
    expect = _fp8_float_forward(m, x)
    torch.testing.assert_close(y.double(), expect, rtol=8e-3, atol=1e-3 * expect.abs().max().item())


@pytest.mark.parametrize("name", ["svdq", "svdq_unsigned_from", "ternary"])
def test_fp8_is_closer_than_int4_to_the_dequantized_layer(layers, name):
    """The same weights: e4m3 per-token activations lose less than the checkpoint's own activations."""
    _, mods = layers
    m = mods[name]
    x = outlier_inputs(m=64, k=192, seed=6).to(torch.bfloat16)
    exact = x.double() @ m.dequantize().double().t() + m.float_bias().double()
    err = {}
    for mode in ("int4", "fp8"):
        set_activations(m, mode)
        err[mode] = ((m(x).double() - exact).norm() / exact.norm()).item()
    set_activations(m, "int4")
    if name == "ternary":  # 16-bit activations: nothing to gain, fp8 just has to stay close
        assert err["fp8"] < 0.01, err
    else:
        assert err["fp8"] < err["int4"], err


def test_mode_changes_no_weights_and_no_checkpoint(layers):
    _, mods = layers
    m = mods["svdq_unsigned"]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    set_activations(m, "fp8")
    m(torch.randn(2, 192).to(torch.bfloat16))
    assert "fp8_bias" in dict(m.named_buffers())  # the compensated bias, kept for the next call
    assert set(m.state_dict()) == set(before) and all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    copy = m.copy_to("cpu")
    assert copy.activations == "fp8" and torch.equal(copy.fp8_bias, m.fp8_bias)
    m.load_state_dict(before)
    assert "fp8_bias" not in dict(m.named_buffers())  # new tensors: recomputed on the next fp8 call
    set_activations(m, "int4")


def test_resolve_activations(monkeypatch, caplog):
    assert resolve_activations("auto", "cpu") == "int4"
    assert resolve_activations("fp8", "cpu") == "fp8"  # the reference runs e4m3 on the CPU
    assert resolve_activations("int4", "cpu") == "int4"
    with pytest.raises(ValueError, match="activations must be one of"):
        resolve_activations("fp4", "cpu")
    monkeypatch.setattr(activations, "_warned", set())
    monkeypatch.setattr(kernels, "fp8_supported", lambda d: False)
    with caplog.at_level(logging.WARNING, logger="comfyui_lowbit"):
        assert resolve_activations("fp8", "cuda:0") == "int4"
        assert resolve_activations("fp8", "cuda:0") == "int4"
        assert resolve_activations("auto", "cuda:0") == "int4"
    msgs = [r.getMessage() for r in caplog.records if r.name == "comfyui_lowbit"]
    assert len(msgs) == 1 and "int4" in msgs[0]
    layer = torch.nn.Sequential(quantize_linear(torch.nn.Linear(64, 16), "ternary", rank=0, iters=1))
    with pytest.raises(RuntimeError, match="fp8 activations need FP8 tensor cores"):
        use_fp8(layer, "cuda:0")
    assert layer[0].activations == "int4"
    monkeypatch.setattr(kernels, "fp8_supported", lambda d: True)
    assert resolve_activations("auto", "cuda:0") == "fp8"
    assert use_fp8(layer, "cuda:0")[0].activations == "fp8"


def test_set_activations_reaches_every_quantized_layer(layers):
    _, mods = layers
    model = torch.nn.Sequential(mods["svdq"], torch.nn.Linear(80, 192), mods["ternary"])
    assert set_activations(model, "fp8") == "fp8"
    assert mods["svdq"].activations == mods["ternary"].activations == "fp8"
    assert set_activations(model, "auto") == "int4"
    assert mods["svdq"].activations == "int4"
