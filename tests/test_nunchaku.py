"""Nunchaku SVDQuant INT4 FLUX import: layout inversion, BFL mapping, forward equivalence, CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import nunchaku_layout as nl
from tiny_models import TINY_FLUX_CONFIG, tiny_flux_state_dict

from comfyui_lowbit import checkpoint, cli
from comfyui_lowbit.kernels.reference import dequant_int4
from comfyui_lowbit.checkpoint import nunchaku
from comfyui_lowbit.quant_ops import SVDQW4A4Linear, W4A4Weights, module_from_packed

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def tiny():
    sd, nat, diff = nl.nunchaku_tiny_flux(seed=0, rank=16)
    tensors, layers, config = nunchaku.convert_state_dict(sd, nl.metadata(), source="tiny")
    return {"sd": sd, "nat": nat, "diff": diff, "tensors": tensors, "layers": layers, "config": config}


@pytest.fixture(scope="module")
def bfl():
    """The 16-bit BFL tiny FLUX the Nunchaku file's 16-bit parts come from (same seed)."""
    return tiny_flux_state_dict(0, naming="bfl")


@pytest.fixture(scope="module")
def nunchaku_file(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("nunchaku") / "svdq-int4_r16-flux.1-tiny.safetensors"
    save_file(tiny["sd"], str(path), metadata=nl.metadata())
    return str(path)


def _packed(tensors, layers, name):
    return checkpoint.packed_layers(tensors, checkpoint.CheckpointInfo("t", "flux", 1, {name: layers[name]}, None))[name]


# ---- layouts -------------------------------------------------------------------------------------------------

def test_layout_inversions_are_exact():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-8, 8, (384, 256), generator=g, dtype=torch.int8)
    assert torch.equal(nunchaku.unpack_w4a4_weight(nl.pack_qweight(q)), q)
    s = torch.rand(4, 384, generator=g).to(BF16)
    assert torch.equal(nunchaku.unpack_channels(nl.pack_channels(s), 384), s)
    v = torch.randn(256, generator=g).to(BF16)
    assert not torch.equal(nl.pack_channels(v), v)  # the order really changes
    assert torch.equal(nunchaku.unpack_channels(nl.pack_channels(v), 256), v)
    down, up = torch.randn(256, 32, generator=g).to(BF16), torch.randn(384, 32, generator=g).to(BF16)
    assert torch.equal(nunchaku.unpack_lowrank(nl.pack_lowrank(down, True), True), down)
    assert torch.equal(nunchaku.unpack_lowrank(nl.pack_lowrank(up, False), False), up)
    qu = torch.randint(0, 16, (96, 320), generator=g, dtype=torch.int16)
    packed = nl.pack_awq_qweight(qu)
    assert packed.shape == (24, 160) and packed.dtype == torch.int32
    assert torch.equal(nunchaku.unpack_awq_weight(packed), qu)


def test_layout_errors_name_the_tensor():
    with pytest.raises(ValueError, match="blk.qweight"):
        nunchaku.unpack_w4a4_weight(torch.zeros(100, 64, dtype=torch.int8), "blk.qweight")
    with pytest.raises(ValueError, match="lora_up"):
        nunchaku.unpack_lowrank(torch.zeros(128, 20, dtype=BF16), False, "lora_up")


# ---- conversion recovers every part --------------------------------------------------------------------------

def _check_layer(p: W4A4Weights, nat: dict):
    assert torch.equal(p.unpack(), nat["q"])
    for ours, theirs in (("wscales", "wscales"), ("smooth", "smooth"), ("bias", "bias"),
                         ("proj_down", "down"), ("proj_up", "up")):
        assert torch.equal(getattr(p, ours), nat[theirs]), ours


def test_double_blocks_recovered_exactly(tiny):
    t, layers, nat = tiny["tensors"], tiny["layers"], tiny["nat"]
    for i in range(TINY_FLUX_CONFIG["depth"]):
        for sub, (bfl, unsigned) in nunchaku._DOUBLE.items():
            name = f"double_blocks.{i}.{bfl}"
            p = _packed(t, layers, name)
            _check_layer(p, nat[f"transformer_blocks.{i}.{sub}"])
            assert p.act_unsigned == unsigned and p.act_unsigned_from == 0
            assert layers[name]["act_unsigned"] == bfl.endswith("mlp.2")
        for sub, bfl in nunchaku._DOUBLE_NORMS.items():
            assert torch.equal(t[f"double_blocks.{i}.{bfl}.scale"], tiny["diff"][f"transformer_blocks.{i}.attn.{sub}.weight"])


