"""`lowbit bench --small` on CPU: the harness runs and writes well-formed JSON / Markdown (no timing asserts)."""
import json
import math

import pytest
import torch

from comfyui_lowbit import cli
from comfyui_lowbit.cli.benchmark import LAYER_FORMATS, MODEL_FORMATS, layer_shapes



def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert cli.main(["bench", "--small", "--device", "cpu", "--out", str(out)]) == 0
    return out


def test_json_structure(bench_out):
    r = json.loads((bench_out / "bench.json").read_text())
    assert r["small"] is True and r["env"]["device"] == "cpu" and r["env"]["torch"] == torch.__version__
    assert r["env"]["backend"] == "reference" and "triton" in r["env"] and r["notes"]
    shapes = layer_shapes(r["config"]["hidden_size"])
    impls = {"bf16", *LAYER_FORMATS}  # no fp8 on CPU
    keys = {(row["shape"], row["m"], row["impl"]) for row in r["layers"]}
    assert keys == {(s[0], m, i) for s in shapes for m in (1, 64) for i in impls}
    for row in r["layers"]:
        assert "error" not in row, row
        assert _positive(row["ms"]) and row["timing"] == "eager"  # CUDA graphs (M <= 64) only on CUDA
        if row["impl"] != "bf16":
            assert _positive(row["speedup_vs_bf16"]) and "speedup_vs_fp8" not in row
    assert set(r["geomean"]) == set(LAYER_FORMATS)
    for per_m in r["geomean"].values():
        assert set(per_m) == {"1", "64"} and all(_positive(d["vs_bf16"]) for d in per_m.values())
    model = {row["format"]: row for row in r["model"]}
    assert set(model) == set(MODEL_FORMATS)
    for fmt, row in model.items():
        assert "error" not in row, row
        assert _positive(row["ms"]) and _positive(row["weight_bytes"]) and _positive(row["latency_ratio_to_bf16"])
        assert row["peak_bytes"] is None  # not measured on CPU
    assert model["bf16"]["latency_ratio_to_bf16"] == 1.0
    assert model["ternary"]["weight_bytes"] < model["svdq_w4a4"]["weight_bytes"] < model["bf16"]["weight_bytes"]


def test_markdown(bench_out):
    md = (bench_out / "bench.md").read_text()
    assert md.startswith("# lowbit bench (--small)")
    assert "| layer | N | K | M | bf16 | w4a4 | w4a16 | ternary | ternary_int8 |" in md
    assert "| attn.qkv | 768 | 256 | 64 |" in md and "## Geometric mean speedup" in md
    assert "## Whole transformer" in md and "| svdq_w4a4 |" in md and "error" not in md


def test_flux2_rows_and_models(tmp_path):
    """--shapes / --models: FLUX.2 [dev] and [klein] 9B layer rows (SiLU-gated widths) with one geometric mean per
    model, FLUX.1's mean unchanged by them, and a FLUX.2-shaped whole transformer."""
    from comfyui_lowbit.cli.benchmark import SMALL_MODELS, flux2_layer_shapes

    assert cli.main(["bench", "--small", "--device", "cpu", "--out", str(tmp_path), "--shapes", "flux1,flux2-dev,flux2-klein-9b",
                     "--models", "flux2-klein-9b", "--formats", "w4a4,ternary", "--model-formats", "bf16,svdq_w4a4",
                     "--m", "1", "--runs", "1", "--warmup", "0"]) == 0
    r = json.loads((tmp_path / "bench.json").read_text())
    f2 = {(row["shape"], row["n"], row["k"]) for row in r["layers"] if row["shape"].startswith("f2k9b.")}
    assert f2 == {s[:3] for s in flux2_layer_shapes(256, 3.0, "f2k9b.")}
    assert ("f2k9b.mlp.0", 2 * 768, 256) in f2 and ("f2k9b.linear1", 3 * 256 + 2 * 768, 256) in f2
    assert set(r["geomean"]) == set(r["geomean_sets"]["flux2-dev"]) == set(r["geomean_sets"]["flux2-klein-9b"]) == {"w4a4", "ternary"}
    model = {row["format"]: row for row in r["model"]}
    assert set(model) == {"bf16", "svdq_w4a4"} and {row["model"] for row in r["model"]} == {"flux2-klein-9b"}
    assert "error" not in model["svdq_w4a4"] and model["svdq_w4a4"]["weight_bytes"] < model["bf16"]["weight_bytes"]
    assert r["model_configs"]["flux2-klein-9b"] == SMALL_MODELS["flux2-klein-9b"]
    md = (tmp_path / "bench.md").read_text()
    assert "over the flux2-klein-9b block shapes" in md and "## Whole transformer (flux2-klein-9b)" in md


