"""`lowbit inspect`: what a lowbit checkpoint holds (family, format version, layers per format, sizes), or with
--plan what a checkpoint will weigh per format, from the real shapes of a 16-bit file or of a known model."""
import math
import os

from .quantize import gb

PLAN_FORMATS = {False: (("svdq_w4a4", None), ("ternary", None), ("ternary", 0), ("w4a16", None)),
                True: (("w4a16", None),)}  # text encoders: weight-only


def add_parser(sub) -> None:
    i = sub.add_parser("inspect", help="show what a lowbit checkpoint holds, or what one will weigh (--plan)",
                       description="Model family, format version, quantized layers per format, parameter count and "
                                   "sizes of a lowbit checkpoint. With --plan: the size of the checkpoint per format, "
                                   "computed from tensor shapes only - of FILE (a 16-bit FLUX / text-encoder "
                                   "safetensors file, shard index or diffusers folder; its header is read, not its "
                                   "weights), of a known model (e.g. flux2:dev, flux2:klein-9b, flux2_te:mistral3-24b), "
                                   "or of every known model without an argument.")
    i.add_argument("file", nargs="?", help="lowbit .safetensors checkpoint; with --plan a 16-bit model file or a "
                                           "known model name")
    i.add_argument("--plan", action="store_true", help="print what the checkpoint will weigh per format")
    i.add_argument("--rank", type=int, default=None, help="--plan: low-rank branch rank (default: 32 for "
                                                          "svdq_w4a4, 64 for ternary, as lowbit quantize)")
    i.add_argument("--group-size", type=int, choices=(64, 128), default=64, help="--plan: w4a16 group size")
    i.add_argument("--max-size", type=float, default=None, metavar="GB",
                   help="--plan: whether a size budget (lowbit quantize --max-size) can be met: the smallest and the "
                        "largest checkpoint a budget can choose per format (which layers get what needs the "
                        "measurements of lowbit quantize --max-size; `lowbit inspect` of its output shows them)")
    i.set_defaults(run=run_inspect)


def run_inspect(args) -> int:
    if args.plan:
        return run_plan(args)
    if args.file is None:
        raise ValueError("give a lowbit checkpoint to inspect (or --plan for sizes)")
    from ..checkpoint import load_checkpoint, logical_size

    sd, info = load_checkpoint(args.file)  # NotALowbitCheckpoint (a ValueError) -> one line, exit 1
    params, bf16 = logical_size(sd, info)
    size = os.path.getsize(args.file)
    print(f"file:            {args.file}")
    print(f"lowbit format:   version {info.format_version}, model {info.model} ({info.family.title})")
    for fmt, n in sorted(info.format_counts().items()):
        print(f"  {fmt:<14} {n} layers")
    n16 = len({k.rpartition('.')[0] for k in sd} - set(info.layers))
    print(f"  {'16-bit':<14} {n16} layers/tensor groups")
    print(f"parameters:      {params / 1e6:.2f} M")
    print(f"size on disk:    {gb(size)}")
    print(f"BF16 copy:       {gb(bf16)} ({bf16 / max(size, 1):.2f}x the size on disk)")
    if info.config:
        keys = {"flux": ("image_model", "hidden_size", "depth", "depth_single_blocks", "context_in_dim", "guidance_embed"),
                "llm": ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")}.get(
            info.model, ("d_model", "num_layers", "num_heads", "d_ff"))
        print("config:          " + ", ".join(f"{k}={info.config[k]}" for k in keys if k in info.config))
    for k in ("lowbit.source", "lowbit.args"):
        if k in info.metadata:
            print(f"{k[7:]:<8}         {info.metadata[k]}")
    if "lowbit.plan" in info.metadata:
        import json

        from .quantize import print_plan

        try:
            args = json.loads(info.metadata.get("lowbit.args", "{}"))
            print_plan(json.loads(info.metadata["lowbit.plan"]), size, info.family, args.get("format"))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            print(f"plan:            unreadable lowbit.plan metadata ({type(e).__name__}: {e})")
    return 0


