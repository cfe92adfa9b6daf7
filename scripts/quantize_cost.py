"""Quantize time of a FLUX's block linears, today's calibrated quantizer (input ranges only) vs the calibrated
quantizers (input samples), measured once per distinct layer shape and summed over the layer counts.

    python scripts/quantize_cost.py --hidden 1024 --double 4 --single 8 --format svdq_w4a4 --rank 32 --iters 3
Each shape runs in a fresh process so that its peak RSS (ru_maxrss) is its own.
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def shapes(hidden, double, single, mlp_ratio=4):
    m = hidden * mlp_ratio
    return {(3 * hidden, hidden): 2 * double, (hidden, hidden): 2 * double, (m, hidden): 2 * double,
            (hidden, m): 2 * double, (3 * hidden + m, hidden): single, (hidden, hidden + m): single}


def one(n, k, fmt, rank, iters, samples, tokens, device, act_fit=None):
    from comfyui_lowbit.quant_ops import quantize_weight
    from comfyui_lowbit.flux_model.synthetic import _random_weight

    g = torch.Generator(device=device).manual_seed(0)
    w = _random_weight(n, k, g, device)
    mix = torch.randn(k, k, generator=g, device=device) / torch.arange(1, k + 1, device=device).sqrt()
    x = torch.randn(tokens, k, generator=g, device=device) @ mix
    opts = {"iters": iters, "calib_inputs": x} if samples else {"iters": iters}
    if fmt == "svdq_w4a4":
        opts["search_iters"] = 3 if not samples else 2
        if samples and act_fit is not None:
            opts["act_fit"] = act_fit
    t0 = time.time()
    quantize_weight(w, None, fmt, rank, x.abs().amax(0), dtype=torch.bfloat16, device=device, **opts)
    if device != "cpu":
        torch.cuda.synchronize()
    return time.time() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--double", type=int, default=4)
    p.add_argument("--single", type=int, default=8)
    p.add_argument("--format", default="svdq_w4a4")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--tokens", type=int, default=224, help="fit rows (256 sampled, 1 in 8 held out)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--act-fit", type=int, default=None, help="svdq_w4a4 with samples: act_fit steps (default: the quantizer's)")
    p.add_argument("--only", default=None, help="comma list of NxK shapes to measure (default: all)")
    p.add_argument("--one", nargs=3, type=int, help=argparse.SUPPRESS)  # n k samples: child process
    a = p.parse_args()
    if a.one:
        torch.set_num_threads(1)
        print(json.dumps(one(a.one[0], a.one[1], a.format, a.rank, a.iters, bool(a.one[2]), a.tokens, a.device,
                             a.act_fit)))
        return
    total = {0: 0.0, 1: 0.0}
    peak = {0: 0.0, 1: 0.0}
    only = None if a.only is None else {tuple(map(int, s.split("x"))) for s in a.only.split(",")}
    for (n, k), count in shapes(a.hidden, a.double, a.single).items():
        if only is not None and (n, k) not in only:
            continue
        row = []
        for samples in (0, 1):
            out = subprocess.run([sys.executable, __file__, "--one", str(n), str(k), str(samples), "--format", a.format,
                                  "--rank", str(a.rank), "--iters", str(a.iters), "--tokens", str(a.tokens),
                                  "--device", a.device] + ([] if a.act_fit is None else ["--act-fit", str(a.act_fit)]),
                                 check=True, capture_output=True, text=True).stdout
            sec, rss = json.loads(out.strip().splitlines()[-1])
            total[samples] += sec * count
            peak[samples] = max(peak[samples], rss)
            row.append(f"{sec:7.1f} s {rss:6.0f} MB")
        print(f"{n:6d} x {k:6d} (x{count:2d}): ranges only {row[0]} | samples {row[1]}", flush=True)
    print(f"block linears in all: ranges only {total[0]:.0f} s (peak {peak[0]:.0f} MB), samples {total[1]:.0f} s "
          f"(peak {peak[1]:.0f} MB), ratio {total[1] / total[0]:.2f}")


if __name__ == "__main__":
    main()
