"""`lowbit bench`: latency of the lowbit layers and of a whole FLUX transformer against BF16 (and FP8).

Per layer: every linear shape of the chosen shape sets (default FLUX.1-dev and T5-XXL; FLUX.2 [dev], [klein] 9B
and FLUX.2's text encoders on request) at several token counts M; each lowbit row times the whole layer as the
model runs it (activation quantization + low-rank branch + GEMM). Whole model: one forward of a FLUX.1-dev-,
FLUX.2 [klein] 9B- or FLUX.2 [dev]-shaped transformer with seeded random weights at 1024x1024 (4096 + 512 tokens).
GPU timings use CUDA events (warm-up, then the median of `runs` runs); CPU timings use perf_counter. Layers
at M <= GRAPH_MAX_M are timed as CUDA-graph replays on both sides (BF16 and lowbit), so kernel-launch
overhead is not what is measured; larger M eagerly. `--small` shrinks everything so the harness runs
anywhere (the reference kernels on CPU, eagerly).
"""
import json
import math
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from .. import kernels
from ..quant_ops import TernaryWeights, W4A4Weights, W4A16Weights, module_from_packed, use_activations, use_fp8

FLUX_DEV_CONFIG = dict(in_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
                       num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000,
                       qkv_bias=True, guidance_embed=True)
SMALL_CONFIG = dict(FLUX_DEV_CONFIG, context_in_dim=256, hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2)


def _flux2(variant: str) -> dict:
    from ..checkpoint.families import FLUX2

    return dict(FLUX2.variant(variant).config)


# whole-transformer configs (FLUX.2's from checkpoint/families.py, with their sources there)
MODELS = {"flux1-dev": FLUX_DEV_CONFIG, "flux2-klein-9b": _flux2("klein-9b"), "flux2-dev": _flux2("dev")}
SMALL_MODELS = {name: dict(cfg, context_in_dim=256, hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2)
                for name, cfg in MODELS.items()}

LAYER_FORMATS = ("w4a4", "w4a16", "ternary", "ternary_int8", "w4a8f", "ternary_f8", "w4a8i", "w4a8ip")
MODEL_FORMATS = ("bf16", "svdq_w4a4", "ternary", "svdq_w4a4_fp8", "ternary_fp8", "svdq_w4a4_int8", "svdq_w4a4_int8p",
                 "ternary_int8")
FP8_FORMATS = {"w4a8f": "w4a4", "ternary_f8": "ternary", "svdq_w4a4_fp8": "svdq_w4a4", "ternary_fp8": "ternary"}
# the same weights with int8 activations (W4A8, ternary int8): (format, progressive integer group scales)
INT8_FORMATS = {"w4a8i": ("w4a4", False), "w4a8ip": ("w4a4", True), "svdq_w4a4_int8": ("svdq_w4a4", False),
                "svdq_w4a4_int8p": ("svdq_w4a4", True), "ternary_int8": ("ternary", False)}
FULL_MS = (1, 256, 512, 4608, 9216)
GRAPH_MAX_M = 64
SMALL_MS = (1, 64)
RANK = 32


T5_SHAPES = [("t5.attn", 4096, 4096, False), ("t5.ff_in", 10240, 4096, False), ("t5.ff_out", 4096, 10240, False)]
T5_FORMATS = ("w4a16",)  # T5-XXL's linears are only ever W4A16
# FLUX.2's text encoders (ComfyUI's Mistral3Small24BConfig / Qwen3_8BConfig), W4A16 only like T5
FLUX2_TE_SHAPES = [("mistral.q", 4096, 5120, False), ("mistral.kv", 1024, 5120, False), ("mistral.o", 5120, 4096, False),
                   ("mistral.gate_up", 32768, 5120, False), ("mistral.down", 5120, 32768, False),
                   ("qwen3_8b.q", 4096, 4096, False), ("qwen3_8b.kv", 1024, 4096, False),
                   ("qwen3_8b.gate_up", 12288, 4096, False), ("qwen3_8b.down", 4096, 12288, False)]
