"""Per-GPU config tables (kernels/tuning.py): a shape in the table runs its config with no autotune benchmarking;
others autotune (at most 3 candidates); the tuning command writes a table the lookup reads back."""
import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from comfyui_lowbit.kernels import reference as ref, tuning  # noqa: E402
from comfyui_lowbit.kernels.packing import pack_int4  # noqa: E402

triton_ops = pytest.importorskip("comfyui_lowbit.kernels.triton_ops")
from comfyui_lowbit.kernels import triton_act, triton_w4a4  # noqa: E402
from comfyui_lowbit.kernels.triton_common import INTERPRET  # noqa: E402

pytestmark = pytest.mark.skipif(not INTERPRET, reason="runs the kernels under the interpreter on CPU tensors")
CONFIG = {"BLOCK_N": 64, "BLOCK_M": 16, "GROUP_M": 1, "num_warps": 4, "num_stages": 2}


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_TABLES", {})
    return tmp_path


@pytest.fixture
def w4a4_case():
    g = torch.Generator().manual_seed(0)
    m, n, k = 5, 64, 256
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    q, s, _ = ref.quantize_act_int4(x, None)
    qw = pack_int4(torch.randint(-8, 8, (n, k), generator=g))
    ws = (torch.rand(k // 64, n, generator=g) * 0.05).to(torch.bfloat16)
    return (q, s, qw, ws), dict(N=n, K=k, R=0, M=8)


@pytest.fixture
def spies(monkeypatch):
    """Two autotune candidates, a benchmark that only counts, and the configs the kernel actually ran."""
    tuner = triton_w4a4._w4a4_kernel
    cfg = tuner.configs[0]
    other = type(cfg)({**cfg.kwargs, "GROUP_M": 2}, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    monkeypatch.setattr(tuner, "configs", [cfg, other])
    monkeypatch.setattr(tuner, "cache", {})
    benched, ran = [], []
    monkeypatch.setattr(tuner, "_do_bench", lambda call, quantiles: benched.append(1) or [1.0, 1.0, 1.0])
    run = tuner.fn.run
    monkeypatch.setattr(tuner.fn, "run", lambda *a, **kw: ran.append({k: kw.get(k) for k in CONFIG}) or run(*a, **kw))
    return benched, ran


def test_table_hit_runs_its_config_without_benchmarking(table_dir, w4a4_case, spies):
    args, fields = w4a4_case
    benched, ran = spies
    entry = {**CONFIG, "us": 1.0}
    (table_dir / "cpu.json").write_text(json.dumps({"kernels": {"w4a4": {tuning.shape_key(**fields): entry}}}))
    out = triton_ops.w4a4_gemm(*args)
    assert benched == [] and ran == [CONFIG]
    torch.testing.assert_close(out.float(), ref.w4a4_gemm(*args).float(), rtol=2 ** -7, atol=1e-2)


def test_table_miss_autotunes(table_dir, w4a4_case, spies):
    args, _ = w4a4_case
    benched, _ = spies
    triton_ops.w4a4_gemm(*args)
    assert len(benched) == 2


def test_at_most_three_candidates_per_bucket():
    from comfyui_lowbit.kernels import triton_fp8, triton_rowquant, triton_ternary, triton_wonly
    from comfyui_lowbit.kernels.triton_common import prune_by_m

    lists = [triton_w4a4.CONFIGS, triton_act.CONFIGS, triton_rowquant.CONFIGS, triton_ternary.CONFIGS,
             triton_fp8.INT4_CONFIGS, triton_fp8.TERNARY_CONFIGS]
    lists += [c for by_size in triton_wonly.CONFIGS.values() for c in by_size.values()]
    for cfgs in lists:
        configs = [type("C", (), {"kwargs": c})() for c in cfgs]
        for m in (1, 17, 64, 300, 4608):
            assert 1 <= len(prune_by_m(configs, {"M": m})) <= 3


def test_tune_writes_a_table_the_lookup_reads(tmp_path, monkeypatch, table_dir):
    from comfyui_lowbit.kernels import tune

    monkeypatch.setattr(tune, "_seconds", lambda fn: (fn(), 1e-6)[1])
    found = tune.tune([40], [("block", 128, 64), ("w4a16", 128, 64)], 16, torch.device("cpu"))
    path = str(table_dir / "cpu.json")
    tune.write(found, path, torch.device("cpu"))
    monkeypatch.setattr(tuning, "_TABLES", {})
    data = json.loads(open(path).read())
    assert data["gpu"] == "cpu" and set(data["kernels"]) == {"w4a4", "act_int4", "ternary", "ternary_path",
                                                             "ternary_int8", "act_int8", "w4a16", "w4a16_path",
                                                             "act_fp8", "fp8_int4", "fp8_ternary", "w4a8"}
    cfg = tuning.lookup("w4a4", torch.device("cpu"), N=64, K=128, R=16, M=64)
    assert cfg in [{**c, "us": 1.0} for c in triton_w4a4.CONFIGS]
    path_entry = tuning.lookup("w4a16_path", torch.device("cpu"), N=64, K=128, G=64, Z=0, M=64)
    assert path_entry["path"] in ("fused", "dequant")
    from comfyui_lowbit.kernels import triton_fp8

    cfg = tuning.lookup("fp8_int4", torch.device("cpu"), N=64, K=128, R=16, M=64)
    assert cfg in [{**c, "us": 1.0} for c in triton_fp8.INT4_CONFIGS]


def test_bad_table_names_the_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"w4a4": {}}))
    with pytest.raises(ValueError, match="x.json: expected"):
        tuning.read_table(str(bad))


def test_gpu_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert tuning.gpu_key(torch.device("cuda", 0)) == "nvidia_h100_80gb_hbm3"
    assert tuning.gpu_key("cpu") == "cpu"


@pytest.mark.parametrize("path", ["fused", "dequant"])
def test_weight_only_path_from_the_table(table_dir, monkeypatch, path):
    """The table's '<fmt>_path' entry decides between the fused kernel and dequantize + vendor GEMM, at any M."""
    from comfyui_lowbit.kernels import triton_wonly

    g = torch.Generator().manual_seed(1)
    m, n, k = 3, 32, 128
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    qw = pack_int4(torch.randint(-8, 8, (n, k), generator=g))
    ws = (torch.rand(k // 64, n, generator=g) * 0.05).to(torch.bfloat16)
    fields = triton_wonly.table_fields("w4a16", n, k, m, 64, False, 0)
    entry = {"w4a16_path": {tuning.shape_key(**fields): {"path": path}}}
    (table_dir / "cpu.json").write_text(json.dumps({"kernels": entry}))
    calls = []
    orig = triton_wonly._dequant_gemm
    monkeypatch.setattr(triton_wonly, "_dequant_gemm", lambda *a: calls.append(1) or orig(*a))
    out = triton_ops.w4a16_gemm(x, qw, ws)
    assert calls == ([1] if path == "dequant" else [])
    torch.testing.assert_close(out.float(), ref.w4a16_gemm(x, qw, ws).float(), rtol=2 ** -7, atol=1e-2)
