"""The IR check: every shipped config of every Triton kernel compiled for sm_90 with the JIT's runtime
specialization (tests/ir_check.py, one subprocess per architecture without TRITON_INTERPRET) must meet the
properties ir_cases.py lists for it (known gaps are strict xfails with their reason); the FP8 kernels also on
sm_89 (Ada: FP8 mma.sync); sm_80 and gfx942 compile."""
import json
import os
import subprocess
import sys

import pytest

import ir_cases

_results = {}


def results(arch: str) -> dict:
    """{case name: counts} for arch, compiled once per test session."""
    if arch not in _results:
        pytest.importorskip("triton")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        script = os.path.join(os.path.dirname(__file__), "ir_check.py")
        p = subprocess.run([sys.executable, script, arch], env=env, capture_output=True, text=True, timeout=1800)
        if p.returncode == 3:
            pytest.skip(p.stdout.strip()[-300:])
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
        _results[arch] = {r["case"]: r for r in map(json.loads, p.stdout.splitlines())}
    return _results[arch]


SM90 = ir_cases.cases("sm90")
SM89 = ir_cases.cases("sm89")


@pytest.mark.parametrize("name", [c.name for c in SM90])
def test_sm90_compiles(name):
    r = results("sm90")[name]
    assert "error" not in r, r.get("error")


def _params(arch, cases):
    return [pytest.param(arch, c.name, p, id=f"{c.name}-{p}",
                         marks=[pytest.mark.xfail(reason=c.xfail[p], strict=True)] if p in c.xfail else [])
            for c in cases for p in c.checks]


@pytest.mark.parametrize("arch,name,prop", _params("sm90", SM90) + _params("sm89", SM89))
def test_property(arch, name, prop):
    r = results(arch)[name]
    assert "error" not in r, r.get("error")
    what, holds = ir_cases.PROPERTIES[prop]
    assert holds(r), f"{arch} {name}: expected {what}; got {r}"


@pytest.mark.parametrize("arch", ["sm80", "gfx942"])
def test_other_arch_compiles(arch):
    got = results(arch)
    assert set(got) == {c.name for c in ir_cases.cases(arch)}
    errors = {n: r["error"] for n, r in got.items() if "error" in r}
    assert not errors, errors