TE_PREFIXES = ("t5.", "mistral.", "qwen3_8b.")
SHAPE_SETS = ("flux1", "t5", "flux2-dev", "flux2-klein-9b", "flux2-te")
FLUX2_PREFIX = {"flux2-dev": "f2dev.", "flux2-klein-9b": "f2k9b."}


def layer_shapes(hidden: int = 3072, mlp_ratio: float = 4.0) -> list:
    """[(name, N, K, block)] of the FLUX linears; block=False for the modulation layers (W4A16 in the model,
    one token per sample), which are listed but left out of the geometric means."""
    h, m = hidden, int(hidden * mlp_ratio)
    return [("attn.qkv", 3 * h, h, True), ("attn.proj", h, h, True), ("mlp.0", m, h, True), ("mlp.2", h, m, True),
            ("linear1", 3 * h + m, h, True), ("linear2", h, h + m, True),
            ("mod.double", 6 * h, h, False), ("mod.single", 3 * h, h, False)]


def flux2_layer_shapes(hidden: int, mlp_ratio: float = 3.0, prefix: str = "f2.") -> list:
    """FLUX.2's linears: SiLU-gated MLPs (the first MLP linear and linear1's MLP part 2 x mlp wide, signed MLP
    output inputs), the three global modulations (one token per sample) listed but left out of the means."""
    h, m = hidden, int(hidden * mlp_ratio)
    rows = [("attn.qkv", 3 * h, h, True), ("attn.proj", h, h, True), ("mlp.0", 2 * m, h, True), ("mlp.2", h, m, True),
            ("linear1", 3 * h + 2 * m, h, True), ("linear2", h, h + m, True),
            ("mod.double", 6 * h, h, False), ("mod.single", 3 * h, h, False)]
    return [(prefix + name, n, k, block) for name, n, k, block in rows]


def shape_set(name: str, small: bool = False) -> list:
    """[(shape, N, K, block)] of a named set (SHAPE_SETS); --small: hidden 256, text encoders left out."""
    cfgs = SMALL_MODELS if small else MODELS
    if name == "flux1":
        c = cfgs["flux1-dev"]
        return layer_shapes(c["hidden_size"], c["mlp_ratio"])
    if name in FLUX2_PREFIX:
        c = cfgs[name]
        return flux2_layer_shapes(c["hidden_size"], c["mlp_ratio"], FLUX2_PREFIX[name])
    if name in ("t5", "flux2-te"):
        return [] if small else (T5_SHAPES if name == "t5" else FLUX2_TE_SHAPES)
    raise ValueError(f"unknown shape set {name!r}, expected some of {SHAPE_SETS}")


def _set_of(shape: str) -> str:
    for name, prefix in FLUX2_PREFIX.items():
        if shape.startswith(prefix):
            return name
    return "te" if shape.startswith(TE_PREFIXES) else "flux1"


# ---- timing -----------------------------------------------------------------------------------------------