def test_refuses_overwrite_and_full_run_on_cpu(bench_out, capsys):
    assert cli.main(["bench", "--small", "--device", "cpu", "--out", str(bench_out), "--no-model",
                     "--m", "1", "--formats", "w4a16", "--runs", "1", "--warmup", "0"]) == 1
    assert "exists" in capsys.readouterr().err
    assert cli.main(["bench", "--device", "cpu", "--no-model"]) == 1
    assert "--small" in capsys.readouterr().err


def test_fp8_rowwise_baseline_is_a_linear():
    """The FP8 baseline (GPU only in the benchmark) computes F.linear up to e4m3 rounding; M is padded."""
    import torch.nn.functional as F

    from comfyui_lowbit.cli.benchmark import _fp8_linear

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(64, 128, generator=g).bfloat16(), torch.randn(64, generator=g).bfloat16()
    x = torch.randn(5, 128, generator=g).bfloat16()
    try:
        y = _fp8_linear(w, b)(x)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._scaled_mm has no CPU FP8 support in this build ({e})")
    ref = F.linear(x, w, b).float()
    assert y.shape == (5, 64) and y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()).item() < 0.08


@pytest.mark.parametrize("fmt", LAYER_FORMATS)
def test_random_layers_have_flux_shapes(fmt):
    from comfyui_lowbit.cli.benchmark import random_layer

    m = random_layer(fmt, 192, 256, 32, torch.device("cpu"), unsigned=fmt == "w4a4")
    assert (m.out_features, m.in_features) == (192, 256)
    y = m(torch.randn(3, 256).bfloat16())
    assert y.shape == (3, 192) and torch.isfinite(y).all()


def test_fp8_mm_baseline_times_the_gemm_alone():
    """fp8_mm quantizes x outside the timed call and returns what the fp8 (quantize + GEMM) baseline returns."""
    from comfyui_lowbit.cli.benchmark import _fp8_linear

    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(32, 64, generator=g).bfloat16(), torch.randn(32, generator=g).bfloat16()
    x = torch.randn(3, 64, generator=g).bfloat16()
    try:
        expected = _fp8_linear(w, b)(x)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._scaled_mm has no CPU FP8 support in this build ({e})")
    call = _fp8_linear(w, b, quantize_x=False)(x)
    assert torch.equal(call(), expected)


def test_time_ms_graph_falls_back_to_eager_off_cuda():
    from comfyui_lowbit.cli.benchmark import time_ms

    calls = []
    ms, how = time_ms(lambda: calls.append(1), torch.device("cpu"), warmup=2, runs=3, graph=True)
    assert how == "eager" and len(calls) == 5 and ms >= 0


def test_time_ms_cuda_graph_protocol(monkeypatch):
    """On CUDA (faked here): warm-up on a side stream, one capture, then only replays are timed."""
    from comfyui_lowbit.cli import benchmark

    log = []

    class Ctx:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            log.append(("enter", self.name))

        def __exit__(self, *exc):
            log.append(("exit", self.name))

    class Graph:
        def replay(self):
            log.append("replay")

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 0.5

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: Ctx("side stream"))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: Ctx("capture"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    ms, how = benchmark.time_ms(lambda: log.append("fn"), torch.device("cuda"), warmup=3, runs=4, graph=True)
    assert (ms, how) == (0.5, "cuda_graph")
    assert log == [("enter", "side stream"), "fn", "fn", "fn", ("exit", "side stream"),
                   ("enter", "capture"), "fn", ("exit", "capture"), *["replay"] * (3 + 4)]
