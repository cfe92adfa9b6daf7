"""Tune on this GPU: time every shipped config of the tuned kernels at the FLUX shapes and write the fastest per
shape and token bucket to <out>/<gpu>.json (merged with the entries already there), the table tuning.py reads.
`python -m comfyui_lowbit.kernels.tune [--out DIR] [--m 1 512 4096 4608] [--rank 32] [--kernels K ..]`; `--tiny` runs small
shapes (a smoke run, e.g. under TRITON_INTERPRET=1 on a CPU; its timings mean nothing)."""
import argparse
import contextlib
import json
import os
import time

import torch

from . import tuning
from .bench_kernels import FLUX_SHAPES
from .packing import pack_int4, pack_ternary
from .triton_common import candidates, m_bucket

BLOCK_SHAPES = [("block", k, n) for name, k, n in FLUX_SHAPES if name != "mod.lin"]  # W4A4 / ternary linears
# W4A16 (group 64): FLUX modulation (6h, 3h outputs) and T5-XXL (attention, feed-forward in and out)
W4A16_SHAPES = [("w4a16", k, n) for k, n in ((3072, 18432), (3072, 9216), (4096, 4096), (4096, 10240), (10240, 4096))]
TINY_SHAPES = [("block", 256, 64), ("w4a16", 256, 64)]
W4A16_MAX_M = 1024  # modulation runs at batch-size tokens, T5 at 512 per prompt
KERNELS = ("act_int4", "w4a4", "ternary", "ternary_int8", "w4a16", "act_fp8", "fp8_int4", "fp8_ternary", "w4a8")


@contextlib.contextmanager
def forced(name, device, fields, cfg):
    """Make the in-memory table hold `cfg` for this shape while the block runs."""
    entries = tuning.table(device).setdefault(name, {})
    key = tuning.shape_key(**fields)
    old = entries.get(key)
    entries[key] = cfg
    try:
        yield
    finally:
        entries.pop(key) if old is None else entries.__setitem__(key, old)


