"""scripts/gpu-check.sh --dry-run: every step of the GPU check runs at tiny size on the CPU and reports ok."""
import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "BUDGET")} | {"PYTHON": sys.executable}
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--dry-run", str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    log = (tmp_path / "gpu-check.log").read_text()
    rows = {r["step"]: r for r in csv.DictReader(open(tmp_path / "summary.tsv"), delimiter="\t")}
    assert list(rows) == ["env", "gpu-tests", "bench-layers", "bench-model", "bench-flux2", "kernel-timings",
                          "ceilings", "tune", "tune-fp8", "tune-weight-only", "tune-int8", "bench-flux2-dev"]
    if not (ROOT / "gpu_tools" / "gpu-ceilings.py").exists():  # git-ignored: absent in a fresh clone
        assert rows.pop("ceilings")["exit"] == "3" and "gpu_tools/gpu-ceilings.py missing" in log
    assert all(r["status"] == "ok" for r in rows.values()), (rows, log[-3000:])
    for name in ("bench.json", "model.json", "flux2.json", "flux2-dev.json", "cpu.json"):
        assert (tmp_path / name).stat().st_size > 0
    import json  # the int8 activation mode's rows: layers (both inner loops) and the whole model, and its tuning

    layers = {r["impl"] for r in json.load(open(tmp_path / "bench.json"))["layers"] if "ms" in r}
    assert {"w4a8i", "w4a8ip"} <= layers
    assert any(r["format"] == "svdq_w4a4_int8" and "ms" in r for r in json.load(open(tmp_path / "model.json"))["model"])
    assert "w4a8" in json.load(open(tmp_path / "cpu.json"))["kernels"]
    assert not (ROOT / "kernels" / "configs" / "cpu.json").exists()  # a dry run never writes the shipped tables
