"""LoRA through the low-rank branch (quant_ops/lora.py, no ComfyUI), on tiny FLUX-shaped layers.

The lowbit layer with a LoRA must equal the dequantized layer with the LoRA merged in float, within
the base layer's own quantization error; the LoRA's share of the output must be exact to 16-bit
rounding; apply / restrength / remove must leave the base tensors bit-identical and never build a
16-bit copy of a quantized weight.
"""
import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from comfyui_lowbit.quant_ops import W4A16Linear, quantize_linear
from comfyui_lowbit.quant_ops import LoraFactor, apply_lora, compose_branch, lora_columns, originals, remove_lora

from synthetic import heavy_tailed_linear

H = 256  # tiny FLUX: hidden 256, mlp 1024, head dim 128
FAST = dict(iters=2)
# (name, in, out, format, options)
LAYERS = {
    "double_blocks.0.img_attn.qkv": (H, 3 * H, "svdq_w4a4", dict(rank=16, **FAST)),
    "double_blocks.0.img_mlp.2": (4 * H, H, "svdq_w4a4", dict(rank=16, act_unsigned=True, **FAST)),
    "double_blocks.0.img_mod.lin": (H, 6 * H, "w4a16", {}),
    "double_blocks.0.img_attn.proj": (H, H, "ternary", dict(rank=0, iters=1)),
    "double_blocks.0.txt_attn.proj": (H, H, "ternary", dict(rank=16, act_int8=True, iters=2)),
    "single_blocks.0.linear1": (H, 7 * H, "svdq_w4a4", dict(rank=16, **FAST)),
    "single_blocks.0.linear2": (5 * H, H, "svdq_w4a4", dict(rank=16, **FAST)),
}


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LOWBIT_BACKEND", "reference")


@pytest.fixture(scope="module")
def layers():
    out = {}
    for i, (name, (k, n, fmt, opts)) in enumerate(LAYERS.items()):
        lin = heavy_tailed_linear(k=k, n=n, seed=10 + i)
        out[name] = quantize_linear(lin, fmt, **opts)
    return out


def _x(k, m=24, seed=3):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    return x.abs() if k == 4 * H else x  # post-GELU-like input for the unsigned layer


def _lora(rows, cols, rank=8, seed=0, name="lora", alpha=None, strength=1.0, out_offset=None, in_offset=None):
    g = torch.Generator().manual_seed(seed)
    up = (0.05 * torch.randn(rows, rank, generator=g)).to(torch.bfloat16)
    down = (0.05 * torch.randn(rank, cols, generator=g)).to(torch.bfloat16)
    return LoraFactor.from_alpha(up, down, alpha=alpha, strength=strength, out_offset=out_offset,
                                 in_offset=in_offset, name=name)


def _delta(m, factors):
    """float64 merged LoRA delta (N, K) for the reference."""
    d = torch.zeros(m.out_features, m.in_features, dtype=torch.float64)
    for f in factors:
        r0, rn = f.out_offset or (0, m.out_features)
        c0, cn = f.in_offset or (0, m.in_features)
        d[r0:r0 + rn, c0:c0 + cn] += f.scale * (f.up.double() @ f.down.double())
    return d


def _float_base(m):
    """(dequantized weight, bias) of the float layer the lowbit layer approximates (without any LoRA)."""
    orig = originals(m)
    if orig is None:
        return m.dequantize().double(), m.float_bias()
    saved = (*m.branch(), m.bias)
    m.set_branch(orig["proj_down"], orig["proj_up"])
    m.bias = orig["bias"]
    try:
        return m.dequantize().double(), m.float_bias()
    finally:
        m.set_branch(saved[0], saved[1])
        m.bias = saved[2]


