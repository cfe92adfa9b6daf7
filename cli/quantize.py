"""`lowbit quantize`: a 16-bit FLUX / T5 / CLIP-L file -> a lowbit checkpoint."""
import logging
import os
import sys

from ..checkpoint import DEFAULT_RANK
from ..quant_ops import ACT_FIT_STEPS, QUANT_FORMATS
from .args import device


def add_parser(sub) -> None:
    q = sub.add_parser("quantize", help="quantize a FLUX transformer or text encoder safetensors file",
                       description="Quantize a 16-bit (or fp8) FLUX.1 / FLUX.2 transformer (BFL/ComfyUI or diffusers "
                                   "names) or text encoder (T5-XXL, CLIP-L, FLUX.2's Mistral 3 / Qwen3) into a lowbit "
                                   "checkpoint; which layer gets which format is its model family's "
                                   "(checkpoint/families.py; `lowbit inspect --plan` shows the sizes first).")
    q.add_argument("input", help="input .safetensors (FLUX.1 / FLUX.2 transformer, T5, CLIP-L, Mistral 3 or Qwen3 "
                                 "encoder), a sharded model's *.safetensors.index.json, or a diffusers transformer/ "
                                 "folder")
    q.add_argument("output", help="output .safetensors (lowbit checkpoint)")
    q.add_argument("--format", required=True, choices=QUANT_FORMATS,
                   help="block format for FLUX: svdq_w4a4 (4-bit weights and activations + low-rank branch), "
                        "ternary (1.58-bit weights + low-rank branch) or w4a16 (4-bit weights only); "
                        "modulation layers are always w4a16; text encoders are always w4a16")
    q.add_argument("--rank", type=int, default=None,
                   help=f"low-rank branch rank (default: {DEFAULT_RANK['svdq_w4a4']} for svdq_w4a4, "
                        f"{DEFAULT_RANK['ternary']} for ternary)")
    q.add_argument("--calib", metavar="STATS", default=None,
                   help="calibration file (from the LowBit calibration nodes); data-free without it. A file with "
                        "input samples (version 2) turns on the calibrated quantizers and the per-layer held-out "
                        "error report; a version 1 file (input ranges only) tunes the smoothing only")
    q.add_argument("--calib-tokens", type=int, default=None, metavar="N",
                   help="use at most N sampled input rows per layer (default: all in the file; 1 in 8 is held out "
                        "to measure). Memory while quantizing: one layer's rows at a time, N x K x 4 bytes")
    q.add_argument("--no-gptq", dest="gptq", action="store_false",
                   help="calibrated: round to nearest instead of GPTQ error-compensating rounding")
    q.add_argument("--no-whiten", dest="whiten", action="store_false",
                   help="calibrated: fit the low-rank branch to the weight error, not the activation-weighted error")
    q.add_argument("--no-fit-scales", dest="fit_scales", action="store_false",
                   help="calibrated ternary: per-row scales by weight least squares, not activation-weighted")
    q.add_argument("--act-fit", type=int, default=ACT_FIT_STEPS, metavar="STEPS",
                   help=f"calibrated svdq_w4a4: steps of training the smoothing vector and low-rank branch against the "
                        f"layer's output error with its int4 activations simulated (default {ACT_FIT_STEPS}; 0: off). "
                        f"Per layer about STEPS x 6 x tokens x N x K flops, memory a few copies of the weight in fp32")
    q.add_argument("--refine", type=int, default=0, metavar="STEPS",
                   help="FLUX svdq_w4a4 / ternary: after quantizing, block-wise reconstruction: per transformer block, "
                        "in order, STEPS Adam steps adjust the quantized layers' scales, low-rank branches and biases "
                        "(codes untouched) so that the block's output matches the 16-bit block's on the calibration "
                        "file's block inputs (LowBit Calibrate, block_inputs > 0). Time: about 3 x STEPS block "
                        "forward passes per block (tiny FLUX on a CPU: seconds; FLUX.1-dev on one GPU: estimated "
                        "10-20 minutes at 100 steps, not measured). Memory: the quantized checkpoint, one 16-bit block "
                        "in fp32 and two copies of the block inputs (FLUX.1-dev 1024x1024: about 60 MB per input)")
    q.add_argument("--device", type=device, default="cpu", help="device to quantize on: cpu or cuda (default cpu)")
    q.add_argument("--group-size", type=int, choices=(64, 128), default=64,
                   help="group size of the w4a16 layers (default 64)")
    q.add_argument("--max-size", type=float, default=None, metavar="GB",
                   help="size budget of OUTPUT in GB (1e9 bytes): each quantizable layer takes the --format, w4a16 or "
                        "16-bit, chosen by measured error per byte (held-out error on --calib samples where there are "
                        "any, else on seeded random inputs), the best quality that fits; every layer is measured in "
                        "each candidate format first (about twice the time). `lowbit inspect OUTPUT` shows the plan")
    q.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    q.set_defaults(run=run_quantize)


