"""Checkpoint conversion (checkpoint.convert) and the `lowbit quantize` / `lowbit inspect` commands on tiny
seeded FLUX and T5 models: layer formats, per-layer error against the 16-bit original, input naming
variants, calibration files, and one-line errors that leave no output behind."""
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tiny_models import (FAST, TINY_FLUX_CONFIG, TINY_T5_CONFIG, tiny_clip_l_state_dict, tiny_flux_state_dict,
                         tiny_t5_state_dict, write_tiny_flux, write_tiny_t5)

from comfyui_lowbit import checkpoint, cli
from comfyui_lowbit.checkpoint import flux
from comfyui_lowbit.quant_ops import module_from_packed

# max relative output error of one quantized layer vs its 16-bit original (Gaussian / GELU inputs)
ERROR_BOUND = {"svdq_w4a4": 0.2, "w4a16": 0.25, "ternary": 0.5}
RANK = {"svdq_w4a4": 16, "ternary": 32, "w4a16": 0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_flux(tmp_path_factory.mktemp("src") / "tiny_flux.safetensors")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("lowbit")
    paths = {}
    for fmt in ("svdq_w4a4", "ternary", "w4a16"):
        paths[fmt] = str(out / f"tiny-{fmt}.safetensors")
        checkpoint.quantize_file(tiny, paths[fmt], fmt, rank=RANK[fmt], options=FAST)
    return paths


def _rel_err(module, w, b, name):
    x = torch.randn(48, w.shape[1], generator=torch.Generator().manual_seed(0))
    if name.endswith("_mlp.2"):
        x = F.gelu(x)
    y = x @ w.float().t() + b.float()
    yq = module(x.to(torch.bfloat16)).float()
    return ((yq - y).norm() / y.norm()).item()


def test_layer_format_follows_the_contract():
    names = {k.rpartition(".")[0] for k in flux.expected_shapes(TINY_FLUX_CONFIG)}
    fmts = {n: flux.layer_format(n, "ternary") for n in names}
    assert fmts["double_blocks.1.img_attn.qkv"] == fmts["double_blocks.0.txt_mlp.2"] == "ternary"
    assert fmts["single_blocks.1.linear1"] == fmts["single_blocks.0.linear2"] == "ternary"
    assert fmts["double_blocks.0.img_mod.lin"] == fmts["single_blocks.1.modulation.lin"] == "w4a16"
    for n in ("img_in", "txt_in", "time_in.in_layer", "guidance_in.out_layer", "vector_in.in_layer",
              "final_layer.linear", "final_layer.adaLN_modulation.1", "double_blocks.0.img_attn.norm.key_norm"):
        assert fmts[n] is None, n
    assert sum(f is not None for f in fmts.values()) == 2 * 2 * 5 + 2 * 3
    assert flux.layer_options("double_blocks.0.img_mlp.2", "svdq_w4a4") == {"act_unsigned": True}
    assert flux.layer_options("double_blocks.0.img_mlp.0", "svdq_w4a4") == {}
    assert flux.layer_options("double_blocks.0.img_mlp.2", "ternary") == {}


FILL = {"in_channels": 384, "out_channels": 64}  # FLUX.1 Fill: latent + masked-image latent + packed mask in, latent out
DEPTH = {"in_channels": 128, "out_channels": 64}  # FLUX.1 Depth / Canny: latent + control latent in


@pytest.mark.parametrize("overrides", [{}, {"guidance_embed": False}, {"qkv_bias": False, "depth": 1}, FILL, DEPTH])
def test_config_inferred_from_shapes(overrides):
    cfg = {**TINY_FLUX_CONFIG, **overrides}
    shapes = {k: tuple(v.shape) for k, v in tiny_flux_state_dict(**overrides).items()}
    assert flux.infer_config(shapes) == cfg


@pytest.mark.parametrize("fmt", ["svdq_w4a4", "ternary", "w4a16"])
def test_quantized_checkpoint_matches_original(quantized, fmt):
    sd16 = tiny_flux_state_dict()
    sd, info = checkpoint.load_checkpoint(quantized[fmt])
    assert info.model == "flux" and info.config == TINY_FLUX_CONFIG
    assert info.metadata["lowbit.source"] == "tiny_flux.safetensors"
    assert json.loads(info.metadata["lowbit.args"])["format"] == fmt
    expected = {n: f for n in {k.rpartition(".")[0] for k in sd16} if (f := flux.layer_format(n, fmt))}
    assert {n: c["format"] for n, c in info.layers.items()} == expected
    for name, packed in checkpoint.packed_layers(sd, info).items():
        err = _rel_err(module_from_packed(packed), sd16[f"{name}.weight"], sd16[f"{name}.bias"], name)
        assert err < ERROR_BOUND[info.layers[name]["format"]], (name, err)
        if info.layers[name]["format"] == "svdq_w4a4":
            assert packed.act_unsigned == name.endswith("_mlp.2")
            assert packed.rank == RANK[fmt]
        if info.layers[name]["format"] == "w4a16":
            assert packed.group_size == 64
    # everything else is kept exactly, in bf16, under its BFL name
    plain = [k for k in sd16 if k.rpartition(".")[0] not in info.layers]
    assert plain and all(sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], sd16[k]) for k in plain)
    assert os.path.getsize(quantized[fmt]) < 0.5 * sum(2 * t.numel() for t in sd16.values())


