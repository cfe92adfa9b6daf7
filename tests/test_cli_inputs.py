"""The last unclean inputs of the `lowbit` command's audit (issue 25): each answered by one line naming the flag,
file, key or layer, before the work starts where the answer is knowable then, and never a traceback."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import write_tiny_flux

from comfyui_lowbit import checkpoint, cli
from comfyui_lowbit.checkpoint import lowbit_file


def _one_line(capsys, argv, *expect, rc=1):
    got = cli.main(argv)
    err = capsys.readouterr().err.strip().split("\r")[-1]
    assert got == rc and len(err.splitlines()) == 1, (got, err)
    for e in expect:
        assert e in err, (e, err)
    return err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_flux(tmp_path_factory.mktemp("src") / "tiny_flux.safetensors")


# ---- Ctrl-C while the subcommands import torch ------------------------------------------------------------------

def test_ctrl_c_while_importing_is_one_line(monkeypatch, capsys):
    import importlib

    real = importlib.import_module

    def interrupted(name, package=None):
        if name == ".quantize":
            raise KeyboardInterrupt
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", interrupted)
    _one_line(capsys, ["quantize", "a", "b", "--format", "w4a16"], "lowbit: interrupted", rc=130)


@pytest.mark.parametrize("delay", [0.3, 0.8])
def test_ctrl_c_in_the_first_second_prints_no_traceback(tmp_path, delay):
    """A real SIGINT early in `python -m comfyui_lowbit.cli` (torch is importing then on this machine): exit 130
    (or the signal itself, when it lands before Python's handler exists) and no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "comfyui_lowbit.cli", "quantize", str(tmp_path / "a.safetensors"),
                             str(tmp_path / "b.safetensors"), "--format", "w4a16"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert proc.returncode in (130, -signal.SIGINT, 1), (proc.returncode, err)  # 1: it had already failed on a.safetensors
    assert len(err.strip().splitlines()) <= 1, err


# ---- bench arguments --------------------------------------------------------------------------------------------

BENCH = ["bench", "--small", "--device", "cpu", "--runs", "1", "--warmup", "0"]


@pytest.mark.parametrize("args, expect", [
    (["--m", "0"], ["--m", ">= 1", "got 0"]),
    (["--m", "-5"], ["--m", ">= 1", "got -5"]),
    (["--m", ","], ["--m", "empty"]),
    (["--rank", "-3"], ["--rank", ">= 0", "got -3"]),
    (["--no-layers", "--no-model"], ["--no-layers", "--no-model", "nothing to measure"]),
    (["--formats", ","], ["--formats", "empty"]),
    (["--runs", "0"], ["--runs", ">= 1"]),
])
def test_bench_refuses_arguments_that_measure_nothing(capsys, monkeypatch, args, expect):
    from comfyui_lowbit.cli import benchmark

    monkeypatch.setattr(benchmark, "run_bench", lambda **kw: pytest.fail("the run started"))
    _one_line(capsys, BENCH + args, *expect)


def test_bench_out_is_checked_before_the_run(tmp_path, capsys, monkeypatch):
    from comfyui_lowbit.cli import benchmark

    monkeypatch.setattr(benchmark, "run_bench", lambda **kw: pytest.fail("the run started"))
    afile = tmp_path / "results.txt"
    afile.write_text("keep")
    _one_line(capsys, BENCH + ["--out", str(afile)], "results.txt", "is a file, expected a folder")
    _one_line(capsys, BENCH + ["--out", str(afile / "sub")], "results.txt", "is a file")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "bench.json").write_text("{}")
    _one_line(capsys, BENCH + ["--out", str(tmp_path / "out")], "bench.json", "exists", "--force")
    os.mkfifo(tmp_path / "out" / "bench.md")
    _one_line(capsys, BENCH + ["--out", str(tmp_path / "out"), "--force"], "bench.md", "not a regular file")
    assert afile.read_text() == "keep"


# ---- demo arguments ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, flags", [(["--workflow", "flux1-dev-lowbit-lora.json"], ["--workflow"]),
                                         (["--comfyui-python", sys.executable], ["--comfyui-python"]),
                                         (["--workflow", "x.json", "--comfyui-python", "py"], ["--workflow", "--comfyui-python"])])
def test_demo_refuses_comfyui_options_without_comfyui(capsys, monkeypatch, args, flags):
    from comfyui_lowbit.cli import demo

    monkeypatch.setattr(demo, "run_demo", lambda **kw: pytest.fail("the demo ran"))
    _one_line(capsys, ["demo", "--tiny"] + args, *flags, "--comfyui PATH")


# ---- calibration files holding NaN ------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["double_blocks.1.img_attn.qkv.input_absmax", "single_blocks.1.linear2.input_sample",
                                 "block_input.0.img"])
