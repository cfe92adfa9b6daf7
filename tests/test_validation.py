"""Every file is checked before it is trusted and every command fails fast in one line: malformed lowbit
checkpoints (tests/malformed.py) through `lowbit inspect` and load_checkpoint, the output checks `lowbit
quantize` makes before its first layer, Ctrl-C, and usage errors."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from malformed import ALL, FLUX2_CASES, T5_CASES, TE_CASES, write_case
from tiny_models import TINY_MISTRAL_CONFIG, write_tiny_flux, write_tiny_flux2, write_tiny_lowbit_llm, write_tiny_lowbit_t5

from comfyui_lowbit import checkpoint, cli
from comfyui_lowbit.checkpoint import convert, lowbit_file


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("valid")
    src = write_tiny_flux(d / "tiny_flux.safetensors", vec_in_dim=64)
    lowbit = str(d / "tiny_w4a4.safetensors")
    checkpoint.quantize_file(src, lowbit, "svdq_w4a4", rank=16, options={"iters": 1})
    flux2 = str(d / "tiny_flux2_w4a4.safetensors")
    checkpoint.quantize_file(write_tiny_flux2(d / "tiny_flux2.safetensors"), flux2, "svdq_w4a4", rank=16,
                             options={"iters": 1})
    te = write_tiny_lowbit_llm(d / "tiny_te_w4a16.safetensors", {**TINY_MISTRAL_CONFIG, "num_hidden_layers": 2})
    return {"src": src, "lowbit": lowbit, "t5": write_tiny_lowbit_t5(d / "tiny_t5_w4a16.safetensors"),
            "flux2": flux2, "te": te}


def _source(case):
    return "t5" if case in T5_CASES else "flux2" if case in FLUX2_CASES else "te" if case in TE_CASES else "lowbit"


def _one_line_error(capsys, argv, *expect, rc=1):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().split("\r")[-1]  # after any cleared progress bar
    assert code == rc and len(err.splitlines()) == 1, (code, err)
    assert "Traceback" not in err
    for e in expect:
        assert e in err, (e, err)
    return err


@pytest.mark.parametrize("case", ALL + sorted(T5_CASES) + sorted(FLUX2_CASES) + sorted(TE_CASES))
def test_inspect_names_the_damage_in_one_line(tmp_path, files, capsys, case):
    bad = tmp_path / f"{case}.safetensors"
    expected = write_case(case, files[_source(case)], bad)
    _one_line_error(capsys, ["inspect", str(bad)], f"{case}.safetensors", *expected)
    with pytest.raises(checkpoint.CheckpointError):  # a plain ValueError subclass
        checkpoint.load_checkpoint(str(bad))


def test_valid_file_passes_and_error_class_reads_well(files, capsys):
    assert cli.main(["inspect", files["lowbit"]]) == 0
    sd, info = checkpoint.load_checkpoint(files["lowbit"])
    assert info.model == "flux" and len(info.layers) == 2 * 8 + 2 * 2 + 6
    # ComfyUI's error report shows `module.qualname` of the class; the module must not be a file path
    for cls in (checkpoint.CheckpointError, checkpoint.NotALowbitCheckpoint, checkpoint.nunchaku.UnsupportedNunchaku):
        assert issubclass(cls, ValueError) and cls.__module__ == "comfyui_lowbit", cls


def test_inspect_a_folder_or_a_missing_file(tmp_path, capsys):
    _one_line_error(capsys, ["inspect", str(tmp_path)], str(tmp_path), "is a folder")
    _one_line_error(capsys, ["inspect", str(tmp_path / "absent.safetensors")], "absent.safetensors", "no such file")


@pytest.fixture
def no_layer_work(monkeypatch):
    """Fails the test if quantization reaches its first layer."""
    def forbidden(*a, **k):
        raise AssertionError("a layer was quantized before the output was checked")
    monkeypatch.setattr(convert, "quantize_weight", forbidden)


def _read_only_folder(tmp_path):
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return str(d)
    return "/sys"  # root writes through permission bits; sysfs refuses new files even to root


def test_quantize_checks_the_output_before_the_first_layer(tmp_path, files, capsys, no_layer_work):
    src = files["src"]
    q = ["quantize", src]
    fmt = ["--format", "svdq_w4a4"]
    _one_line_error(capsys, q + [str(tmp_path)] + fmt, "is a folder")
    _one_line_error(capsys, q + [str(tmp_path / "nope" / "out.safetensors")] + fmt, "folder", "does not exist")
    _one_line_error(capsys, q + [os.path.join(_read_only_folder(tmp_path), "out.safetensors")] + fmt,
                    "cannot write to the output folder")
    _one_line_error(capsys, q + [src, "--force"] + fmt, "overwrite the input")
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep")
    _one_line_error(capsys, q + [str(existing)] + fmt, "exists", "--force")
    assert existing.read_bytes() == b"keep"
    _one_line_error(capsys, ["quantize", files["lowbit"], str(tmp_path / "again.safetensors")] + fmt,
                    "is already a lowbit 'flux' checkpoint")
    _one_line_error(capsys, q + [str(tmp_path / "o.safetensors"), "--device", "cpux"] + fmt,
                    "--device", "'cpux' is not a device", rc=2)
    if not torch.cuda.is_available():
        _one_line_error(capsys, q + [str(tmp_path / "o.safetensors"), "--device", "cuda"] + fmt,
                        "CUDA is not available", rc=2)
    _one_line_error(capsys, q + [str(tmp_path / "o.safetensors"), "--calib", str(tmp_path)] + fmt, "is a folder")
    _one_line_error(capsys, ["quantize", src], "required", "--format", rc=2)
    assert sorted(os.listdir(tmp_path)) == ["exists.safetensors"] + (["ro"] if os.geteuid() != 0 else [])


def test_quantize_checks_free_space_first(tmp_path, files, capsys, monkeypatch, no_layer_work):
    real = lowbit_file.shutil.disk_usage
    monkeypatch.setattr(lowbit_file.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    _one_line_error(capsys, ["quantize", files["src"], str(tmp_path / "o.safetensors"), "--format", "ternary"],
                    "needs about", "GB free")


def test_output_size_estimate_is_a_close_upper_bound(tmp_path, files):
    """The free-space check's estimate against real outputs (w4a16 made here: it takes a second)."""
    w4a16 = checkpoint.quantize_file(files["src"], tmp_path / "w4a16.safetensors", "w4a16")["dst"]
    model, plan, shapes, config, family = convert._plan(convert._Source(files["src"]))
    for path, fmt, rank in ((files["lowbit"], "svdq_w4a4", 16), (w4a16, "w4a16", 0)):
        estimate = convert._output_bytes(convert._units(plan), shapes, family.layer_format, fmt, rank, 64)
        actual = os.path.getsize(path)
        assert actual <= estimate < 1.15 * actual + (1 << 20), (fmt, actual, estimate)