def _write(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def test_input_variants_give_the_same_checkpoint(tmp_path, tiny):
    """BFL, diffusers, prefixed and float32 inputs -> identical tensors; fp8 input within the error bound."""
    ref = checkpoint.quantize_file(tiny, tmp_path / "ref.safetensors", "w4a16")["dst"]
    sd_ref, _ = checkpoint.load_checkpoint(ref)
    variants = {
        "diffusers": write_tiny_flux(tmp_path / "d.safetensors", naming="diffusers"),
        "prefixed": write_tiny_flux(tmp_path / "p.safetensors", prefix="model.diffusion_model."),
        "fp32": _write({k: v.float() for k, v in tiny_flux_state_dict().items()}, tmp_path / "f32.safetensors"),
        "norm_weight": _write({k.replace("_norm.scale", "_norm.weight"): v for k, v in tiny_flux_state_dict().items()},
                              tmp_path / "nw.safetensors"),
    }
    for name, path in variants.items():
        sd, info = checkpoint.load_checkpoint(checkpoint.quantize_file(path, tmp_path / f"{name}-q.safetensors", "w4a16")["dst"])
        assert info.config == TINY_FLUX_CONFIG, name
        assert sorted(sd) == sorted(sd_ref), name
        for k in sd:
            assert torch.equal(sd[k], sd_ref[k]), (name, k)
    sd16 = tiny_flux_state_dict()
    fp8 = _write({k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in sd16.items()}, tmp_path / "fp8.safetensors")
    sd, info = checkpoint.load_checkpoint(checkpoint.quantize_file(fp8, tmp_path / "fp8-q.safetensors", "w4a16")["dst"])
    for name, packed in checkpoint.packed_layers(sd, info).items():
        assert _rel_err(module_from_packed(packed), sd16[f"{name}.weight"], sd16[f"{name}.bias"], name) < 0.25, name


@pytest.mark.parametrize("variant", [FILL, DEPTH], ids=["fill", "depth"])
def test_fill_and_depth_models_quantize(tmp_path, capsys, variant):
    """FLUX.1 Fill / Depth / Canny (a wider img_in, the final layer as wide as the plain latent) go through
    `lowbit quantize` from BFL and diffusers names; the file records out_channels and its shapes."""
    bfl = write_tiny_flux(tmp_path / "bfl.safetensors", **variant)
    diff = write_tiny_flux(tmp_path / "diff.safetensors", naming="diffusers", **variant)
    outs = []
    for src in (bfl, diff):
        outs.append(str(tmp_path / f"q-{os.path.basename(src)}"))
        assert cli.main(["quantize", src, outs[-1], "--format", "w4a16"]) == 0, capsys.readouterr().err
    (sd, info), (sd2, _) = checkpoint.load_checkpoint(outs[0]), checkpoint.load_checkpoint(outs[1])
    assert info.config == {**TINY_FLUX_CONFIG, **variant}
    assert sd["img_in.weight"].shape == (256, variant["in_channels"]) and sd["final_layer.linear.weight"].shape == (64, 256)
    assert sorted(sd) == sorted(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    w4 = checkpoint.quantize_file(bfl, tmp_path / "w4a4.safetensors", "svdq_w4a4", rank=16, options=FAST)
    assert w4["config"]["out_channels"] == 64 and w4["layer_counts"] == {"svdq_w4a4": 20, "w4a16": 6}


def test_scaled_fp8_input(tmp_path):
    """ComfyUI's scaled-fp8 files: fp8 weights times a per-tensor `<L>.scale_weight`."""
    sd16 = tiny_flux_state_dict()
    sd = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    for k, v in sd16.items():
        if v.dim() == 2:
            scale = v.float().abs().max() / 448
            sd[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            sd[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
        else:
            sd[k] = v
    out, _ = checkpoint.load_checkpoint(checkpoint.quantize_file(_write(sd, tmp_path / "fp8.safetensors"),
                                                              tmp_path / "q.safetensors", "w4a16")["dst"])
    assert not any("scale_weight" in k or k == "scaled_fp8" for k in out)
    w = out["img_in.weight"].float()
    assert ((w - sd16["img_in.weight"].float()).norm() / sd16["img_in.weight"].float().norm()).item() < 0.05


def test_sharded_diffusers_input(tmp_path, tiny):
    """A diffusers `transformer/` folder: shards + diffusion_pytorch_model.safetensors.index.json."""
    d = tiny_flux_state_dict(naming="diffusers")
    folder = tmp_path / "transformer"
    folder.mkdir()
    keys = sorted(d)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        _write({k: d[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ref, _ = checkpoint.load_checkpoint(checkpoint.quantize_file(tiny, tmp_path / "ref.safetensors", "w4a16")["dst"])
    for src in (folder, folder / "diffusion_pytorch_model.safetensors.index.json"):
        s = checkpoint.quantize_file(str(src), tmp_path / "q.safetensors", "w4a16", force=True)
        sd, _ = checkpoint.load_checkpoint(s["dst"])
        assert sorted(sd) == sorted(ref) and all(torch.equal(sd[k], ref[k]) for k in sd)
        assert s["input_bytes"] == sum(os.path.getsize(folder / f) for f in set(weight_map.values()))


def test_diffusers_final_norm_halves_are_swapped(tmp_path):
    d = tiny_flux_state_dict(naming="diffusers")
    bfl = tiny_flux_state_dict()
    h = TINY_FLUX_CONFIG["hidden_size"]
    assert torch.equal(d["norm_out.linear.weight"][:h], bfl["final_layer.adaLN_modulation.1.weight"][h:])
    sd, _ = checkpoint.load_checkpoint(checkpoint.quantize_file(_write(d, tmp_path / "d.safetensors"),
                                                             tmp_path / "q.safetensors", "w4a16")["dst"])
    assert torch.equal(sd["final_layer.adaLN_modulation.1.weight"], bfl["final_layer.adaLN_modulation.1.weight"])
    assert torch.equal(sd["single_blocks.1.linear1.bias"], bfl["single_blocks.1.linear1.bias"])


def test_calibration_file(tmp_path, tiny, caplog):
    sd16 = tiny_flux_state_dict()
    calibrated = ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear2"]
    stats = {}
    for name in calibrated:
        a = torch.rand(sd16[f"{name}.weight"].shape[1]) + 0.5
        a[[3, 50]] = 40.0  # outlier channels
        stats[f"{name}.input_absmax"] = a
    calib = str(tmp_path / "calib.safetensors")
    save_file(stats, calib, metadata={"lowbit.calib_version": "1", "lowbit.samples": "4"})
    seen = []
    with caplog.at_level(logging.WARNING, logger="comfyui_lowbit"):
        s = checkpoint.quantize_file(tiny, tmp_path / "c.safetensors", "svdq_w4a4", rank=8, calib=calib,
                                  progress=lambda d, t: seen.append((d, t)), options={"iters": 1, "search_iters": 1})
    assert seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == list(range(1, len(seen) + 1))
    assert len(s["calib_missing"]) == 20 - len(calibrated) and not set(calibrated) & set(s["calib_missing"])
    assert sum("quantized data-free" in r.getMessage() for r in caplog.records) == 1
    sd, info = checkpoint.load_checkpoint(s["dst"])
    layers = checkpoint.packed_layers(sd, info)
    assert not torch.all(layers[calibrated[0]].smooth == 1)
    assert torch.all(layers["double_blocks.1.img_attn.qkv"].smooth == 1)


def test_calibration_samples_cli_reports_held_out_errors(tmp_path, tiny, capsys):
    """A version 2 file (InputRecorder rows) drives the calibrated quantizer of the layers it covers; the
    summary prints their held-out output errors; --calib-tokens caps the rows used."""
    from comfyui_lowbit.quant_ops import InputRecorder

    sd16 = tiny_flux_state_dict()
    rec = InputRecorder(tokens=64)
    g = torch.Generator().manual_seed(0)
    names = ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear2"]
    for name in names:
        k = sd16[f"{name}.weight"].shape[1]
        rec.record(name, torch.randn(2, 60, 8, generator=g) @ torch.randn(8, k, generator=g) + 0.1 * torch.randn(2, 60, k, generator=g))
    calib = checkpoint.save_calibration(str(tmp_path / "calib2.safetensors"), rec.tensors(), samples=2, tokens=64)
    with pytest.raises(FileExistsError, match="never overwritten"):
        checkpoint.save_calibration(calib, rec.tensors(), samples=2, tokens=64)
    dst = str(tmp_path / "t.safetensors")
    assert cli.main(["quantize", tiny, dst, "--format", "ternary", "--rank", "0", "--calib", calib,
                     "--calib-tokens", "48"]) == 0
    out = capsys.readouterr().out
    assert "held-out calibration inputs" in out and all(n in out for n in names) and "2 layers" in out
    errs = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if line.strip().startswith(tuple(names))}
    assert set(errs) == set(names) and all(0 < e < 1 for e in errs.values()), errs
    assert json.loads(checkpoint.read_info(dst).metadata["lowbit.args"])["gptq"] is True
    f = checkpoint.CalibrationFile(calib, max_tokens=48)
    fit, held = f.sample(names[0], 256)
    assert fit.shape == (42, 256) and held.shape == (6, 256)
    with pytest.raises(ValueError, match=r"input_sample has shape \(64, 256\), expected \(tokens, 128\)"):
        checkpoint.CalibrationFile(calib).sample(names[0], 128)


def test_t5_quantize_and_inspect_cli(tmp_path, capsys):
    src = write_tiny_t5(tmp_path / "t5.safetensors")
    dst = str(tmp_path / "t5-w4a16.safetensors")
    assert cli.main(["quantize", src, dst, "--format", "w4a16", "--group-size", "128"]) == 0
    out, err = capsys.readouterr()
    assert "t5, 21 layers (14 w4a16, 7 16-bit)" in out and "21/21" in err  # summary and bar count the same layers
    sd, info = checkpoint.load_checkpoint(dst)
    assert info.model == "t5"
    assert {k: info.config[k] for k in TINY_T5_CONFIG} == TINY_T5_CONFIG
    sd16 = tiny_t5_state_dict()
    linears = {k[:-len(".weight")] for k in sd16 if ".SelfAttention." in k and "relative" not in k or ".DenseReluDense." in k}
    assert set(info.layers) == linears
    for name, packed in checkpoint.packed_layers(sd, info).items():
        assert packed.group_size == 128
        x = torch.randn(16, packed.in_features, generator=torch.Generator().manual_seed(0))
        y = x @ sd16[f"{name}.weight"].float().t()
        err = ((module_from_packed(packed)(x.bfloat16()).float() - y).norm() / y.norm()).item()
        assert err < ERROR_BOUND["w4a16"], (name, err)
    for k in ("shared.weight", "encoder.final_layer_norm.weight",
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"):
        assert torch.equal(sd[k], sd16[k])
    assert cli.main(["inspect", dst]) == 0
    out = capsys.readouterr().out
    assert "version 1, model t5" in out and "w4a16          14 layers" in out and "BF16 copy" in out


def test_clip_l(tmp_path, caplog):
    sd16 = tiny_clip_l_state_dict()
    with caplog.at_level(logging.WARNING, logger="comfyui_lowbit"):
        s = checkpoint.quantize_file(_write(sd16, tmp_path / "clip_l.safetensors"), tmp_path / "q.safetensors", "svdq_w4a4")
    assert any("weight-only (w4a16)" in r.getMessage() for r in caplog.records)
    sd, info = checkpoint.load_checkpoint(s["dst"])
    assert info.model == "clip_l" and info.format_counts() == {"w4a16": 12}
    assert torch.equal(sd["text_model.embeddings.position_ids"], sd16["text_model.embeddings.position_ids"])
    assert sd["text_projection.weight"].dtype == torch.bfloat16
    for name, packed in checkpoint.packed_layers(sd, info).items():
        err = _rel_err(module_from_packed(packed), sd16[f"{name}.weight"], sd16[f"{name}.bias"], name)
        assert err < ERROR_BOUND["w4a16"], (name, err)


def test_flux_cli_and_inspect(tmp_path, tiny, capsys):
    dst = str(tmp_path / "q.safetensors")
    assert cli.main(["quantize", tiny, dst, "--format", "w4a16"]) == 0
    out, err = capsys.readouterr()
    assert "flux, 48 layers (26 w4a16, 22 16-bit)" in out and "smaller" in out
    assert "48/48" in err  # tqdm progress: the same 48 layers (26 quantized + 22 kept in 16 bits)
    assert cli.main(["inspect", dst]) == 0
    out = capsys.readouterr().out
    assert "w4a16          26 layers" in out
    params = sum(t.numel() for t in tiny_flux_state_dict().values())
    assert f"parameters:      {params / 1e6:.2f} M" in out


def _one_line_error(capsys, argv, *expect):
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().split("\r")[-1]  # after any cleared progress bar
    assert rc == 1 and len(err.splitlines()) == 1, err
    for e in expect:
        assert e in err, (e, err)
    return err


def _no_output(folder, *keep):
    assert sorted(os.listdir(folder)) == sorted(keep)


def test_bad_inputs_give_one_line_errors_and_no_output(tmp_path, tiny, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dst = str(out / "q.safetensors")
    q = ["quantize"]
    with open(tmp_path / "corrupt.safetensors", "wb") as f:
        f.write(os.urandom(4096))
    _one_line_error(capsys, q + [str(tmp_path / "corrupt.safetensors"), dst, "--format", "w4a16"],
                    "corrupt.safetensors", "not a readable safetensors file")
    data = open(tiny, "rb").read()
    with open(tmp_path / "truncated.safetensors", "wb") as f:
        f.write(data[: len(data) // 2])
    _one_line_error(capsys, q + [str(tmp_path / "truncated.safetensors"), dst, "--format", "w4a16"], "truncated.safetensors")
    other = _write({"encoder.layers.0.weight": torch.zeros(4, 4)}, tmp_path / "other.safetensors")
    _one_line_error(capsys, q + [other, dst, "--format", "w4a16"], "other.safetensors", "neither a FLUX transformer")
    sd = tiny_flux_state_dict()
    sd["double_blocks.1.txt_attn.proj.weight"] = sd["double_blocks.1.txt_attn.proj.weight"][:, :128]
    bad = _write(sd, tmp_path / "shape.safetensors")
    _one_line_error(capsys, q + [bad, dst, "--format", "w4a16"], "double_blocks.1.txt_attn.proj.weight", "(256, 128)")
    sd = tiny_flux_state_dict()
    del sd["single_blocks.1.linear2.bias"]
    _one_line_error(capsys, q + [_write(sd, tmp_path / "missing.safetensors"), dst, "--format", "w4a16"],
                    "single_blocks.1.linear2.bias", "missing")
    sd = tiny_flux_state_dict()
    sd["single_blocks.1.linear2.weight"][3, 5] = float("nan")  # found only when that layer is reached
    _one_line_error(capsys, q + [_write(sd, tmp_path / "nan.safetensors"), dst, "--format", "w4a16"],
                    "single_blocks.1.linear2.weight", "NaN")
    _one_line_error(capsys, q + [str(tmp_path / "absent.safetensors"), dst, "--format", "w4a16"], "no such file")
    calib = _write({"double_blocks.0.img_attn.qkv.input_absmax": torch.ones(7)}, tmp_path / "calib.safetensors")
    _one_line_error(capsys, q + [tiny, dst, "--format", "w4a16", "--calib", calib], "not a lowbit calibration file")
    save_file({"double_blocks.0.img_attn.qkv.input_absmax": torch.ones(7)}, calib, metadata={"lowbit.calib_version": "1"})
    _one_line_error(capsys, q + [tiny, dst, "--format", "ternary", "--rank", "8", "--calib", calib],
                    "double_blocks.0.img_attn.qkv", "7 channels, expected 256")
    _no_output(out)
    _one_line_error(capsys, ["inspect", tiny], "tiny_flux.safetensors", "not a lowbit checkpoint")


def test_existing_output_needs_force(tmp_path, tiny, capsys):
    dst = tmp_path / "q.safetensors"
    dst.write_bytes(b"keep me")
    _one_line_error(capsys, ["quantize", tiny, str(dst), "--format", "w4a16"], "exists", "--force")
    assert dst.read_bytes() == b"keep me"
    _one_line_error(capsys, ["quantize", str(dst), str(dst), "--format", "w4a16", "--force"], "overwrite the input")
    assert dst.read_bytes() == b"keep me"
    assert cli.main(["quantize", tiny, str(dst), "--format", "w4a16", "--force"]) == 0
    assert checkpoint.read_info(str(dst)).model == "flux"
    _no_output(tmp_path, "q.safetensors")


def test_force_never_replaces_what_is_not_a_regular_file(tmp_path, tiny, capsys):
    """--force replaces a regular file (through a link: the link's target, the link stays); a device, a FIFO or a
    dangling link is refused before any work, in one line naming it, and stays what it was."""
    import stat

    specials = {"fifo": lambda p: os.mkfifo(p), "dangling": lambda p: os.symlink(tmp_path / "missing", p)}
    if hasattr(os, "mknod"):
        specials["device"] = lambda p: os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # what /dev/null is
    for name, make in specials.items():
        path = tmp_path / name
        try:
            make(path)
        except PermissionError:  # creating device nodes needs root (CAP_MKNOD)
            continue
        mode = os.lstat(path).st_mode
        _one_line_error(capsys, ["quantize", tiny, str(path), "--format", "w4a16", "--force"],
                        name, "not a regular file", "never replaces")
        assert os.lstat(path).st_mode == mode, name
    target = tmp_path / "target.safetensors"
    target.write_bytes(b"old")
    (tmp_path / "link.safetensors").symlink_to(target)
    assert cli.main(["quantize", tiny, str(tmp_path / "link.safetensors"), "--format", "w4a16", "--force"]) == 0
    assert (tmp_path / "link.safetensors").is_symlink() and checkpoint.read_info(str(target)).model == "flux"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".lowbit-")]


# max relative error of one block's output (same inputs) / the whole model's output
BLOCK_BOUND = {"svdq_w4a4": (0.35, 0.3), "ternary": (0.7, 0.55)}


@pytest.mark.parametrize("fmt", ["svdq_w4a4", "ternary"])
def test_block_outputs_match_original(quantized, fmt):
    """Every block of the quantized model, fed the 16-bit model's block inputs, stays close to the 16-bit
    block's output (pure-PyTorch FLUX of flux_model); so does the whole model's output."""
    flux_model = pytest.importorskip("comfyui_lowbit.flux_model")
    sd16 = tiny_flux_state_dict()
    ref = flux_model.flux_from_state_dict(sd16, TINY_FLUX_CONFIG)
    sd, info = checkpoint.load_checkpoint(quantized[fmt])
    q = flux_model.flux_from_state_dict(sd, info.config, layers=info.layers)
    kw = flux_model.make_inputs(TINY_FLUX_CONFIG, height=8, width=8, txt_len=8)
    block_bound, model_bound = BLOCK_BOUND[fmt]

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    with torch.no_grad():
        img, txt = ref.img_in(kw["img"]), ref.txt_in(kw["txt"])
        vec, pe = ref.embed_vec(kw["timesteps"], kw["y"], kw["guidance"]), ref.rope(kw["img_ids"], kw["txt_ids"])
        for i, (rb, qb) in enumerate(zip(ref.double_blocks, q.double_blocks)):
            (ri, rt), (qi, qt) = rb(img, txt, vec, pe), qb(img, txt, vec, pe)
            # compare the residual updates: the block's own contribution
            assert rel(qi - img, ri - img) < block_bound and rel(qt - txt, rt - txt) < block_bound, i
            img, txt = ri, rt
        x = torch.cat([txt, img], dim=1)
        for i, (rb, qb) in enumerate(zip(ref.single_blocks, q.single_blocks)):
            rx, qx = rb(x, vec, pe), qb(x, vec, pe)
            assert rel(qx - x, rx - x) < block_bound, i
            x = rx
        assert rel(q(**kw), ref(**kw)) < model_bound