def test_calibration_with_nan_is_named_before_the_first_layer(tmp_path, tiny, capsys, monkeypatch, key):
    """A NaN anywhere in the calibration file (ranges, samples, block inputs): one line naming the file and the key,
    before any layer is quantized (the quantizer never runs), not linalg's message after half the model."""
    from comfyui_lowbit.checkpoint import convert

    g = torch.Generator().manual_seed(0)
    stats = {"double_blocks.0.img_attn.qkv.input_absmax": torch.rand(256, generator=g) + 0.1,
             "double_blocks.1.img_attn.qkv.input_absmax": torch.rand(256, generator=g) + 0.1,
             "single_blocks.1.linear2.input_absmax": torch.rand(1280, generator=g) + 0.1,
             "single_blocks.1.linear2.input_sample": torch.randn(16, 1280, generator=g).to(torch.bfloat16),
             "block_input.0.img": torch.randn(1, 4, 256, generator=g)}
    stats[key] = stats[key].clone()
    stats[key].view(-1)[5] = float("nan")
    calib = str(tmp_path / "calib.safetensors")
    save_file(stats, calib, metadata={"lowbit.calib_version": "2"})
    monkeypatch.setattr(convert, "quantize_weight", lambda *a, **k: pytest.fail("a layer was quantized"))
    out = tmp_path / "q.safetensors"
    _one_line(capsys, ["quantize", tiny, str(out), "--format", "ternary", "--rank", "8", "--calib", calib],
              "calib.safetensors", key, "NaN")
    assert not out.exists()


def test_calibration_recorded_on_another_model_is_named_before_the_first_layer(tmp_path, tiny, capsys):
    calib = str(tmp_path / "calib.safetensors")
    save_file({"single_blocks.1.linear2.input_absmax": torch.ones(640)}, calib, metadata={"lowbit.calib_version": "1"})
    _one_line(capsys, ["quantize", tiny, str(tmp_path / "q.safetensors"), "--format", "ternary", "--calib", calib],
              "single_blocks.1.linear2.input_absmax", "640 channels, expected 1280")


# ---- a disk that fills during the final write -------------------------------------------------------------------

class _SafetensorError(Exception):
    """What safetensors' Rust writer raises: no file name, no errno."""


def _full_disk(tensors, path, *args, **kwargs):
    with open(path, "wb") as f:
        f.write(b"\0" * 1000)
    raise _SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_disk_full_during_the_final_write_names_the_file(tmp_path, tiny, capsys, monkeypatch):
    monkeypatch.setattr(lowbit_file, "save_file", _full_disk)
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"old")
    _one_line(capsys, ["quantize", tiny, str(out), "--format", "w4a16", "--force"], "q.safetensors", "the disk is full",
              "nothing was written")
    assert out.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["q.safetensors"]


def test_disk_full_while_saving_calibration_names_the_file(tmp_path, monkeypatch):
    from comfyui_lowbit.checkpoint import calibration

    monkeypatch.setattr(calibration, "save_file", _full_disk)
    path = str(tmp_path / "calib.safetensors")
    with pytest.raises(OSError, match=r"calib\.safetensors: writing it failed: the disk is full"):
        calibration.save_calibration(path, {"a.input_absmax": torch.ones(4)}, samples=1, tokens=0)
    assert os.listdir(tmp_path) == []


def test_a_real_full_disk_if_one_can_be_mounted(tmp_path, tiny):
    """With root (a tmpfs of 1 MB): safetensors' real ENOSPC error becomes the one line. Skipped elsewhere."""
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        sd, info = checkpoint.load_checkpoint(checkpoint.quantize_file(tiny, tmp_path / "q.safetensors", "w4a16")["dst"])
        with pytest.raises(OSError, match=r"out\.safetensors: writing it failed: the disk is full"):
            checkpoint.save_checkpoint(str(small / "out.safetensors"), sd, info.layers, "flux", info.config)
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


# ---- the README's formats table ---------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [64, 128])
def test_w4a16_files_hold_no_zero_points_as_the_readme_says(tmp_path, tiny, group):
    """`lowbit quantize` w4a16 layers store the packed int4 weight and one 16-bit scale per group: 4 + 16 / group bits
    per weight (4.25 at group 64), no `wzeros`; the README's formats table says so."""
    from pathlib import Path

    sd, info = checkpoint.load_checkpoint(
        checkpoint.quantize_file(tiny, tmp_path / "q.safetensors", "w4a16", group_size=group)["dst"])
    w4a16 = [n for n, cfg in info.layers.items() if cfg["format"] == "w4a16"]
    assert w4a16 and not any(k.endswith(".wzeros") for k in sd)
    for name in w4a16:
        n, k = info.layers[name]["out_features"], info.layers[name]["in_features"]
        bits = 8 * (sd[f"{name}.weight"].nbytes + sd[f"{name}.wscales"].nbytes) / (n * k)
        assert bits == 4 + 16 / group, (name, bits)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `w4a16` |"))
    assert "4.25 (g 64), 4.125 (g 128)" in row and "4.5 |" not in row
