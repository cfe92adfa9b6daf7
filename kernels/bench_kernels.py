"""Time the Triton ops at FLUX shapes against a bf16 torch matmul (GPU):
`python -m comfyui_lowbit.kernels.bench_kernels [--m 1 4608] [--rank 32] [--shapes attn.qkv ...]`. `--tiny` runs small shapes
(a smoke run, e.g. under TRITON_INTERPRET=1 on a CPU); its timings mean nothing."""
import argparse

import torch

from .packing import pack_int4, pack_ternary
from .reference import progressive_scales

# (name, K, N) of the FLUX.1 linears (REFERENCE.md)
FLUX_SHAPES = [("attn.qkv", 3072, 9216), ("attn.proj", 3072, 3072), ("mlp.0", 3072, 12288), ("mlp.2", 12288, 3072),
               ("linear1", 3072, 21504), ("linear2", 15360, 3072), ("mod.lin", 3072, 18432)]
TINY_SHAPES = [("tiny", 128, 64)]


def _time(fn, reps):
    if torch.cuda.is_available():
        import triton.testing
        return triton.testing.do_bench(fn, rep=reps) * 1e-3
    import time
    fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(ms, rank, shapes, dev, reps=50):
    from . import triton_ops as T
    from .dispatch import fp8_supported

    fp8 = fp8_supported(dev) or dev == "cpu"  # FP8 kernels: sm_89+ (interpreted on a CPU)
    dt = torch.bfloat16
    rows = []
    for name, k, n in shapes:
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=dt)
            w16 = torch.randn(n, k, device=dev, dtype=dt)
            qw = pack_int4(torch.randint(-8, 8, (n, k), device=dev))
            tw = pack_ternary(torch.randint(-1, 2, (n, k), device=dev))
            ws4 = torch.rand(k // 64, n, device=dev, dtype=dt) * 0.01
            wsn = torch.rand(n, device=dev, dtype=dt) * 0.01
            smooth = torch.rand(k, device=dev, dtype=dt) + 0.5
            down, up = torch.randn(k, rank, device=dev, dtype=dt) * 0.02, torch.randn(n, rank, device=dev, dtype=dt) * 0.02
            q, s, lr = T.quantize_act_int4(x, smooth, down)
            q8, s8, _ = T.quantize_act_int8(x)
            s1, s0 = progressive_scales(ws4)
            ops = {
                "bf16 matmul": lambda: x @ w16.t(),
                "act int4+down": lambda: T.quantize_act_int4(x, smooth, down),
                "w4a4 gemm": lambda: T.w4a4_gemm(q, s, qw, ws4, lr, up),
                "w4a16 gemm": lambda: T.w4a16_gemm(x, qw, ws4),
                "ternary gemm": lambda: T.ternary_gemm(x, tw, wsn, lr, up),
                "ternary int8 gemm": lambda: T.ternary_int8_gemm(q8, s8, tw, wsn, lr, up),
                "act int8+down": lambda: T.quantize_act_int8(x, down, smooth),
                "w4a8 gemm": lambda: T.w4a8_gemm(q8, s8, qw, ws4, lr, up),
                "w4a8 progressive gemm": lambda: T.w4a8_gemm(q8, s8, qw, s1, lr, up, s0=s0),
            }
            if fp8:
                f8, fs, flr = T.quantize_act_fp8(x, smooth, down)
                ops.update({"act fp8+down": lambda: T.quantize_act_fp8(x, smooth, down),
                            "int4 fp8 gemm": lambda: T.int4_fp8_gemm(f8, fs, qw, ws4, flr, up),
                            "ternary fp8 gemm": lambda: T.ternary_fp8_gemm(f8, fs, tw, wsn, flr, up)})
            for op, fn in ops.items():
                sec = _time(fn, reps)
                rows.append((name, m, k, n, op, sec * 1e6, 2 * m * n * k / sec / 1e12))
                print(f"{name:10s} M={m:5d} K={k:5d} N={n:5d} {op:18s} {sec * 1e6:9.1f} us {rows[-1][-1]:7.1f} TFLOP/s", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--m", type=int, nargs="+", default=[1, 512, 4608])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--shapes", nargs="+", choices=[s[0] for s in FLUX_SHAPES], help="FLUX shapes to time (default all)")
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not a.tiny:
        raise SystemExit("bench_kernels: no GPU; use --tiny under TRITON_INTERPRET=1 for a smoke run")
    bench([min(m, 40) for m in a.m] if a.tiny else a.m, 16 if a.tiny else a.rank,
          TINY_SHAPES if a.tiny else [s for s in FLUX_SHAPES if not a.shapes or s[0] in a.shapes], dev, reps=50)


if __name__ == "__main__":
    main()