def _err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _check(m, factors, x, base_out, w0, b0):
    """The lowbit layer (LoRA applied) vs the float merge: LoRA share exact, total within the base error."""
    with torch.no_grad():
        y = m(x).double()
    delta_out = x.double() @ _delta(m, factors).t()
    lora_err = _err(y - base_out, delta_out)
    ref = F.linear(x.double(), w0 + _delta(m, factors), None if b0 is None else b0.double())
    ref_base = F.linear(x.double(), w0, None if b0 is None else b0.double())
    base_err, total_err = _err(base_out, ref_base), _err(y, ref)
    assert lora_err < 2e-2, f"LoRA share of the output off by {lora_err:.2e} (relative)"
    assert total_err <= base_err * 1.05 + 2e-3, f"lowbit+LoRA vs float merge {total_err:.3e}, base alone {base_err:.3e}"
    return lora_err, base_err, total_err


def _hashes(m):
    return {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", list(LAYERS))
def test_lora_equals_float_merge_every_format(layers, name):
    m = layers[name]
    x = _x(m.in_features)
    with torch.no_grad():
        base_out = m(x).double()
    w0, b0 = _float_base(m)
    fs = [_lora(m.out_features, m.in_features, rank=8, seed=1, alpha=4.0, strength=0.8, name=name)]
    apply_lora(m, fs, layer=name)
    try:
        _check(m, fs, x, base_out, w0, b0)
    finally:
        remove_lora(m)
    with torch.no_grad():
        assert torch.equal(m(x).double(), base_out)


@pytest.mark.parametrize("name,slices", [
    ("double_blocks.0.img_attn.qkv", [(0, H), (H, H), (2 * H, H)]),  # diffusers to_q / to_k / to_v
    ("single_blocks.0.linear1", [(0, H), (H, H), (2 * H, H), (3 * H, 4 * H)]),  # + proj_mlp
])
def test_offsets_into_fused_layers(layers, name, slices):
    m = layers[name]
    x = _x(m.in_features)
    with torch.no_grad():
        base_out = m(x).double()
    w0, b0 = _float_base(m)
    fs = [_lora(n, m.in_features, rank=4 + i, seed=20 + i, alpha=8.0, out_offset=(s, n), name=f"{name}[{s}:{s + n}]")
          for i, (s, n) in enumerate(slices)]
    apply_lora(m, fs, layer=name)
    try:
        r = 16 + sum(4 + i for i in range(len(slices)))
        assert m.branch()[0].shape[1] == -(-r // 16) * 16  # zero-padded to the kernels' rank multiple
        _check(m, fs, x, base_out, w0, b0)
        # rows outside a slice get nothing from that slice's LoRA
        up = m.branch()[1]
        assert torch.count_nonzero(up[slices[1][0]:, 16:16 + 4]) == 0
    finally:
        remove_lora(m)


def test_input_slice_offset(layers):
    m = layers["single_blocks.0.linear2"]  # K = attn 256 + mlp 1024: a LoRA on the attention part only
    x = _x(m.in_features)
    with torch.no_grad():
        base_out = m(x).double()
    w0, b0 = _float_base(m)
    fs = [_lora(m.out_features, H, rank=8, seed=5, in_offset=(0, H))]
    apply_lora(m, fs)
    try:
        _check(m, fs, x, base_out, w0, b0)
    finally:
        remove_lora(m)


def test_stack_restrength_remove_one(layers):
    m = layers["double_blocks.0.img_attn.qkv"]
    x = _x(m.in_features)
    with torch.no_grad():
        base_out = m(x).double()
    w0, b0 = _float_base(m)
    before = _hashes(m)
    down0, up0 = m.branch()
    l1 = dict(rows=m.out_features, cols=m.in_features, rank=8, seed=1, alpha=8.0, name="first")
    l2 = dict(rows=H, cols=m.in_features, rank=16, seed=2, alpha=16.0, out_offset=(H, H), name="second")

    both = [_lora(**l1, strength=1.0), _lora(**l2, strength=0.7)]
    apply_lora(m, both)
    assert m.branch()[0].shape == (m.in_features, 48)  # 16 + 8 + 16, zero-padded to a multiple of 16
    _check(m, both, x, base_out, w0, b0)

    changed = [_lora(**l1, strength=-1.5), _lora(**l2, strength=0.7)]  # negative strength works
    apply_lora(m, changed)
    assert m.branch()[0].shape == (m.in_features, 48)  # recomposed from the originals, not stacked again
    _check(m, changed, x, base_out, w0, b0)

    only2 = [_lora(**l2, strength=0.7)]
    apply_lora(m, only2)
    _check(m, only2, x, base_out, w0, b0)
    with torch.no_grad():
        y_only2 = m(x)
    remove_lora(m)
    apply_lora(m, only2)  # the same state reached directly
    with torch.no_grad():
        assert torch.equal(m(x), y_only2)

    assert remove_lora(m) and not remove_lora(m)
    assert m.branch()[0] is down0 and m.branch()[1] is up0
    assert _hashes(m) == before


@pytest.mark.parametrize("name", list(LAYERS))
def test_apply_remove_bit_identical_and_checkpoint_unchanged(layers, name):
    m = layers[name]
    before, keys, refs = _hashes(m), list(m.state_dict()), {k: v for k, v in m._buffers.items()}
    fs = [_lora(m.out_features, m.in_features, seed=7, strength=2.0)]
    apply_lora(m, fs, bias_delta=torch.randn(m.out_features) * 0.01)
    packed_keys = [k for k in keys if k not in ("proj_down", "proj_up", "bias")]
    assert set(keys) <= set(m.state_dict())
    if isinstance(m, W4A16Linear):  # the runtime branch stays out of state_dict (checkpoints unchanged)
        assert "proj_down" not in m.state_dict() and m.branch()[0] is not None
    for k in packed_keys:
        assert m._buffers[k] is refs[k]
    remove_lora(m)
    assert _hashes(m) == before
    for k, v in refs.items():
        assert m._buffers.get(k) is v


class _Recorder(TorchDispatchMode):
    """Every tensor an op reads or writes while active."""

    def __init__(self):
        super().__init__()
        self.inputs, self.outputs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        self.inputs += [(func, t) for t in flat if isinstance(t, torch.Tensor)]
        self.outputs += [(func, t) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("name", ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_mod.lin", "double_blocks.0.img_attn.proj"])
def test_no_16bit_copy_of_a_quantized_weight(layers, name):
    m = layers[name]
    packed = {id(m._buffers[k]) for k in ("weight", "wscales")}
    fs = [_lora(m.out_features, m.in_features, seed=9), _lora(H, m.in_features, seed=10, out_offset=(0, H))]
    rec = _Recorder()
    with rec:
        apply_lora(m, fs)
        apply_lora(m, fs[:1])
        remove_lora(m)
    assert rec.outputs, "the recorder saw no ops"
    touched = [func for func, t in rec.inputs if id(t) in packed]
    assert not touched, f"ops read the packed weight / scales: {touched}"
    biggest = max(t.numel() for _, t in rec.outputs)
    assert biggest < m.out_features * m.in_features // 4, f"a tensor of {biggest} elements was built"


def test_shape_mismatch_names_key_and_shapes(layers):
    m = layers["double_blocks.0.img_attn.qkv"]
    bad = _lora(m.out_features, 3 * H, name="transformer.transformer_blocks.0.attn.to_q")
    with pytest.raises(ValueError, match=r"to_q.*\(768, 8\).*\(8, 768\).*\(768, 256\)"):
        apply_lora(m, [bad], layer="double_blocks.0.img_attn.qkv")
    off = _lora(H, H, out_offset=(2 * H + 1, H), name="slice")
    with pytest.raises(ValueError, match=r"slice.*rows 513:769"):
        apply_lora(m, [off])
    assert originals(m) is None  # nothing half-applied
    big = [_lora(m.out_features, m.in_features, rank=128, seed=s) for s in (1, 2)]  # 16 + 256 > 256
    with pytest.raises(ValueError, match=r"double_blocks\.0\.img_attn\.qkv: .*16 \+ LoRA ranks \[128, 128\] = 272.*256"):
        apply_lora(m, big, layer="double_blocks.0.img_attn.qkv")
    assert originals(m) is None


def test_compose_branch_leaves_inputs_untouched():
    down = torch.randn(64, 4).to(torch.bfloat16)
    up = torch.randn(32, 4).to(torch.bfloat16)
    d0, u0 = down.clone(), up.clone()
    f = _lora(32, 64, rank=2, strength=-0.5)
    d, u = compose_branch(down, up, [f], 32, 64)
    assert torch.equal(down, d0) and torch.equal(up, u0)
    assert torch.equal(d[:, :4], down) and torch.equal(u[:, :4], up)
    assert torch.equal(u[:, 4:], f.up)
    assert torch.allclose(d[:, 4:].float(), (f.down.float().t() * f.scale), rtol=1e-2)
    assert compose_branch(None, None, [], 32, 64, dtype=torch.bfloat16) == (None, None)


def test_copy_to_keeps_runtime_branch(layers):
    m = layers["double_blocks.0.img_mod.lin"]
    x = _x(m.in_features)
    apply_lora(m, [_lora(m.out_features, m.in_features, seed=4)])
    try:
        c = m.copy_to("cpu")
        assert c is not m and c.branch()[0] is not None
        with torch.no_grad():
            assert torch.equal(c(x), m(x))
    finally:
        remove_lora(m)


@pytest.mark.parametrize("name", list(LAYERS))
def test_lora_columns_are_what_apply_lora_appends(layers, name):
    """Streamed layers (nodes/stream.py) get their LoRAs as columns concatenated to the original branch at run
    time: original + lora_columns is bit for bit the branch apply_lora installs (padding included), its bias the
    same, and forward_with those tensors equals the module's forward with the LoRA applied; the module untouched."""
    m = layers[name]
    n, k = m.out_features, m.in_features
    factors = [_lora(n, k, rank=5, seed=7), _lora(n // 3, k, rank=3, seed=8, out_offset=(n // 3, n // 3))]
    delta = 0.01 * torch.randn(n, generator=torch.Generator().manual_seed(2))
    before = {key: t for key, t in m.forward_tensors().items()}
    down, up, bias = lora_columns(m, factors, delta, layer=name)
    assert all(m.forward_tensors()[key] is t for key, t in before.items())
    t = dict(before, bias=bias)
    t["proj_down"] = down if before["proj_down"] is None else torch.cat([before["proj_down"], down], 1)
    t["proj_up"] = up if before["proj_up"] is None else torch.cat([before["proj_up"], up], 1)
    x = _x(k)
    apply_lora(m, factors, delta, layer=name)
    try:
        assert torch.equal(t["proj_down"], m.branch()[0]) and torch.equal(t["proj_up"], m.branch()[1])
        assert torch.equal(bias, m.bias) and t["proj_down"].shape[1] % 16 == 0
        with torch.no_grad():
            assert torch.equal(m.forward_with(x, t), m(x))
    finally:
        remove_lora(m)
    assert lora_columns(m, [], None) == (None, None, None)


@pytest.mark.parametrize("name", ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_mod.lin",
                                  "double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.proj"])
def test_triton_kernels_take_the_padded_branch(layers, name, monkeypatch):
    """The composed (zero-padded) branch runs through the Triton kernels (interpreted on CPU) like the reference."""
    pytest.importorskip("triton")
    m = layers[name]
    x = _x(m.in_features, m=4)
    apply_lora(m, [_lora(m.out_features, m.in_features, rank=8, seed=11, strength=0.9)])
    try:
        with torch.no_grad():
            ref = m(x).float()
            monkeypatch.setenv("LOWBIT_BACKEND", "triton")
            tri = m(x).float()
    finally:
        remove_lora(m)
    assert m.branch()[0] is None or m.branch()[0].shape[1] % 16 == 0
    torch.testing.assert_close(tri, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