def test_single_blocks_recovered_exactly(tiny):
    t, layers, nat = tiny["tensors"], tiny["layers"], tiny["nat"]
    h = TINY_FLUX_CONFIG["hidden_size"]
    for i in range(TINY_FLUX_CONFIG["depth_single_blocks"]):
        p = f"single_transformer_blocks.{i}"
        qkv, fc1, out, fc2 = (nat[f"{p}.{s}"] for s in ("qkv_proj", "mlp_fc1", "out_proj", "mlp_fc2"))
        l1 = _packed(t, layers, f"single_blocks.{i}.linear1")
        assert (l1.out_features, l1.in_features, l1.rank) == (7 * h, h, 32)
        assert torch.equal(l1.unpack(), torch.cat([qkv["q"], fc1["q"]]))
        assert torch.equal(l1.wscales, torch.cat([qkv["wscales"], fc1["wscales"]], 1))
        assert torch.equal(l1.smooth, qkv["smooth"]) and torch.equal(l1.bias, torch.cat([qkv["bias"], fc1["bias"]]))
        assert torch.equal(l1.proj_down, torch.cat([qkv["down"], fc1["down"]], 1))
        assert torch.equal(l1.proj_up[: 3 * h, :16], qkv["up"]) and torch.equal(l1.proj_up[3 * h:, 16:], fc1["up"])
        assert not l1.proj_up[: 3 * h, 16:].any() and not l1.proj_up[3 * h:, :16].any()
        assert not l1.act_unsigned

        l2 = _packed(t, layers, f"single_blocks.{i}.linear2")
        assert (l2.out_features, l2.in_features, l2.rank) == (h, 5 * h, 32)
        assert l2.act_unsigned and l2.act_unsigned_from == h
        assert torch.equal(l2.unpack(), torch.cat([out["q"], fc2["q"]], 1))
        assert torch.equal(l2.wscales, torch.cat([out["wscales"], fc2["wscales"]]))
        assert torch.equal(l2.smooth, torch.cat([out["smooth"], fc2["smooth"]]))
        assert torch.equal(l2.bias, (out["bias"].float() + fc2["bias"].float()).to(BF16))
        assert torch.equal(l2.proj_up, torch.cat([out["up"], fc2["up"]], 1))
        assert torch.equal(l2.proj_down[:h, :16], out["down"]) and torch.equal(l2.proj_down[h:, 16:], fc2["down"])
        assert not l2.proj_down[:h, 16:].any() and not l2.proj_down[h:, :16].any()


def test_modulation_recovered_exactly(tiny):
    t, layers, nat = tiny["tensors"], tiny["layers"], tiny["nat"]
    pairs = [(f"double_blocks.{i}.{bfl}", f"transformer_blocks.{i}.{sub}", 6)
             for i in range(2) for sub, bfl in nunchaku._DOUBLE_MOD.items()]
    pairs += [(f"single_blocks.{i}.modulation.lin", f"single_transformer_blocks.{i}.norm.linear", 3) for i in range(2)]
    for name, src, splits in pairs:
        assert layers[name]["format"] == "w4a16"
        p = _packed(t, layers, name)
        w = dequant_int4(p.weight, p.wscales, p.wzeros)
        assert torch.equal(w, nl.awq_dequant(nat[src])), name
        assert torch.equal(p.bias, nl.awq_expected_bias(nat[src], splits)), name
        assert (p.bias.float() - nat[src]["bias"].float()).abs().max() <= 2 ** -8  # +1 / -1 in bf16 costs <= half an ulp of 1


def test_16bit_parts_and_config(tiny, bfl):
    t = tiny["tensors"]
    for k in ("img_in.weight", "txt_in.bias", "time_in.in_layer.weight", "vector_in.out_layer.weight",
              "guidance_in.in_layer.bias", "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight",
              "final_layer.adaLN_modulation.1.bias", "single_blocks.1.norm.key_norm.scale"):
        assert torch.equal(t[k], bfl[k]), k
    quantized = {f"{n}.{k}" for n, cfg in tiny["layers"].items() for k in ("weight", "bias")}
    assert set(bfl) - quantized <= set(t)
    assert tiny["config"] == {**TINY_FLUX_CONFIG, "mlp_ratio": 4.0}
    assert len(tiny["layers"]) == 2 * 10 + 2 * 3