def gb(n: int, digits: int = 3) -> str:
    return f"{n / 1e9:.{digits}f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def run_quantize(args) -> int:
    from tqdm import tqdm

    from ..checkpoint import quantize_file

    rank = DEFAULT_RANK[args.format] if args.rank is None else args.rank
    if rank < 0:
        raise ValueError(f"--rank must be >= 0, got {rank}")
    if args.calib_tokens is not None and args.calib_tokens < 1:
        raise ValueError(f"--calib-tokens must be >= 1, got {args.calib_tokens}")
    if args.refine < 0:
        raise ValueError(f"--refine must be >= 0, got {args.refine}")
    if args.refine:
        if args.format == "w4a16":
            raise ValueError("--refine applies to svdq_w4a4 and ternary FLUX checkpoints, not w4a16")
        from ..checkpoint import CalibrationFile

        CalibrationFile(args.calib).check_block_inputs()  # before hours of quantization, not after
    if args.act_fit < 0:
        raise ValueError(f"--act-fit must be >= 0, got {args.act_fit}")
    if args.max_size is not None and not args.max_size > 0:
        raise ValueError(f"--max-size must be > 0 GB, got {args.max_size}")
    max_bytes = None if args.max_size is None else int(round(args.max_size * 1e9))
    options = {"gptq": args.gptq, "whiten": args.whiten}
    if args.format == "ternary":
        options["fit_scales"] = args.fit_scales
    else:
        options["act_fit"] = args.act_fit
    options = None if args.format == "w4a16" else options
    logging.basicConfig(format="lowbit quantize: warning: %(message)s", level=logging.WARNING)
    bar = None

    def progress(done, total):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="layer", desc=os.path.basename(args.output), file=sys.stderr)
        bar.update(done - bar.n)

    try:
        s = quantize_file(args.input, args.output, args.format, rank=rank, calib=args.calib, progress=progress,
                          force=args.force, device=args.device, group_size=args.group_size, options=options,
                          calib_tokens=args.calib_tokens, max_bytes=max_bytes)
    except BaseException:
        if bar is not None:  # clear the bar so that the error is the one line left
            bar.leave = False
            bar.close()
        raise
    if bar is not None:
        bar.close()
    if args.refine and s["model"] != "flux":
        logging.warning("%s: --refine applies to FLUX transformers only; not refined", args.input)
    elif args.refine:
        print_refine(run_refine(args, s["dst"]), args.refine)
    # the same layers the progress bar counted: quantized ones and those kept in 16 bits
    counts = ", ".join([f"{n} {f}" for f, n in sorted(s["layer_counts"].items())] + [f"{s['layers_16bit']} 16-bit"])
    print(f"{s['dst']}: {s['model']}, {s['layers_total']} layers ({counts}); input {gb(s['input_bytes'])}, output "
          f"{gb(s['output_bytes'])}, {s['ratio']:.2f}x smaller; {s['seconds']:.1f} s")
    print_layer_errors(s["layer_errors"])
    if s.get("plan"):
        print_plan(s["plan"], s["output_bytes"])
    return 0


def run_refine(args, path) -> dict:
    from tqdm import tqdm

    from ..flux_model import refine_flux_checkpoint

    with tqdm(unit="block", desc="refine", file=sys.stderr) as bar:
        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)
        return refine_flux_checkpoint(path, args.input, args.calib, args.refine, device=args.device, progress=progress)


def print_refine(r: dict, steps: int) -> None:
    print(f"block-wise refinement ({steps} steps per block, {r['block_inputs']} block inputs, {r['seconds']:.1f} s): "
          f"relative output error per block, before -> after")
    for name, before, after in r["blocks"]:
        print(f"  {name:40s} {before:.4f} -> {after:.4f}")


def print_plan(plan: dict, size: int, family=None, block_fmt=None) -> None:
    """A budgeted checkpoint's plan (lowbit.plan): budget, formats chosen, its error against the uniform plans,
    and the layers whose format differs from the family's plan (with family and block_fmt)."""
    counts = {}
    for fmt, _ in plan["layers"].values():
        counts[fmt] = counts.get(fmt, 0) + 1
    print(f"size budget {gb(plan['max_bytes'])}: file {gb(size)}; layers "
          + ", ".join(f"{n} {f}" for f, n in sorted(counts.items())) + f"; plan error {plan['error']:.4f}"
          + (f" ({plan['picked']})" if plan.get("picked") != "greedy" else ""))
    print(f"  metric: {plan['metric']}")
    for name, u in plan["uniform"].items():
        print(f"  uniform {name:<36} {gb(u['bytes']):>10}  error {u['error']:.4f}  {'fits' if u['fits'] else 'does not fit'}")
    if family is None:
        return
    moved = [(layer, fmt, opts) for layer, (fmt, opts) in plan["layers"].items()
             if fmt != (family.layer_format(layer, block_fmt) or "16-bit")]
    if moved:
        print(f"  layers not in the format's own plan ({len(moved)}): format, bytes, error (other candidates)")
    for layer, fmt, opts in moved:
        others = ", ".join(f"{f} {e:.4f}" for f, (_, e) in opts.items() if f != fmt)
        print(f"    {layer:40s} {fmt:<10} {gb(opts[fmt][0]):>10} {opts[fmt][1]:.4f} ({others})")


def print_layer_errors(errors: dict) -> None:
    """Per-layer relative output error on the held-out calibration rows, then the median and the worst."""
    if not errors:
        return
    print("relative output error per layer on held-out calibration inputs:")
    for layer, e in errors.items():
        print(f"  {layer:40s} {e:.4f}")
    vals = sorted(errors.values())
    worst = max(errors, key=errors.get)
    print(f"  median {vals[len(vals) // 2]:.4f}, worst {errors[worst]:.4f} ({worst}), {len(vals)} layers")