def cuda_graph(fn, device: torch.device, warmup: int):
    """fn captured in a CUDA graph, returned as its replay: warm-up runs (autotuning, lazy allocations) on a side
    stream first, as PyTorch documents for capture."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 2)):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_ms(fn, device: torch.device, warmup: int, runs: int, graph: bool = False) -> tuple[float, str]:
    """(median wall time of fn() in milliseconds, how it was timed): CUDA events on a GPU, as CUDA-graph replays
    when `graph` (eager if the capture fails: the reason is in the returned string); perf_counter on a CPU."""
    how = "eager"
    with torch.no_grad():
        if graph and device.type == "cuda":
            try:
                fn, how = cuda_graph(fn, device, warmup), "cuda_graph"
            except Exception as e:  # noqa: BLE001 - not capturable: timed eagerly, reported
                torch.cuda.synchronize(device)
                how = f"eager (graph capture failed: {type(e).__name__}: {str(e)[:120]})"
        for _ in range(warmup):
            fn()
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            for _ in range(runs):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), how


def environment(device: torch.device) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
           "backend": kernels.backend_for(device).__name__.rsplit(".", 1)[-1],
           "time_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:  # not installed, or no usable backend
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(device)
        env["cuda"] = torch.version.cuda
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def has_fp8(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9) and hasattr(torch, "_scaled_mm")


# ---- per-layer --------------------------------------------------------------------------------------------


def random_layer(fmt: str, n: int, k: int, rank: int, device, unsigned=False, seed=0, dtype=torch.bfloat16):
    """A lowbit module with random packed tensors of the right shapes (timing only: no quantizer run)."""
    if fmt in FP8_FORMATS:  # the same weights with fp8 (e4m3) activations
        return use_fp8(random_layer(FP8_FORMATS[fmt], n, k, rank, device, unsigned, seed, dtype), device)
    if fmt in ("w4a8i", "w4a8ip"):  # the same weights with int8 activations
        base, progressive = INT8_FORMATS[fmt]
        return use_activations(random_layer(base, n, k, rank, device, unsigned, seed, dtype), "int8", device, progressive)
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device=device)).to(dtype)

    def ints(lo, hi, *shape):
        return torch.randint(lo, hi, shape, generator=g, device=device, dtype=torch.int8)

    lr = dict(proj_down=randn(k, rank, scale=k ** -0.5), proj_up=randn(n, rank, scale=rank ** -0.5)) if rank else {}
    bias = randn(n, scale=0.02)
    if fmt == "w4a4":
        p = W4A4Weights.pack(ints(-8, 8, n, k), randn(k // 64, n, scale=0.01).abs(), torch.ones(k, dtype=dtype, device=device),
                             bias=bias, act_unsigned=unsigned, **lr)
    elif fmt == "w4a16":
        p = W4A16Weights.pack(ints(-8, 8, n, k), randn(k // 64, n, scale=0.01).abs(), None, bias)
    elif fmt in ("ternary", "ternary_int8"):
        p = TernaryWeights.pack(ints(-1, 2, n, k), randn(n, scale=0.01).abs(), bias=bias,
                                act_int8=fmt == "ternary_int8", **lr)
    else:
        raise ValueError(f"unknown layer format {fmt!r}, expected one of {LAYER_FORMATS}")
    return module_from_packed(p)


def _fp8_quantize(t: torch.Tensor):
    """Row-wise e4m3: (codes, float32 scales (rows, 1)) with scale = absmax / 448."""
    f8 = torch.float8_e4m3fn
    scale = t.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / torch.finfo(f8).max
    return (t.float() / scale).to(f8), scale


def _fp8_linear(w: torch.Tensor, b: torch.Tensor, quantize_x: bool = True):
    """Row-wise FP8 (e4m3) linear through torch._scaled_mm. quantize_x: x -> y with the dynamic per-token
    activation quantization timed too; otherwise a factory x -> (() -> y) that quantizes x once, outside
    the timed call (the GEMM alone). M is padded to a multiple of 16 (a _scaled_mm requirement)."""
    wq, ws = _fp8_quantize(w)
    ws = ws.t().contiguous()  # (1, N)
    fused_bias = [True]

    def mm(xq, xs, m):
        if fused_bias[0]:
            try:
                return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, bias=b, out_dtype=torch.bfloat16)[:m]
            except RuntimeError:  # builds without a fused bias for row-wise scales
                fused_bias[0] = False
        return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16)[:m] + b

    def prepare(x):
        m = x.shape[0]
        return (*_fp8_quantize(F.pad(x, (0, 0, 0, -m % 16))), m)

    if quantize_x:
        return lambda x: mm(*prepare(x))

    def factory(x):
        xq, xs, m = prepare(x)
        return lambda: mm(xq, xs, m)

    return factory


def bench_layers(device, ms, formats, shapes, warmup, runs, rank=RANK, log=print) -> list:
    """Rows {shape, n, k, m, block, impl, ms, timing | error}; impl in bf16, fp8 (with its activation
    quantization) and fp8_mm (the GEMM on pre-quantized operands) when available, and `formats`."""
    rows = []
    fp8 = has_fp8(device)
    for si, (name, n, k, block) in enumerate(shapes):
        g = torch.Generator(device=device).manual_seed(si)
        w = (torch.randn(n, k, generator=g, device=device) * k ** -0.5).to(torch.bfloat16)
        b = (0.02 * torch.randn(n, generator=g, device=device)).to(torch.bfloat16)
        makers = {"bf16": lambda x: lambda: F.linear(x, w, b)}  # impl -> (x -> the call to time)
        if fp8:
            try:
                run_fp8, fp8_mm = _fp8_linear(w, b), _fp8_linear(w, b, quantize_x=False)
                makers["fp8"] = lambda x: lambda: run_fp8(x)
                makers["fp8_mm"] = fp8_mm
            except Exception as e:  # noqa: BLE001 - an unsupported torch build is reported, not fatal
                rows.append(dict(shape=name, n=n, k=k, m=None, block=block, impl="fp8", error=repr(e)))
        for fmt in formats:
            if name.startswith(TE_PREFIXES) and fmt not in T5_FORMATS:
                continue
            try:
                layer = random_layer(fmt, n, k, rank, device, unsigned=name == "mlp.2", seed=si)
            except RuntimeError as e:  # fp8 rows on a GPU without FP8
                rows.append(dict(shape=name, n=n, k=k, m=None, block=block, impl=fmt, error=str(e)))
                continue
            makers[fmt] = lambda x, layer=layer: lambda: layer(x)
        for m in ms:
            x = torch.randn(m, k, generator=g, device=device).to(torch.bfloat16)
            if name == "mlp.2":
                x = F.gelu(x, approximate="tanh")
            for impl, make in makers.items():
                row = dict(shape=name, n=n, k=k, m=m, block=block, impl=impl)
                try:
                    row["ms"], row["timing"] = time_ms(make(x), device, warmup, runs, graph=m <= GRAPH_MAX_M)
                except Exception as e:  # noqa: BLE001 - record and go on; the table shows it
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                log(f"  {name:11s} N={n:6d} K={k:6d} M={m:5d} {impl:13s} "
                    + (f"{row['ms']:9.4f} ms ({row['timing']})" if "ms" in row else row["error"]))
        del makers, w, b
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


BASELINES = ("bf16", "fp8", "fp8_mm")


def speedups(rows: list, shape_set: str = "flux1") -> tuple[list, dict]:
    """Adds speedup_vs_bf16 / _vs_fp8 / _vs_fp8_mm (= baseline ms / ms, > 1 is faster) to the lowbit rows and
    returns (rows, geomean) with geomean[impl][m] over the block shapes of `shape_set` (flux1, flux2-dev, ...)."""
    base = {(r["shape"], r["m"], r["impl"]): r["ms"] for r in rows if "ms" in r and r["impl"] in BASELINES}
    acc = {}
    for r in rows:
        if "ms" not in r or r["impl"] in BASELINES:
            continue
        for ref in BASELINES:
            t = base.get((r["shape"], r["m"], ref))
            if t:
                r[f"speedup_vs_{ref}"] = t / r["ms"]
                if r["block"] and _set_of(r["shape"]) == shape_set:
                    acc.setdefault(r["impl"], {}).setdefault(r["m"], {}).setdefault(ref, []).append(t / r["ms"])
    geo = {impl: {str(m): {f"vs_{ref}": math.exp(sum(map(math.log, v)) / len(v)) for ref, v in d.items()}
                  for m, d in per_m.items()} for impl, per_m in acc.items()}
    return rows, geo


# ---- whole model ------------------------------------------------------------------------------------------


def bench_model(device, config, formats, tokens_hw, txt_len, warmup, runs, rank=RANK, seed=0, log=print,
                name="flux1-dev") -> list:
    """One forward per format of a seeded random FLUX.1 or FLUX.2 (config image_model). Quantized models are built
    layer by layer (never a full 16-bit copy) and quantize only the first layer of each shape, reusing its packed
    tensors (copied) for the others: timings and memory are real, outputs are not meaningful."""
    from ..checkpoint.families import family_of
    from ..flux_model import make_inputs, quantize_fn, random_flux, weight_bytes

    family = family_of("flux", config).name
    rows = []
    inputs = make_inputs(config, height=tokens_hw[0], width=tokens_hw[1], txt_len=txt_len, seed=seed, device=device)
    for fmt in formats:
        row = {"format": fmt, "model": name, "tokens": tokens_hw[0] * tokens_hw[1] + txt_len}
        model = None
        try:
            t0 = time.time()
            base = FP8_FORMATS.get(fmt) or INT8_FORMATS.get(fmt, (fmt,))[0]
            q = None if fmt == "bf16" else quantize_fn(base, rank, reuse_per_shape=True, family=family, iters=1)
            model = random_flux(config, seed=seed, dtype=torch.bfloat16, device=device, quantize=q)
            if fmt in FP8_FORMATS:
                use_fp8(model, device)
            if fmt in INT8_FORMATS:
                use_activations(model, "int8", device, INT8_FORMATS[fmt][1])
            row["build_s"] = time.time() - t0
            row["weight_bytes"] = weight_bytes(model)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                before = torch.cuda.memory_allocated(device)
            row["ms"], _ = time_ms(lambda: model(**inputs), device, warmup, runs)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                with torch.no_grad():
                    model(**inputs)
                torch.cuda.synchronize(device)
                row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
                row["activation_peak_bytes"] = row["peak_bytes"] - before
            else:
                row["peak_bytes"] = None
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: reported in the table
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        log(f"  {name} {fmt:10s} " + (f"{row['ms']:10.2f} ms  weights {row['weight_bytes'] / 1e9:.3f} GB"
                                     if "ms" in row else row["error"]))
        rows.append(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = next((r for r in rows if r["format"] == "bf16" and "ms" in r), None)
    for r in rows:
        if base and "ms" in r:
            r["latency_ratio_to_bf16"] = r["ms"] / base["ms"]
            r["weight_ratio_to_bf16"] = r["weight_bytes"] / base["weight_bytes"]
            if r.get("peak_bytes") and base.get("peak_bytes"):
                r["peak_ratio_to_bf16"] = r["peak_bytes"] / base["peak_bytes"]
    return rows


# ---- report -----------------------------------------------------------------------------------------------


def _fmt_ms(r):
    return f"{r['ms']:.4f}" if "ms" in r else "error"


def _geomean_table(geo: dict, lowbit: list, title: str) -> list:
    if not geo:
        return []
    ms = sorted({int(m) for d in geo.values() for m in d})
    fp8 = {m: any("vs_fp8" in geo[i].get(str(m), {}) for i in geo) for m in ms}
    lines = ["", f"## Geometric mean speedup over the {title} block shapes (modulation excluded)", "",
             "| format | " + " | ".join(f"M={m} vs BF16" + (f" | M={m} vs FP8" if fp8[m] else "") for m in ms) + " |",
             "|---|" + "---:|" * sum(1 + fp8[m] for m in ms)]
    for impl in lowbit:
        if impl not in geo:
            continue
        cells = []
        for m in ms:
            d = geo[impl].get(str(m), {})
            cells.append(f"{d['vs_bf16']:.2f}x" if "vs_bf16" in d else "-")
            if fp8[m]:
                cells.append(f"{d['vs_fp8']:.2f}x" if "vs_fp8" in d else "-")
        lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict) -> str:
    env = result["env"]
    hw = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('threads')} threads)"
    lines = [f"# lowbit bench{' (--small)' if result['small'] else ''}", "",
             f"{hw}; torch {env['torch']}; triton {env['triton']}; kernels: {env['backend']}; {env['time_utc']}", "",
             *[f"- {n}" for n in result["notes"]], ""]
    rows = result["layers"]
    if rows:
        impls = list(dict.fromkeys(r["impl"] for r in rows if r["m"] is not None))
        lowbit = [i for i in impls if i not in BASELINES]
        lines += ["## Layers (median ms; x = speedup vs BF16, > 1 is faster)", "",
                  "| layer | N | K | M | " + " | ".join(impls) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(impls)]
        table = {(r["shape"], r["m"], r["impl"]): r for r in rows if r["m"] is not None}
        for (shape, m) in dict.fromkeys((r["shape"], r["m"]) for r in rows if r["m"] is not None):
            any_row = table[next(k for k in table if k[:2] == (shape, m))]
            cells = []
            for i in impls:
                r = table.get((shape, m, i))
                cell = "-" if r is None else _fmt_ms(r)
                if r is not None and "speedup_vs_bf16" in r:
                    cell += f" ({r['speedup_vs_bf16']:.2f}x)"
                cells.append(cell)
            lines.append(f"| {shape} | {any_row['n']} | {any_row['k']} | {m} | " + " | ".join(cells) + " |")
        for title, geo in [("FLUX.1", result["geomean"])] + [(k, v) for k, v in result.get("geomean_sets", {}).items()]:
            lines += _geomean_table(geo, lowbit, title)
        errors = [r for r in rows if "error" in r]
        if errors:
            lines += ["", "Errors: " + "; ".join(f"{r['shape']} M={r['m']} {r['impl']}: {r['error']}" for r in errors[:8])]
    for name in dict.fromkeys(r.get("model", "flux1-dev") for r in result["model"]):
        rows = [r for r in result["model"] if r.get("model", "flux1-dev") == name]
        lines += ["", f"## Whole transformer{'' if name == 'flux1-dev' else f' ({name})'}, one forward "
                      f"({rows[0]['tokens']} tokens)", "",
                  "| format | ms | latency / BF16 | weights GB | weights / BF16 | peak allocated GB |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            if "ms" not in r:
                lines.append(f"| {r['format']} | error: {r['error']} | | | | |")
                continue
            peak = "n/a" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 1e9:.2f}"
            lines.append(f"| {r['format']} | {r['ms']:.2f} | {r.get('latency_ratio_to_bf16', float('nan')):.2f} | "
                         f"{r['weight_bytes'] / 1e9:.3f} | {r.get('weight_ratio_to_bf16', float('nan')):.3f} | {peak} |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".lowbit-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_results(result: dict, out_dir: str, force: bool = False) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = os.path.join(out_dir, "bench.json"), os.path.join(out_dir, "bench.md")
    for p in paths:
        if os.path.exists(p) and not force:
            raise FileExistsError(f"{p} exists; pass --force to overwrite it")
    _write_atomic(paths[0], json.dumps(result, indent=1) + "\n")
    _write_atomic(paths[1], markdown(result))
    return paths


def run_bench(device=None, small=False, ms=None, formats=LAYER_FORMATS, model_formats=MODEL_FORMATS,
              warmup=None, runs=None, rank=RANK, layers=True, model=True, seed=0, log=print,
              shapes=None, models=("flux1-dev",)) -> dict:
    """Run the benchmark and return the result dict (see write_results / markdown). shapes: the layer shape sets
    (SHAPE_SETS; default flux1 and t5); models: the whole transformers (MODELS)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available on this machine; use --device cpu --small")
    if device.type != "cuda" and not small:
        raise ValueError(f"the full benchmark (FLUX.1-dev shapes, 12B-parameter model) needs a CUDA GPU; "
                         f"on {device} run it with --small")
    shapes = list(shapes or ("flux1", "t5"))
    for what, given, known in (("layer format", formats, LAYER_FORMATS), ("model format", model_formats, MODEL_FORMATS),
                               ("shape set", shapes, SHAPE_SETS), ("model", models, tuple(MODELS))):
        unknown = [v for v in given if v not in known]
        if unknown:
            raise ValueError(f"unknown {what} {unknown[0]!r}, expected some of {known}")
    config = SMALL_CONFIG if small else FLUX_DEV_CONFIG
    ms = tuple(ms or (SMALL_MS if small else FULL_MS))
    warmup = (1 if small else 5) if warmup is None else warmup
    runs = (3 if small else 20) if runs is None else runs
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    env = environment(device)
    notes = [f"median of {runs} runs after {warmup} warm-up runs"
             + (" (CUDA events)" if device.type == "cuda" else " (perf_counter)"),
             f"lowbit layers include activation quantization and the rank-{rank} low-rank branch (w4a16: none); "
             "packed tensors are random (no quantizer run)",
             "w4a4 = SVDQuant W4A4 (mlp.2 with unsigned activations), w4a16 = int4 weights / 16-bit activations "
             "(group 64), ternary = 1.58-bit weights / 16-bit activations, ternary_int8 = with int8 activations; "
             "w4a8f / ternary_f8 (models: *_fp8) = the same weights with fp8 (e4m3 per token) activations",
             "w4a8i (models: svdq_w4a4_int8, ternary_int8) = the same weights with int8 activations (per token after "
             "smoothing; W4A8 GEMM with per-group float rescale); w4a8ip (svdq_w4a4_int8p) = with progressive integer "
             "group scales (one float rescale after the K loop; weights changed: kernels.progressive_scales)",
             "mod.* (FLUX modulation) and t5.* (T5-XXL encoder, w4a16 only; 512 tokens per prompt) rows are left out "
             "of the geometric means"]
    if set(shapes) - {"flux1", "t5"}:
        notes.append("f2dev.* / f2k9b.*: FLUX.2 [dev] / [klein] 9B shapes (SiLU-gated MLPs: mlp.0 and linear1 twice "
                     "the MLP width, mlp.2 with signed activations; mod.* the three global modulations), one geometric "
                     "mean per model; mistral.* / qwen3_8b.*: FLUX.2's text encoders (Mistral 3 24B for [dev], Qwen3 8B "
                     "for [klein] 9B), w4a16 only, left out of the means")
    notes.append(f"M <= {GRAPH_MAX_M}: " + ("each call timed as a CUDA-graph replay, BF16 and lowbit alike (launch "
                                           "overhead excluded); larger M eagerly" if device.type == "cuda" else
                                           "eager (no CUDA graphs off CUDA)") + "; each row's 'timing' says which")
    if has_fp8(device):
        notes.append("fp8 = e4m3 row-wise torch._scaled_mm including the dynamic per-token activation "
                     "quantization; fp8_mm = the _scaled_mm call alone on pre-quantized operands; M padded to a "
                     "multiple of 16")
    else:
        notes.append("fp8: not measured (needs a CUDA GPU with sm_89 or newer)")
    result = {"version": 1, "small": small, "env": env, "config": config, "rank": rank, "notes": notes,
              "layers": [], "geomean": {}, "model": [], "shape_sets": shapes}
    if layers:
        log(f"layers on {env.get('gpu') or device} (kernels: {env['backend']})")
        rows = bench_layers(device, ms, formats, [s for name in shapes for s in shape_set(name, small)], warmup, runs,
                            rank, log)
        rows, result["geomean"] = speedups(rows)
        result["layers"] = rows
        sets = {name: speedups(rows, name)[1] for name in shapes if name in FLUX2_PREFIX}
        if sets:
            result["geomean_sets"] = sets
    if model:
        hw, txt = ((8, 8), 16) if small else ((64, 64), 512)
        cfgs = SMALL_MODELS if small else MODELS
        result["model_configs"] = {name: cfgs[name] for name in models}
        for name in models:
            c = cfgs[name]
            result["notes"].append(f"whole model {name}: {'reduced' if small else 'full-size'} transformer "
                                   f"(hidden {c['hidden_size']}, {c['depth']}+{c['depth_single_blocks']} blocks), seeded "
                                   f"random weights, batch 1, {hw[0] * hw[1]} image + {txt} text tokens")
        result["notes"].append("quantized models quantize one layer per distinct shape (quick data-free fit) and "
                               "reuse copies of its packed tensors, so outputs are not meaningful; modulation layers "
                               "are w4a16 in quantized models")
        for name in models:
            log(f"whole transformer {name} ({hw[0] * hw[1] + txt} tokens)")
            result["model"] += bench_model(device, cfgs[name], model_formats, hw, txt, warmup if small else 2,
                                           runs, rank, seed, log, name=name)
    return result
