"""flux_model: the pure-PyTorch FLUX transformer, loading, random models, whole-model quantization."""
import pytest
import torch
from tiny_models import TINY_FLUX_CONFIG, tiny_flux_state_dict, write_tiny_lowbit_flux

from comfyui_lowbit.checkpoint import flux
from comfyui_lowbit.flux_model import (
    apply_rope, flux_from_checkpoint, flux_from_state_dict, flux_state_dict, make_inputs, quantize_flux, quantize_fn,
    quantized_layers, random_flux, rope_angles, weight_bytes)

CFG = dict(TINY_FLUX_CONFIG)



def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def model16():
    return flux_from_state_dict(tiny_flux_state_dict(0), CFG)


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(CFG, height=4, width=6, txt_len=8, seed=3)


def test_state_dict_matches_bfl_layout(model16):
    shapes = {k: tuple(v.shape) for k, v in model16.state_dict().items()}
    assert shapes == {k: tuple(v) for k, v in flux.expected_shapes(CFG).items()}


def test_forward_shape_and_blocks_alone(model16, inputs):
    with torch.no_grad():
        out = model16(**inputs)
        assert out.shape == (1, 24, 64) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        h = CFG["hidden_size"]
        img, txt = torch.randn(1, 24, h, dtype=torch.bfloat16), torch.randn(1, 8, h, dtype=torch.bfloat16)
        vec = torch.randn(1, h, dtype=torch.bfloat16)
        pe = model16.rope(inputs["img_ids"], inputs["txt_ids"])
        img2, txt2 = model16.double_blocks[0](img, txt, vec, pe)
        x = model16.single_blocks[1](torch.cat([txt2, img2], 1), vec, pe)
    assert img2.shape == img.shape and txt2.shape == txt.shape and x.shape == (1, 32, h)


def test_rope_is_relative():
    """<rope(q, p1), rope(k, p2)> depends only on p1 - p2, axis by axis."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 128, generator=g), torch.randn(1, 1, 1, 128, generator=g)

    def dot(p1, p2):
        a1 = rope_angles(torch.tensor([[p1]], dtype=torch.float32), [16, 56, 56], 10000)[:, None]
        a2 = rope_angles(torch.tensor([[p2]], dtype=torch.float32), [16, 56, 56], 10000)[:, None]
        return (apply_rope(q, a1.cos(), a1.sin()) * apply_rope(k, a2.cos(), a2.sin())).sum().item()

    assert dot([0, 3, 5], [0, 1, 2]) == pytest.approx(dot([0, 12, 9], [0, 10, 6]), rel=1e-4)
    assert dot([0, 3, 5], [0, 1, 2]) != pytest.approx(dot([0, 3, 5], [0, 2, 2]), rel=1e-3)
    zero = rope_angles(torch.zeros(1, 1, 3), [16, 56, 56], 10000)[:, None]
    assert torch.equal(apply_rope(q, zero.cos(), zero.sin()), q)


def test_checkpoint_roundtrip(tmp_path, model16, inputs):
    path = write_tiny_lowbit_flux(tmp_path / "w4a4.safetensors", fmt="svdq_w4a4", rank=16)
    q = flux_from_checkpoint(str(path))
    layers = quantized_layers(q)
    for name, m in layers.items():
        assert m.fmt == flux.layer_format(name, "svdq_w4a4")
    assert len(layers) == CFG["depth"] * 10 + CFG["depth_single_blocks"] * 3
    assert layers["double_blocks.0.img_mlp.2"]._options["act_unsigned"]
    with torch.no_grad():
        ref, out = model16(**inputs), q(**inputs)
    assert torch.isfinite(out).all() and rel(out, ref) < 0.5
    assert weight_bytes(q) < 0.5 * weight_bytes(model16)
    tensors, meta_layers = flux_state_dict(q)
    assert set(meta_layers) == set(layers)
    assert flux_from_state_dict(tensors, CFG, meta_layers).state_dict().keys() == q.state_dict().keys()
    # a plain 16-bit file loads too (config from shapes)
    from safetensors.torch import save_file
    save_file(tiny_flux_state_dict(0), str(tmp_path / "plain.safetensors"))
    assert rel(flux_from_checkpoint(str(tmp_path / "plain.safetensors"))(**inputs), ref) == 0


def test_quantize_flux_formats_and_error(model16, inputs):
    sd = tiny_flux_state_dict(0)
    with torch.no_grad():
        ref = model16(**inputs)
        w4 = quantize_flux(flux_from_state_dict(sd, CFG), "svdq_w4a4", rank=16, iters=2)
        t0 = quantize_flux(flux_from_state_dict(sd, CFG), "ternary", rank=0)
        e_w4, e_t0 = rel(w4(**inputs), ref), rel(t0(**inputs), ref)
    assert {m.fmt for m in quantized_layers(w4).values()} == {"svdq_w4a4", "w4a16"}
    assert {m.fmt for m in quantized_layers(t0).values()} == {"ternary", "w4a16"}
    assert isinstance(w4.img_in, torch.nn.Linear) and isinstance(w4.final_layer.linear, torch.nn.Linear)
    assert e_w4 < e_t0 and e_w4 < 0.5


def test_random_flux_seeded_and_quantized_while_built(inputs):
    a, b = random_flux(CFG, seed=5), random_flux(CFG, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.img_in.weight, random_flux(CFG, seed=6).img_in.weight)
    seen = []
    q = random_flux(CFG, seed=5, quantize=quantize_fn("ternary", 16, reuse_per_shape=True, progress=seen.append, iters=1))
    assert len(seen) == len(quantized_layers(q)) == 26
    w0, w1 = q.double_blocks[0].img_attn.qkv.weight, q.double_blocks[1].img_attn.qkv.weight
    assert torch.equal(w0, w1) and w0.data_ptr() != w1.data_ptr()  # reused values, own storage
    assert not any(t.is_meta for t in q.state_dict().values())
    with torch.no_grad():
        assert torch.isfinite(q(**inputs)).all()


def test_bad_state_dict_errors():
    sd = tiny_flux_state_dict(0)
    del sd["double_blocks.1.txt_mlp.0.bias"]
    with pytest.raises(ValueError, match="double_blocks.1.txt_mlp.0.bias"):
        flux_from_state_dict(sd, CFG)
    sd = tiny_flux_state_dict(0)
    sd["double_blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="double_blocks.0.extra.weight"):
        flux_from_state_dict(sd, CFG)
    with pytest.raises(ValueError, match="nope.lin"):
        flux_from_state_dict(tiny_flux_state_dict(0), CFG, {"nope.lin": {"format": "w4a16"}})