def _seconds(fn):
    if torch.cuda.is_available():
        import triton.testing
        return triton.testing.do_bench(fn, warmup=5, rep=25) * 1e-3
    fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _ops(kind, k, n, m, rank, device):
    """(kernel name, shape fields, shipped configs, callable) for each tuned kernel at this shape; a '*_path'
    name's configs are the paths of a weight-only layer (timed after its fused kernel's best config is known)."""
    from . import triton_act, triton_fp8, triton_rowquant, triton_ternary, triton_w4a4, triton_w4a8, triton_wonly
    from .reference import progressive_scales
    from .dispatch import fp8_supported

    g = torch.Generator(device).manual_seed(0)
    dt, kw = torch.bfloat16, dict(generator=g, device=device)
    x = torch.randn(m, k, **kw).to(dt)
    bucket = m_bucket(m)
    paths = [{"path": "fused"}, {"path": "dequant"}]
    size = "small" if m <= triton_wonly.SMALL_M else "large"
    if kind == "w4a16":
        qw = pack_int4(torch.randint(-8, 8, (n, k), **kw))
        ws = (torch.rand(k // 64, n, **kw) * 0.01).to(dt)
        fields = triton_wonly.table_fields("w4a16", n, k, m, 64, False, 0)
        run = lambda: triton_wonly.w4a16_gemm(x, qw, ws)
        return [("w4a16", fields, triton_wonly.CONFIGS["w4a16"][size], run), ("w4a16_path", fields, paths, run)]
    smooth = (torch.rand(k, **kw) + 0.5).to(dt)
    down = (torch.randn(k, rank, **kw) * 0.05).to(dt)
    up = (torch.randn(n, rank, **kw) * 0.05).to(dt)
    qw = pack_int4(torch.randint(-8, 8, (n, k), **kw))
    ws = (torch.rand(k // 64, n, **kw) * 0.01).to(dt)
    tw = pack_ternary(torch.randint(-1, 2, (n, k), **kw))
    tws = (torch.rand(n, **kw) * 0.01).to(dt)
    q, s, lr = triton_act.quantize_act_int4(x, smooth, down)
    q8, s8, lr8 = triton_rowquant.quantize_act_int8(x, down)
    tfields = triton_wonly.table_fields("ternary", n, k, m, 64, False, rank)
    tern = lambda: triton_wonly.ternary_gemm(x, tw, tws, lr, up)
    ops = [("act_int4", dict(K=k, R=rank, M=bucket), triton_act.CONFIGS,
            lambda: triton_act.quantize_act_int4(x, smooth, down)),
           ("w4a4", dict(N=n, K=k, R=rank, M=bucket), triton_w4a4.CONFIGS,
            lambda: triton_w4a4.w4a4_gemm(q, s, qw, ws, lr, up)),
           ("ternary", tfields, triton_wonly.CONFIGS["ternary"][size], tern),
           ("ternary_path", tfields, paths, tern),
           ("act_int8", dict(K=k, R=rank, M=bucket, CODES=triton_rowquant.INT8), triton_rowquant.CONFIGS,
            lambda: triton_rowquant.quantize_act_int8(x, down)),
           ("ternary_int8", dict(N=n, K=k, R=rank, M=bucket), triton_ternary.CONFIGS,
            lambda: triton_ternary.ternary_int8_gemm(q8, s8, tw, tws, lr8, up))]
    qs8, ss8, _ = triton_rowquant.quantize_act_int8(x, down, smooth)
    s1, s0 = progressive_scales(ws)
    for p, scales in ((0, dict(wscales=ws)), (1, dict(wscales=s1, s0=s0))):  # the int8 mode's two inner loops
        ops.append(("w4a8", dict(N=n, K=k, R=rank, M=bucket, P=p), triton_w4a8.CONFIGS,
                    lambda scales=scales: triton_w4a8.w4a8_gemm(qs8, ss8, qw, lr=lr8, proj_up=up, **scales)))
    if not (fp8_supported(device) or torch.device(device).type == "cpu"):  # FP8 kernels: sm_89+ (or interpreted)
        return ops
    qf, sf, lrf = triton_rowquant.quantize_act_fp8(x, smooth, down)
    return ops + [("act_fp8", dict(K=k, R=rank, M=bucket), triton_rowquant.CONFIGS,
                   lambda: triton_rowquant.quantize_act_fp8(x, smooth, down)),
                  ("fp8_int4", dict(N=n, K=k, R=rank, M=bucket), triton_fp8.INT4_CONFIGS,
                   lambda: triton_fp8.int4_fp8_gemm(qf, sf, qw, ws, lrf, up)),
                  ("fp8_ternary", dict(N=n, K=k, R=rank, M=bucket), triton_fp8.TERNARY_CONFIGS,
                   lambda: triton_fp8.ternary_fp8_gemm(qf, sf, tw, tws, lrf, up))]


def tune(ms, shapes, rank, device, kernels=None) -> dict:
    """{kernel: {shape key: fastest config + its time in us}} (kernels: the names to tune, default all)."""
    found = {}
    for kind, k, n in shapes:
        for m in ms:
            if kind == "w4a16" and m > W4A16_MAX_M:
                continue
            for name, fields, cfgs, fn in _ops(kind, k, n, m, rank, device):
                if kernels and name.removesuffix("_path") not in kernels:
                    continue
                key = tuning.shape_key(**fields)
                if key in found.setdefault(name, {}):
                    continue
                timed = []
                for cfg in candidates(cfgs, m) if "BLOCK_M" in cfgs[0] else cfgs:
                    with forced(name, device, fields, cfg):
                        timed.append((_seconds(fn), cfg))
                sec, cfg = min(timed, key=lambda t: t[0])
                found[name][key] = {**cfg, "us": round(sec * 1e6, 2)}
                tuning.table(device).setdefault(name, {})[key] = found[name][key]  # later ops run the winner
                print(f"{name:9s} {key:32s} {len(timed)} configs, best {found[name][key]}", flush=True)
    return found


def write(found: dict, path: str, device) -> None:
    import triton

    data = {"kernels": tuning.read_table(path)}
    for name, entries in found.items():
        data["kernels"].setdefault(name, {}).update(entries)
    gpu = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    data = {"gpu": gpu, "triton": triton.__version__, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), **data}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    tuning._TABLES.pop(path, None)  # read again on the next lookup
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", help="folder for <gpu>.json (default: the package's kernels/configs on a GPU)")
    p.add_argument("--m", type=int, nargs="+", default=[1, 512, 4096, 4608])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--kernels", nargs="+", choices=KERNELS, help="kernels to tune (default all; a weight-only "
                   "kernel's fused-or-dequant path with it)")
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not (a.tiny and a.out):
        raise SystemExit("tune: no GPU; use --tiny --out DIR under TRITON_INTERPRET=1 for a smoke run")
    found = tune([min(m, 40) for m in a.m] if a.tiny else a.m, TINY_SHAPES if a.tiny else BLOCK_SHAPES + W4A16_SHAPES,
                 16 if a.tiny else a.rank, device, a.kernels)
    write(found, os.path.join(a.out or tuning.CONFIG_DIR, tuning.gpu_key(device) + ".json"), device)


if __name__ == "__main__":
    main()