def test_newer_tensor_names(tiny):
    new = {"lora_down": "proj_down", "lora_up": "proj_up", "smooth": "smooth_factor", "smooth_orig": "smooth_factor_orig"}
    sd = {}
    for k, v in tiny["sd"].items():
        layer, _, end = k.rpartition(".")
        sd[f"{layer}.{new.get(end, end)}"] = v
    assert any(k.endswith(".smooth_factor") for k in sd)
    tensors, layers, _ = nunchaku.convert_state_dict(sd, nl.metadata(), consume=True)
    assert not sd  # consume=True hands every source tensor over
    assert layers == tiny["layers"]
    assert all(torch.equal(tensors[k], v) for k, v in tiny["tensors"].items())


# ---- forward equivalence -------------------------------------------------------------------------------------

def _module(nat, unsigned=False):
    return SVDQW4A4Linear(W4A4Weights.pack(nat["q"], nat["wscales"], nat["smooth"], nat["down"], nat["up"],
                                           nat["bias"], act_unsigned=unsigned))


def test_linear1_equals_qkv_and_mlp_fc1(tiny):
    p = "single_transformer_blocks.0"
    conv = module_from_packed(_packed(tiny["tensors"], tiny["layers"], "single_blocks.0.linear1"))
    x = torch.randn(2, 24, 256, generator=torch.Generator().manual_seed(5)).to(BF16)
    ref = torch.cat([_module(tiny["nat"][f"{p}.qkv_proj"])(x), _module(tiny["nat"][f"{p}.mlp_fc1"])(x)], -1)
    torch.testing.assert_close(conv(x), ref, rtol=0, atol=0)


def test_linear2_equals_out_proj_plus_mlp_fc2(tiny):
    p = "single_transformer_blocks.1"
    conv = module_from_packed(_packed(tiny["tensors"], tiny["layers"], "single_blocks.1.linear2"))
    g = torch.Generator().manual_seed(6)
    attn = torch.randn(2, 24, 256, generator=g).to(BF16)
    act = torch.nn.functional.gelu(torch.randn(2, 24, 1024, generator=g), approximate="tanh").to(BF16)
    out, fc2 = _module(tiny["nat"][f"{p}.out_proj"]), _module(tiny["nat"][f"{p}.mlp_fc2"], unsigned=True)
    ref = out(attn.float()) + fc2(act.float())  # float32 outputs: no intermediate rounding
    got = conv(torch.cat([attn, act], -1))
    assert got.dtype == BF16
    torch.testing.assert_close(got.float(), ref, rtol=2 ** -7, atol=1e-3)
    # the GELU part really is quantized unsigned: signed quantization of it gives a different result
    signed = _module(tiny["nat"][f"{p}.mlp_fc2"])(act.float())
    assert (fc2(act.float()) - signed).abs().max() > 1e-3


def test_mixed_signedness_validation():
    g = torch.Generator().manual_seed(0)
    nat = nl.random_w4a4(g, 128, 256, 16)
    args = (nat["q"], nat["wscales"], nat["smooth"])
    with pytest.raises(ValueError, match="act_unsigned_from"):
        W4A4Weights.pack(*args, act_unsigned=False, act_unsigned_from=128)
    with pytest.raises(ValueError, match="act_unsigned_from"):
        W4A4Weights.pack(*args, act_unsigned=True, act_unsigned_from=96)
    p = W4A4Weights.pack(*args, act_unsigned=True, act_unsigned_from=128)
    assert p.config()["act_unsigned_from"] == 128
    m = SVDQW4A4Linear(p)
    comp = m.float_bias()  # only the unsigned channels carry the shift compensation
    expected = 0.171875 * m._residual()[:, 128:].sum(1)
    torch.testing.assert_close(comp, expected)


class _Cat(torch.nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], -1)


class _Sum(torch.nn.Module):
    """Nunchaku's single-block output: out_proj(attention) + mlp_fc2(GELU output)."""

    def __init__(self, a, b, k):
        super().__init__()
        self.a, self.b, self.k = a, b, k

    def forward(self, x):
        return (self.a(x[..., : self.k].float()) + self.b(x[..., self.k:].float())).to(x.dtype)


