"""Model files for gpu_comfyui_full.py: a seeded random FLUX.1-dev-shaped BF16 file (flux_model.random_flux:
heavy-tailed weights, outlier columns, a low-rank part), or a lowbit file of the same model built with
quantize_fn(reuse_per_shape=True): the first layer of each (format, shape) is quantized for real and timed,
later layers get copies of its tensors (same sizes and speed, meaningless outputs). Prints one JSON line.
"""
import argparse
import json
import os
import resource
import time

import torch
from safetensors.torch import save_file

from comfyui_lowbit import checkpoint
from comfyui_lowbit.checkpoint import flux
from comfyui_lowbit.cli.benchmark import FLUX_DEV_CONFIG
from comfyui_lowbit.flux_model import flux_state_dict, quantize_fn, random_flux

SMALL_CONFIG = dict(FLUX_DEV_CONFIG, context_in_dim=256, hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def layer_counts(config: dict, fmt: str) -> dict:
    """{(format, N, K): number of layers} of a FLUX with `config` whose blocks are `fmt`."""
    counts = {}
    for key, shape in flux.expected_shapes(config).items():
        layer = key[: -len(".weight")]
        f = flux.layer_format(layer, fmt) if key.endswith(".weight") and len(shape) == 2 else None
        if f is not None:
            counts[(f, *shape)] = counts.get((f, *shape), 0) + 1
    return counts


def build_bf16(config, seed, device, out) -> dict:
    t0 = time.perf_counter()
    model = random_flux(config, seed=seed, device=device)
    sync(device)
    t1 = time.perf_counter()
    tensors = {k: v.cpu().contiguous() for k, v in flux_state_dict(model)[0].items()}
    del model
    save_file(tensors, out + ".tmp")
    os.replace(out + ".tmp", out)
    return {"build_s": t1 - t0, "save_s": time.perf_counter() - t1, "bytes": os.path.getsize(out)}


def build_lowbit(config, seed, device, out, fmt, rank, options) -> dict:
    """The reuse-per-shape lowbit file, per-shape quantize times and the full quantization they add up to."""
    shape_s, host_s = {}, {}
    inner = quantize_fn(fmt, rank=rank, reuse_per_shape=True, dtype=torch.bfloat16, **options)

    def timed(name, linear):
        f = flux.layer_format(name, fmt)
        key = None if f is None else (f, *linear.weight.shape)
        first = key is not None and key not in shape_s
        if first:  # what `lowbit quantize` does per layer besides the quantizer: float32 on the host, check, copy
            t = time.perf_counter()
            w = linear.weight.detach().cpu().float()
            assert torch.isfinite(w).all()
            w.to(device)
            sync(device)
            host_s[key] = time.perf_counter() - t
            sync(device)
            t = time.perf_counter()
        mod = inner(name, linear)
        if first:
            sync(device)
            shape_s[key] = time.perf_counter() - t
        return mod

    t0 = time.perf_counter()
    model = random_flux(config, seed=seed, device=device, quantize=timed)
    sync(device)
    t1 = time.perf_counter()
    tensors, layers = flux_state_dict(model)
    tensors = {k: v.cpu() for k, v in tensors.items()}
    del model
    args = {"format": fmt, "rank": rank, "group_size": 64, "calib": None, "reuse_per_shape": True}
    checkpoint.save_checkpoint(out, tensors, layers, "flux", flux.infer_config(flux.expected_shapes(config)), force=True,
                               extra_meta={"lowbit.source": "random_flux seed %d" % seed, "lowbit.args": json.dumps(args)})
    counts = layer_counts(config, fmt)
    est = sum(n * (shape_s[k] + host_s[k]) for k, n in counts.items() if k in shape_s)
    return {"build_s": t1 - t0, "save_s": time.perf_counter() - t1, "bytes": os.path.getsize(out),
            "layers": sum(counts.values()), "shapes_quantized": len(shape_s),
            "per_shape_s": {"%s %dx%d" % k: round(v, 4) for k, v in shape_s.items()},
            "per_shape_host_s": {"%s %dx%d" % k: round(v, 4) for k, v in host_s.items()},
            "est_full_quantize_s": est}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("what", choices=("bf16", "svdq_w4a4", "ternary"))
    p.add_argument("out")
    p.add_argument("--small", action="store_true", help="hidden 256, 2 + 2 blocks instead of FLUX.1-dev's shape")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=None, help="default: lowbit quantize's (32 W4A4, 64 ternary)")
    p.add_argument("--options", default="{}", help="JSON quantizer options (e.g. '{\"iters\": 1}' for dry runs)")
    a = p.parse_args(argv)
    config = SMALL_CONFIG if a.small else FLUX_DEV_CONFIG
    if a.what == "bf16":
        res = build_bf16(config, a.seed, a.device, a.out)
    else:
        rank = checkpoint.DEFAULT_RANK[a.what] if a.rank is None else a.rank
        res = build_lowbit(config, a.seed, a.device, a.out, a.what, rank, json.loads(a.options))
    res.update(what=a.what, path=a.out, host_rss_peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2)
    if torch.device(a.device).type == "cuda":
        res["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1024 ** 3
    print(json.dumps(res))


if __name__ == "__main__":
    main()
