"""Activation modes (quant_ops/activations.py) on quantized layers, reference backend: fp8 and int8 == float math on
their codes, unsigned layers included; the mode changes no weight and reaches no checkpoint; `auto` follows
kernels/activation_modes.json per GPU family (device properties faked)."""
import dataclasses
import logging

import pytest
import torch

from comfyui_lowbit import kernels
from comfyui_lowbit.kernels import reference as ref
from comfyui_lowbit.quant_ops import (activations, module_from_packed, quantize_linear, resolve_activations,
                                      set_activations, use_activations, use_fp8)

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


def _float_forward(m, x, mode, progressive=False):
    """float64 on the fp8 / int8 codes and the dequantized weight (with progressive: its integer group scales times
    the channel scale): x_q @ W^T + branch + the float layer's bias."""
    smooth = m.smooth if hasattr(m, "smooth") else None
    if mode == "fp8":
        q, s, _ = ref.quantize_act_fp8(x, smooth)
    else:
        q, s, _ = ref.quantize_act_int8(x, None, smooth)
    xq = q.double() * s.double().unsqueeze(1)
    if smooth is not None:
        ws = m.wscales.double()
        if progressive:
            s1, s0 = ref.progressive_scales(m.wscales)
            ws = s1.double() * s0.double()
        w = ref.unpack_int4(m.weight).double() * ws.t().repeat_interleave(64, dim=1)
    else:
        w = ref.unpack_ternary(m.weight).double() * m.wscales.double().unsqueeze(1)
    lr = (x.double() @ m.proj_down.double()).float().double() @ m.proj_up.double().t()
    return xq @ w.t() + lr + m.float_bias().double()


@pytest.mark.parametrize("mode,progressive", [("fp8", False), ("int8", False), ("int8", True)])
@pytest.mark.parametrize("name", ["svdq", "svdq_unsigned", "svdq_unsigned_from", "ternary", "ternary_int8"])
def test_forward_matches_float_on_codes(layers, name, mode, progressive):
    _, mods = layers
    m = mods[name]
    x = outlier_inputs(m=7, k=192, seed=5)
    x[:, 64:] = torch.nn.functional.gelu(x[:, 64:] / 50)  # post-GELU channels for the unsigned layers
    x = x.to(torch.bfloat16)
    set_activations(m, mode, progressive=progressive)
    try:
        y = m(x)
    finally:
        set_activations(m, "int4", progressive=False)
    expect = _float_forward(m, x, mode, progressive)
    torch.testing.assert_close(y.double(), expect, rtol=8e-3, atol=1e-3 * expect.abs().max().item())


@pytest.mark.parametrize("name", ["svdq", "svdq_unsigned_from", "ternary"])
def test_fp8_is_closer_than_int4_to_the_dequantized_layer(layers, name):
    """The same weights: e4m3 per-token activations lose less than the checkpoint's own activations."""
    _, mods = layers
    m = mods[name]
    x = outlier_inputs(m=64, k=192, seed=6).to(torch.bfloat16)
    exact = x.double() @ m.dequantize().double().t() + m.float_bias().double()
    err = {}
    for mode in ("int4", "fp8", "int8"):
        set_activations(m, mode)
        err[mode] = ((m(x).double() - exact).norm() / exact.norm()).item()
    set_activations(m, "int4")
    if name == "ternary":  # 16-bit activations: nothing to gain, fp8 and int8 just have to stay close (ternary has
        assert err["fp8"] < 0.01 and err["int8"] < 0.03, err  # no smoothing: int8 per token meets the outliers)
    else:
        assert err["fp8"] < err["int4"] and err["int8"] < err["int4"], err


def test_mode_changes_no_weights_and_no_checkpoint(layers):
    _, mods = layers
    m = mods["svdq_unsigned"]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    set_activations(m, "fp8")
    m(torch.randn(2, 192).to(torch.bfloat16))
    assert "shift_comp" in dict(m.named_buffers())  # the shift's share of the bias, kept for the next call
    assert set(m.state_dict()) == set(before) and all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    copy = m.copy_to("cpu")
    assert copy.activations == "fp8" and torch.equal(copy.shift_comp, m.shift_comp)
    set_activations(m, "int8", progressive=True)
    m(torch.randn(2, 192).to(torch.bfloat16))
    assert set(m.state_dict()) == set(before) and {"int8_s1", "int8_s0"} <= set(dict(m.named_buffers()))
    copy = m.copy_to("cpu")
    assert copy.int8_progressive and torch.equal(copy.int8_s1, m.int8_s1)
    m.load_state_dict(before)
    assert not {"shift_comp", "int8_s1"} & set(dict(m.named_buffers()))  # new tensors: recomputed when used
    set_activations(m, "int4", progressive=False)