class _Dense(torch.nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        return (x.float() @ self.w.float().t() + self.b.float()).to(x.dtype)


def test_converted_model_matches_nunchaku_structured_model(tiny, bfl):
    from comfyui_lowbit import flux_model

    nat, cfg = tiny["nat"], tiny["config"]
    conv = flux_model.flux_from_state_dict(tiny["tensors"], cfg, tiny["layers"])
    ref = flux_model.flux_from_state_dict(bfl)
    for i in range(cfg["depth"]):
        p = f"transformer_blocks.{i}"
        for sub, (bfl, unsigned) in nunchaku._DOUBLE.items():
            flux_model.set_module(ref, f"double_blocks.{i}.{bfl}", _module(nat[f"{p}.{sub}"], unsigned))
        for sub, bfl in nunchaku._DOUBLE_MOD.items():
            flux_model.set_module(ref, f"double_blocks.{i}.{bfl}",
                                  _Dense(nl.awq_dequant(nat[f"{p}.{sub}"]), nl.awq_expected_bias(nat[f"{p}.{sub}"], 6)))
    for i in range(cfg["depth_single_blocks"]):
        p = f"single_transformer_blocks.{i}"
        ref.single_blocks[i].linear1 = _Cat(_module(nat[f"{p}.qkv_proj"]), _module(nat[f"{p}.mlp_fc1"]))
        ref.single_blocks[i].linear2 = _Sum(_module(nat[f"{p}.out_proj"]), _module(nat[f"{p}.mlp_fc2"], True), 256)
        ref.single_blocks[i].modulation.lin = _Dense(nl.awq_dequant(nat[f"{p}.norm.linear"]),
                                                     nl.awq_expected_bias(nat[f"{p}.norm.linear"], 3))
    inputs = flux_model.make_inputs(cfg, height=6, width=6, txt_len=8, seed=1)
    with torch.no_grad():
        a, b = conv(**inputs).float(), ref(**inputs).float()
    assert torch.isfinite(a).all() and a.abs().max() > 0
    rel = (a - b).norm() / b.norm()
    print(f"converted vs Nunchaku-structured model: relative difference {rel:.2e}")
    assert rel < 2e-2, f"relative difference {rel:.4f}"


# ---- files, loader hook, CLI ---------------------------------------------------------------------------------

def test_is_nunchaku(tmp_path, nunchaku_file):
    assert nunchaku.is_nunchaku(nunchaku_file)
    assert nunchaku.is_nunchaku(nl.metadata())
    plain = _write(tmp_path, "plain.safetensors", {"img_in.weight": torch.zeros(256, 64, dtype=BF16)})
    assert not nunchaku.is_nunchaku(plain)
    assert not nunchaku.is_nunchaku(str(tmp_path / "missing.safetensors"))


def test_load_nunchaku_matches_convert(nunchaku_file, tiny):
    sd, info = nunchaku.load_nunchaku(nunchaku_file)
    assert info.model == "flux" and info.layers == tiny["layers"] and info.config == tiny["config"]
    assert sd.keys() == tiny["tensors"].keys()
    checkpoint.packed_layers(sd, info)  # validates every layer


def test_cli_convert(tmp_path, nunchaku_file, tiny, capsys):
    out = str(tmp_path / "converted.safetensors")
    assert cli.main(["convert-nunchaku", nunchaku_file, out]) == 0
    assert "26 " not in capsys.readouterr().err
    sd, info = checkpoint.load_checkpoint(out)
    assert info.layers == tiny["layers"] and info.config == tiny["config"]
    assert info.metadata["lowbit.source"].startswith("nunchaku:")
    assert all(torch.equal(sd[k], v) for k, v in tiny["tensors"].items())
    assert cli.main(["convert-nunchaku", nunchaku_file, out]) == 1
    assert "exists" in capsys.readouterr().err
    assert cli.main(["convert-nunchaku", nunchaku_file, out, "--force"]) == 0
    assert [f for f in os.listdir(tmp_path) if f.startswith(".lowbit-")] == []


def _write(tmp_path, name, sd, meta=None):
    path = str(tmp_path / name)
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=meta)
    return path