def test_ctrl_c_exits_130_in_one_line_and_leaves_nothing(tmp_path, files, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    dst = str(out / "q.safetensors")
    calls = []
    real = convert.quantize_weight

    def interrupted_later(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(convert, "quantize_weight", interrupted_later)
    _one_line_error(capsys, ["quantize", files["src"], dst, "--format", "w4a16"], "interrupted", rc=130)
    assert os.listdir(out) == []
    monkeypatch.setattr(convert, "quantize_weight", real)

    def interrupted_write(tensors, path, metadata=None):  # half a file on disk, then Ctrl-C
        open(path, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(lowbit_file, "save_file", interrupted_write)
    _one_line_error(capsys, ["quantize", files["src"], dst, "--format", "w4a16"], "interrupted", rc=130)
    assert os.listdir(out) == []


def test_ctrl_c_inside_an_extension_still_reads_as_interrupted(tmp_path, files, capsys, monkeypatch):
    """A SIGINT that a C extension turns into another exception (safetensors reading into torch gave a TypeError
    once, reported as a truncated file) is an interruption: exit 130, not a complaint about the input."""
    out = tmp_path / "out"
    out.mkdir()

    def read_interrupted(self, f, file, key, device=None):
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            raise TypeError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None
        raise AssertionError("SIGINT did not interrupt")

    monkeypatch.setattr(convert._Source, "_read", read_interrupted)
    _one_line_error(capsys, ["quantize", files["src"], str(out / "q.safetensors"), "--format", "w4a16"],
                    "interrupted", rc=130)
    assert os.listdir(out) == []


def test_ctrl_c_signal_on_the_command(tmp_path, files):
    """A real SIGINT to `lowbit quantize` while it quantizes: exit code 130, one line, no file left."""
    out = tmp_path / "out"
    out.mkdir()
    code = ("import sys; from comfyui_lowbit import cli; sys.exit(cli.main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "quantize", files["src"], str(out / "q.safetensors"),
                             "--format", "svdq_w4a4", "--rank", "16"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,  # bytes: keep tqdm's \r
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    err = b""
    while time.monotonic() < deadline and proc.poll() is None:  # wait for the progress bar: quantizing
        err += proc.stderr.read(1)
        if b"layer" in err:
            break
    assert proc.poll() is None, err
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = (err + rest).decode()  # (on a terminal the line is cleared first; here the bar's text may precede it)
    assert proc.returncode == 130 and err.endswith("lowbit quantize: interrupted; no output was written\n"), repr(err)
    assert "Traceback" not in err and err.count("\n") <= 2, repr(err)
    assert os.listdir(out) == []


def test_unexpected_errors_are_one_line_too(capsys, monkeypatch):
    from comfyui_lowbit.cli import inspect as inspect_cmd

    def boom(args):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(inspect_cmd, "run_inspect", boom)  # add_parser binds it when main builds the parser
    monkeypatch.delenv("LOWBIT_DEBUG", raising=False)
    _one_line_error(capsys, ["inspect", "x"], "RuntimeError: something broke", "LOWBIT_DEBUG=1")
    monkeypatch.setenv("LOWBIT_DEBUG", "1")
    with pytest.raises(RuntimeError):
        cli.main(["inspect", "x"])