def _targets(args):
    """[(title, family, config)] the plan is for."""
    from ..checkpoint.families import FAMILIES, find_variant

    if args.file is None:
        return [(v.title, f, v.config) for f in FAMILIES.values() for v in f.variants]
    if not os.path.exists(args.file) and not args.file.endswith((".safetensors", ".json")):
        fam, var = find_variant(args.file)
        return [(var.title, fam, var.config)]
    from ..checkpoint import inspect_source

    _, config, fam = inspect_source(args.file)
    return [(f"{os.path.basename(os.path.normpath(args.file))} ({fam.title})", fam, config)]


def plan_rows(fam, config, rank=None, group_size=64) -> list:
    """[(label, bytes, quantized layers, bytes of the 16-bit part)]: BF16, then each format the family takes."""
    from ..checkpoint.families import DEFAULT_RANK

    bf16 = 2 * sum(r["params"] for r in fam.plan(config, "w4a16").values())
    rows = [("BF16", bf16, 0, bf16)]
    for fmt, fixed in PLAN_FORMATS[fam.text_encoder]:
        r = fixed if fixed is not None else DEFAULT_RANK[fmt] if rank is None else rank
        p = fam.plan(config, fmt, r, group_size)
        label = f"{fmt} g{group_size}" if fmt == "w4a16" else f"{fmt} r{r}"
        rows.append((label, sum(v["bytes"] for v in p.values()),
                     sum(v["layers"] for k, v in p.items() if k != "16-bit"), p.get("16-bit", {}).get("bytes", 0)))
    return rows


def run_plan(args) -> int:
    print("Checkpoint sizes from tensor shapes (tensor bytes; 1 GB = 1e9 bytes). Block linears take the format, "
          "modulation linears w4a16, embedders / norms / embeddings 16-bit.")
    for title, fam, config in _targets(args):
        print(f"\n{title}")
        print(f"  {'format':<16} {'size':>10} {'vs BF16':>8} {'quantized layers':>17} {'16-bit part':>12}")
        rows = plan_rows(fam, config, args.rank, args.group_size)
        for label, size, n, b16 in rows:
            print(f"  {label:<16} {gb(size, 2):>10} {rows[0][1] / size:>7.2f}x {n:>17} {gb(b16, 2):>12}")
        if args.max_size is not None:
            print_budget_range(fam, config, args.rank, args.group_size, args.max_size)
    return 0


def budget_range(fam, config, fmt, rank=None, group_size=64) -> tuple:
    """(smallest, largest) checkpoint bytes a size budget can choose with block format `fmt`: every quantizable
    layer in its smallest candidate (block format, w4a16 or 16-bit), or all 16-bit."""
    from ..checkpoint import budget
    from ..checkpoint.families import DEFAULT_RANK

    rank = DEFAULT_RANK[fmt] if rank is None else rank
    shapes = fam.layout.expected_shapes(config)
    low = high = 0
    for key, shape in shapes.items():
        layer, _, end = key.rpartition(".")
        cands = budget.candidates(fam, layer, fmt) if end == "weight" and len(shape) == 2 else []
        if end == "bias" and budget.candidates(fam, layer, fmt):
            continue
        if not cands:
            low, high = low + 2 * math.prod(shape), high + 2 * math.prod(shape)
            continue
        bias = f"{layer}.bias" in shapes
        sizes = [budget.option_bytes(f, *shape, rank, group_size, bias) for f in cands]
        low, high = low + min(sizes), high + max(sizes)
    return low, high


def print_budget_range(fam, config, rank, group_size, max_gb) -> None:
    for fmt, _ in PLAN_FORMATS[fam.text_encoder][:2 if not fam.text_encoder else 1]:
        low, high = budget_range(fam, config, fmt, rank, group_size)
        verdict = ("below the smallest: refused" if max_gb * 1e9 < low else
                   "all 16-bit fits" if max_gb * 1e9 >= high else "a mix fits")
        print(f"  --max-size {max_gb:g} GB with {fmt}: a budget chooses between {gb(low, 2)} and {gb(high, 2)}; {verdict}")