@pytest.mark.parametrize("case, expected", [
    ("fp4", "NVFP4"),
    ("qwen", "NunchakuQwenImage"),
    ("legacy", "legacy folder"),
    ("plain", "not a Nunchaku checkpoint"),
    ("folder", "folder"),
])
def test_cli_unsupported_inputs(tmp_path, tiny, capsys, case, expected):
    sd = tiny["sd"]
    if case == "fp4":
        path = _write(tmp_path, "svdq-fp4.safetensors", sd, nl.metadata(weight_dtype="fp4_e2m1_all"))
    elif case == "qwen":
        path = _write(tmp_path, "q.safetensors", sd, nl.metadata(model_class="NunchakuQwenImageTransformer2DModel"))
    elif case == "legacy":
        path = _write(tmp_path, "transformer_blocks.safetensors",
                      {k: v for k, v in sd.items() if k.startswith(nunchaku.BLOCK_PREFIXES)})
    elif case == "plain":
        path = _write(tmp_path, "plain.safetensors", {"img_in.weight": torch.zeros(256, 64, dtype=BF16)})
    else:
        path = str(tmp_path / "svdq-int4-flux.1-dev")
        os.makedirs(path)
        _write(tmp_path / "svdq-int4-flux.1-dev", "transformer_blocks.safetensors", {"x": torch.zeros(1)})
    out = str(tmp_path / "out.safetensors")
    assert cli.main(["convert-nunchaku", path, out]) == 1
    err = capsys.readouterr().err
    assert expected in err and "supported" in err.lower(), err
    assert not os.path.exists(out)