def test_resolve_activations(monkeypatch, caplog):
    assert resolve_activations("auto", "cpu") == "int4"
    assert resolve_activations("fp8", "cpu") == "fp8"  # the reference runs e4m3 on the CPU
    assert resolve_activations("int4", "cpu") == "int4" and resolve_activations("int8", "cpu") == "int8"
    with pytest.raises(ValueError, match="activations must be one of"):
        resolve_activations("fp4", "cpu")
    monkeypatch.setattr(activations, "_warned", set())
    monkeypatch.setattr(kernels, "fp8_supported", lambda d: False)
    with caplog.at_level(logging.WARNING, logger="comfyui_lowbit"):
        assert resolve_activations("fp8", "cuda:0") == "int8"
        assert resolve_activations("fp8", "cuda:0") == "int8"
        assert resolve_activations("int8", "cuda:0") == "int8"
    msgs = [r.getMessage() for r in caplog.records if r.name == "comfyui_lowbit"]
    assert len(msgs) == 1 and "int8" in msgs[0]
    layer = torch.nn.Sequential(quantize_linear(torch.nn.Linear(64, 16), "ternary", rank=0, iters=1))
    with pytest.raises(RuntimeError, match="fp8 activations need FP8 tensor cores"):
        use_fp8(layer, "cuda:0")
    assert layer[0].activations == "int4"
    assert use_activations(layer, "int8", "cuda:0")[0].activations == "int8"
    monkeypatch.setattr(kernels, "fp8_supported", lambda d: True)
    assert use_fp8(layer, "cuda:0")[0].activations == "fp8"


class _Props:
    def __init__(self, name, major, minor, arch=""):
        self.name, self.major, self.minor, self.gcnArchName = name, major, minor, arch


# (device name, compute capability, ROCm arch, expected auto mode): vendor device names as torch reports them
GPUS = [("NVIDIA H100 80GB HBM3", (9, 0), "", "fp8"), ("NVIDIA H200", (9, 0), "", "fp8"),
        ("NVIDIA GeForce RTX 4090", (8, 9), "", "int8"), ("NVIDIA GeForce RTX 4060 Laptop GPU", (8, 9), "", "int8"),
        ("NVIDIA L40S", (8, 9), "", "fp8"), ("NVIDIA RTX 6000 Ada Generation", (8, 9), "", "fp8"),
        ("NVIDIA GeForce RTX 3090", (8, 6), "", "int8"), ("NVIDIA A100-SXM4-80GB", (8, 0), "", "int8"),
        ("NVIDIA GeForce RTX 5090", (12, 0), "", "int8"), ("NVIDIA RTX PRO 6000 Blackwell", (12, 0), "", "int8"),
        ("NVIDIA B200", (10, 0), "", "fp8"), ("NVIDIA GeForce RTX 2080 Ti", (7, 5), "", "int8"),
        ("AMD Instinct MI300X", (9, 4), "gfx942:sramecc+:xnack-", "int8"),
        ("AMD Instinct MI355X", (9, 5), "gfx950", "fp8"), ("AMD Radeon RX 9070 XT", (12, 0), "gfx1201", "fp8")]


@pytest.mark.parametrize("name,cc,arch,mode", GPUS)
def test_auto_follows_the_gpu_family_table(monkeypatch, name, cc, arch, mode):
    """activations=auto on a faked GPU: the family kernels/activation_modes.json gives (its first match), through
    the real fp8_supported (FP8 only where the kernels take it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: _Props(name, *cc, arch))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: name)
    monkeypatch.setattr(torch.version, "hip", "6.2" if arch else None)
    assert resolve_activations("auto", "cuda:0") == mode
    family = kernels.auto_family("cuda:0")
    assert family["mode"] == mode and family["why"]
    assert family["peaks"] is None or family["source"] in _table()["sources"]


def _table():
    import json

    with open(kernels.dispatch.MODES_TABLE) as f:
        return json.load(f)


def test_activation_table_is_complete():
    """Every family names a mode the kernels run, says why, and cites a source for its peak rates; the last one
    matches any GPU."""
    table = _table()
    for f in table["families"]:
        assert f["mode"] in ("int4", "int8", "fp8") and f["why"] and set(f) >= {"family", "match", "peaks", "measured"}
        assert (f["peaks"] is None) == (f["source"] is None), f["family"]
    assert table["families"][-1]["match"] == {}


def test_set_activations_reaches_every_quantized_layer(layers):
    _, mods = layers
    model = torch.nn.Sequential(mods["svdq"], torch.nn.Linear(80, 192), mods["ternary"])
    assert set_activations(model, "fp8") == "fp8"
    assert mods["svdq"].activations == mods["ternary"].activations == "fp8"
    assert set_activations(model, "auto") == "int4"
    assert mods["svdq"].activations == "int4"
    assert set_activations(model, "int8") == "int8"
    assert mods["svdq"].activations == mods["ternary"].activations == "int8"
    set_activations(model, "int4")


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_unsigned_layer_follows_a_lora_bias_patch(layers, mode):
    """An unsigned (post-GELU) layer's unshifted bias is its current bias plus the shift's share: a LoRA bias patch
    applied after a first forward (which computes and keeps the share) moves the output by exactly that patch."""
    from comfyui_lowbit.quant_ops import apply_lora, remove_lora

    _, mods = layers
    m = mods["svdq_unsigned"]
    x = outlier_inputs(m=6, k=192, seed=3)
    set_activations(m, mode)
    try:
        before = m(x).double()
        delta = torch.linspace(-1, 1, m.out_features)
        apply_lora(m, [], delta)
        after = m(x).double()
        remove_lora(m)
        again = m(x).double()
    finally:
        set_activations(m, "int4")
    bias_step = (m.bias.float() + delta).to(m.bias.dtype).double() - m.bias.double()  # the patch as the layer holds it
    assert torch.allclose(after - before, bias_step.expand_as(after), atol=1e-5)
    assert torch.equal(again, before)
