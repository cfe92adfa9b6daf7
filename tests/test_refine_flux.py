"""Block-wise refinement of a lowbit tiny FLUX: calibration with block inputs, quantize_file, refine in place; the
blocks' errors and the model's output error on other inputs go down, the codes stay, old files say why not."""
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import TINY_FLUX_CONFIG, write_tiny_flux

from comfyui_lowbit import checkpoint, cli
from comfyui_lowbit.flux_model import (calibrate_flux, flux_from_checkpoint, make_inputs, refine_flux_checkpoint)

CFG = {**TINY_FLUX_CONFIG, "depth": 1, "depth_single_blocks": 1}


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LOWBIT_BACKEND", "reference")


def _calls(seeds):
    return [make_inputs(CFG, batch=2, height=8, width=8, txt_len=8, seed=s) for s in seeds]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refine")
    src = write_tiny_flux(tmp / "flux16.safetensors", config=CFG)
    model = flux_from_checkpoint(src)
    tensors = calibrate_flux(model, _calls(range(4)), tokens=256, block_inputs=8)
    calib = checkpoint.save_calibration(str(tmp / "calib.safetensors"), tensors, samples=4, tokens=256)
    old = {k: v for k, v in tensors.items() if not k.startswith(checkpoint.BLOCK_INPUT)}
    calib_old = checkpoint.save_calibration(str(tmp / "calib_old.safetensors"), old, samples=4, tokens=256)
    return tmp, src, model, calib, calib_old


def _model_error(path, model16, calls):
    q = flux_from_checkpoint(path)
    with torch.no_grad():
        num = sum(((q(**kw).float() - model16(**kw).float()) ** 2).sum() for kw in calls)
        den = sum((model16(**kw).float() ** 2).sum() for kw in calls)
    return (num / den).sqrt().item()


def test_calibration_records_block_inputs(files):
    _, _, _, calib, calib_old = files
    f = checkpoint.CalibrationFile(calib)
    items = f.block_inputs()
    assert len(items) == 8 and f.block_input_count() == 8
    assert items[0]["img"].shape == (1, 64, 256) and items[0]["txt"].shape == (1, 8, 256)
    assert items[0]["vec"].shape == (1, 256) and items[0]["pe_cos"].shape == (1, 1, 72, 64)
    with pytest.raises(ValueError, match="holds no block inputs, so it cannot drive block-wise refinement"):
        checkpoint.CalibrationFile(calib_old).block_inputs()


@pytest.mark.parametrize("fmt,rank", [("ternary", 16), ("svdq_w4a4", 16)])
def test_refine_lowers_block_and_model_error(files, fmt, rank):
    tmp, src, model16, calib, _ = files
    dst = str(tmp / f"{fmt}.safetensors")
    checkpoint.quantize_file(src, dst, fmt, rank=rank, calib=calib, force=True,
                             options={"iters": 2, "search_iters": 1, "alphas": (0.25, 0.5), "act_fit": 20}
                             if fmt == "svdq_w4a4" else {"iters": 2})
    held = _calls([10, 11])
    before_sd = load_file(dst)
    before = _model_error(dst, model16, held)
    s = refine_flux_checkpoint(dst, src, calib, steps=40)
    after = _model_error(dst, model16, held)
    print(f"{fmt}: blocks {[(n, round(b, 4), round(a, 4)) for n, b, a in s['blocks']]}, model {before:.4f} -> {after:.4f}")
    assert [n for n, _, _ in s["blocks"]] == ["double_blocks.0", "single_blocks.0"]
    assert all(a <= b for _, b, a in s["blocks"]) and any(a < 0.95 * b for _, b, a in s["blocks"])
    if fmt == "ternary":  # W4A4's held-out model error moves by < 1% either way here (BENCHMARKS.md)
        assert after < before
    after_sd = load_file(dst)
    codes = [k for k in before_sd if k.endswith(".weight") and before_sd[k].dtype == torch.uint8]
    assert codes and all(torch.equal(before_sd[k], after_sd[k]) for k in codes)
    assert json.loads(checkpoint.read_info(dst).metadata["lowbit.refine"])["steps"] == 40


def test_cli_refine_and_old_calibration_refused(files, capsys):
    tmp, src, _, calib, calib_old = files
    dst = str(tmp / "cli.safetensors")
    # refused before any layer is quantized, in one line
    assert cli.main(["quantize", src, dst, "--format", "ternary", "--rank", "8", "--calib", calib_old, "--refine", "5"]) == 1
    assert "holds no block inputs" in capsys.readouterr().err
    assert not (tmp / "cli.safetensors").exists()
    assert cli.main(["quantize", src, dst, "--format", "ternary", "--rank", "8", "--calib", calib, "--refine", "5"]) == 0
    out = capsys.readouterr().out
    assert "block-wise refinement (5 steps" in out and "single_blocks.0" in out