def test_inconsistent_files_are_named(tiny):
    sd = dict(tiny["sd"])
    del sd["transformer_blocks.1.mlp_fc2.wscales"]
    with pytest.raises(ValueError, match="transformer_blocks.1.mlp_fc2.wscales"):
        nunchaku.convert_state_dict(sd, nl.metadata(), source="f.safetensors")
    sd = dict(tiny["sd"])
    sd["single_transformer_blocks.0.mlp_fc1.smooth"] = sd["single_transformer_blocks.0.mlp_fc1.smooth"] * 2
    with pytest.raises(nunchaku.UnsupportedNunchaku, match="different smoothing"):
        nunchaku.convert_state_dict(sd, nl.metadata())
    sd = dict(tiny["sd"], **{"transformer_blocks.0.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="no FLUX counterpart"):
        nunchaku.convert_state_dict(sd, nl.metadata())
    meta = dict(nl.metadata())
    meta["config"] = json.dumps({**json.loads(meta["config"]), "num_layers": 19})
    with pytest.raises(ValueError, match="depth config 19"):
        nunchaku.convert_state_dict(tiny["sd"], meta)


@pytest.mark.parametrize("case, expected", [
    ("nan-scales", ["double_blocks.0.img_attn.qkv.wscales", "NaN"]),
    ("inf-norm", ["double_blocks.1.img_attn.norm.query_norm.scale", "infinite"]),
    ("missing-16bit", ["img_in.bias", "missing"]),
    ("misshaped-16bit", ["final_layer.linear.weight", "shape (64, 128)"]),
])
def test_cli_convert_validates_like_a_lowbit_file(tmp_path, tiny, capsys, case, expected):
    """The converted tensors go through the lowbit validation (validate.py) before anything is written."""
    sd = dict(tiny["sd"])
    if case == "nan-scales":
        sd["transformer_blocks.0.qkv_proj.wscales"] = sd["transformer_blocks.0.qkv_proj.wscales"].clone()
        sd["transformer_blocks.0.qkv_proj.wscales"][0, 0] = float("nan")
    elif case == "inf-norm":
        sd["transformer_blocks.1.norm_q.weight"] = sd["transformer_blocks.1.norm_q.weight"].clone()
        sd["transformer_blocks.1.norm_q.weight"][3] = float("inf")
    elif case == "missing-16bit":
        del sd["x_embedder.bias"]
    else:
        sd["proj_out.weight"] = sd["proj_out.weight"][:, :128].contiguous()
    path = _write(tmp_path, f"{case}.safetensors", sd, nl.metadata())
    out = str(tmp_path / "out.safetensors")
    assert cli.main(["convert-nunchaku", path, out]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{case}.safetensors" in err, err
    for e in expected:
        assert e in err, (e, err)
    assert not os.path.exists(out)


def test_mixed_signedness_on_the_triton_backend(tiny):
    """linear2's split quantization runs through whichever kernels are dispatched (Triton interpreted on CPU)."""
    from comfyui_lowbit import kernels

    if not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    conv = module_from_packed(_packed(tiny["tensors"], tiny["layers"], "single_blocks.0.linear2"))
    g = torch.Generator().manual_seed(7)
    x = torch.cat([torch.randn(4, 256, generator=g),
                   torch.nn.functional.gelu(torch.randn(4, 1024, generator=g), approximate="tanh")], -1).to(BF16)
    kernels.set_backend("reference")
    try:
        ref = conv(x)
        kernels.set_backend("triton")
        try:
            got = conv(x)
        except RuntimeError as e:
            if "cannot load" in str(e):
                pytest.skip(str(e))
            raise
    finally:
        kernels.set_backend(None)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=1e-3)


def test_inspect_points_to_convert_nunchaku(nunchaku_file, capsys):
    assert cli.main(["inspect", nunchaku_file]) == 1
    assert "lowbit convert-nunchaku" in capsys.readouterr().err


# ---- the FLUX.1 family Nunchaku ships (Fill / Depth / Canny / Kontext / Krea) ------------------------------------

@pytest.mark.parametrize("variant", sorted(nl.VARIANTS))
def test_every_nunchaku_flux1_variant_converts(tmp_path, capsys, variant):
    """svdq-int4_r32-flux.1-{fill,depth,canny,kontext,krea}-dev files share dev's block layout; Fill / Depth / Canny
    have a wider x_embedder and a narrower proj_out. Converted: the config says so and the 16-bit parts are the
    source's, through the CLI too."""
    cfg = {**TINY_FLUX_CONFIG, **nl.VARIANTS[variant]}
    sd, _, _ = nl.nunchaku_tiny_flux(seed=3, rank=16, config=cfg)
    bfl = tiny_flux_state_dict(3, config=cfg)
    path = _write(tmp_path, f"svdq-int4_r16-flux.1-{variant}.safetensors", sd, nl.metadata(cfg))
    out = str(tmp_path / "out.safetensors")
    assert cli.main(["convert-nunchaku", path, out]) == 0
    assert "warning" not in capsys.readouterr().err
    tensors, info = checkpoint.load_checkpoint(out)
    assert info.config == {**cfg, "mlp_ratio": 4.0} and len(info.layers) == 26
    for k in ("img_in.weight", "img_in.bias", "final_layer.linear.weight", "final_layer.linear.bias"):
        assert torch.equal(tensors[k], bfl[k]), (variant, k)
    assert tensors["img_in.weight"].shape[1] == cfg["in_channels"]
    assert tensors["final_layer.linear.weight"].shape[0] == cfg.get("out_channels", cfg["in_channels"])


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]"])
def test_unreadable_config_metadata_is_ignored_with_one_warning(tmp_path, tiny, capsys, caplog, bad):
    """The `config` metadata only cross-checks the tensors: a file whose config is not a JSON object still converts
    and loads (same result), with one warning line naming the file and what was ignored."""
    meta = dict(nl.metadata(), config=bad)
    path = _write(tmp_path, "broken-config.safetensors", tiny["sd"], meta)
    out = str(tmp_path / "out.safetensors")
    run = subprocess.run([sys.executable, "-m", "comfyui_lowbit.cli", "convert-nunchaku", path, out],
                         capture_output=True, text=True, timeout=300)
    err = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 0 and len(err) == 1, run.stderr
    assert "broken-config.safetensors" in err[0] and "'config' metadata" in err[0] and "ignored" in err[0], err
    assert err[0].startswith("lowbit convert-nunchaku: warning:")
    sd, info = checkpoint.load_checkpoint(out)
    assert info.layers == tiny["layers"] and all(torch.equal(sd[k], v) for k, v in tiny["tensors"].items())
    caplog.clear()
    with caplog.at_level("WARNING", logger="comfyui_lowbit"):
        loaded, _ = nunchaku.load_nunchaku(path)  # what the loader node calls
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "'config' metadata" in warnings[0].getMessage()
    assert loaded.keys() == tiny["tensors"].keys()


def test_quantization_config_that_is_not_an_object_is_named(tmp_path, tiny, capsys):
    path = _write(tmp_path, "q.safetensors", tiny["sd"], dict(nl.metadata(), quantization_config='"svdquant"'))
    assert cli.main(["convert-nunchaku", path, str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quantization_config" in err and "q.safetensors" in err, err
