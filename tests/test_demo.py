"""`lowbit demo --tiny` on CPU: the table's rows and the ordering of the errors (no timing asserts)."""
import math
import os
import re

import pytest

from comfyui_lowbit import cli
from comfyui_lowbit.cli import demo



@pytest.fixture(scope="module")
def demo_output():
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["demo", "--tiny", "--device", "cpu"]) == 0
    return buf.getvalue()


def _rows(text):
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| (.+?) \| ([\d.]+) \| ([\d.]+)x \| ([\d.]+) \| ([\d.]+) \|$", line)
        if m:
            rows[m.group(1)] = dict(mb=float(m.group(2)), ratio=float(m.group(3)), err=float(m.group(4)), ms=float(m.group(5)))
    return rows


def test_table_rows_and_errors(demo_output):
    rows = _rows(demo_output)
    assert list(rows) == [label for label, *_ in demo.VARIANTS]
    assert "kernels: reference" in demo_output and "hidden 256" in demo_output
    for r in rows.values():
        assert all(math.isfinite(v) and v >= 0 for v in r.values()) and r["ms"] > 0 and r["mb"] > 0
    bf16, w4, w4_0, t64, t0 = (rows[label] for label, *_ in demo.VARIANTS)
    assert bf16["err"] == 0 and bf16["ratio"] == 1
    assert 0 < w4["err"] < t0["err"] and w4["err"] < w4_0["err"] and t64["err"] < t0["err"]
    assert w4["err"] < 0.25
    assert all(r["ratio"] > 1.5 for r in (w4, w4_0, t64, t0))
    assert t0["mb"] < w4_0["mb"] < w4["mb"] < bf16["mb"]


def test_run_demo_result_and_calibrated_row():
    r = demo.run_demo(tiny=True, device="cpu", log=lambda m: None, calibrate=True)
    rows = {row["label"]: row for row in r["rows"]}
    assert [row["label"] for row in r["rows"]][:3] == ["BF16", "W4A4 r32", demo.CALIBRATED[0]]
    cal = rows[demo.CALIBRATED[0]]
    assert cal["format"] == "svdq_w4a4" and 0 < cal["rel_error"] < rows["W4A4 r0 (no low-rank)"]["rel_error"]
    assert demo.CALIBRATED[0] in demo.format_table(r) and "calibrated row" in demo.format_table(r)
    assert r["backend"] == "reference" and r["tokens"] == (64, 16)
    assert rows["W4A4 r32"]["format"] == "svdq_w4a4" and rows["ternary r64"]["rank"] == 64
    assert rows["W4A4 r32"]["quantize_s"] > 0 and rows["BF16"]["quantize_s"] is None


def test_comfyui_hook_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="not a ComfyUI checkout"):
        demo.run_workflow_headless(tmp_path)
    (tmp_path / "main.py").write_text("")
    with pytest.raises(FileNotFoundError, match="no such shipped workflow"):
        demo.run_workflow_headless(tmp_path, "nope.json")


def _fake_python(path, missing=""):
    """An executable that answers the module check like a Python lacking `missing` (comma-separated)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho '{missing}'\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.skipif(os.name != "posix", reason="fake interpreters are shell scripts")
@pytest.mark.parametrize("where", ["venv/bin/python", ".venv/bin/python", "../python_embeded/python.exe"])
def test_comfyui_python_is_found_in_the_install(tmp_path, where):
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    python = _fake_python(comfy / where)
    assert os.path.samefile(demo.find_comfyui_python(str(comfy)), python)


@pytest.mark.skipif(os.name != "posix", reason="fake interpreters are shell scripts")
def test_comfyui_python_errors_say_what_to_pass(tmp_path, capsys, monkeypatch):
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "main.py").write_text("")
    python = _fake_python(comfy / "venv" / "bin" / "python", missing="pytest")
    with pytest.raises(ValueError, match=r"lacks pytest.*-m pip install pytest"):
        demo.find_comfyui_python(str(comfy))
    _fake_python(comfy / "venv" / "bin" / "python", missing="aiohttp,yaml")
    with pytest.raises(ValueError, match=r"lacks aiohttp, yaml.*--comfyui-python"):
        demo.find_comfyui_python(str(comfy))
    os.remove(python)  # no venv: this Python, which has no ComfyUI requirements here unless it runs ComfyUI
    monkeypatch.setattr(demo, "NEEDED_MODULES", ("no_such_module_for_lowbit",))
    with pytest.raises(ValueError, match=r"this Python: no venv, .venv or python_embeded.*--comfyui-python"):
        demo.find_comfyui_python(str(comfy))
    # through the command: one line, before the (slow) table
    rc = cli.main(["demo", "--tiny", "--comfyui", str(comfy)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "--comfyui-python" in err, err
    rc = cli.main(["demo", "--tiny", "--comfyui", str(comfy), "--comfyui-python", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "no such program" in err, err


def test_failure_line_picks_the_error():
    log = "....\nE   ModuleNotFoundError: No module named 'x'\n\nFAILED tests/t.py::t - Module...\n1 failed\n"
    assert demo._failure_line(log) == "ModuleNotFoundError: No module named 'x'"
