"""`lowbit bench`: layer and whole-model latency vs BF16 / FP8 (the harness is cli/benchmark.py)."""
import argparse
import sys

from .args import device
from .benchmark import LAYER_FORMATS, MODEL_FORMATS, MODELS, RANK, SHAPE_SETS


def _csv(kind, allowed=None):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if allowed is not None:
            bad = [t for t in items if t not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad[0]!r}, expected some of {','.join(allowed)}")
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
    return parse


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the lowbit layers and a whole FLUX transformer against BF16",
                       description="Latency of every FLUX.1-dev linear shape (W4A4, W4A16, ternary, ternary with "
                                   "int8 activations, each with its activation quantization and low-rank branch) "
                                   "against F.linear BF16 and row-wise FP8 (with and without its activation "
                                   "quantization), M <= 64 as CUDA-graph replays on both sides, and of one forward of "
                                   "a FLUX.1-dev-shaped transformer (random weights) at 1024x1024; FLUX.2 [dev] / "
                                   "[klein] 9B shapes and transformers with --shapes / --models. Needs a CUDA GPU "
                                   "unless --small.")
    p.add_argument("--small", action="store_true",
                   help="reduced shapes and model (hidden 256), a few runs: runs anywhere (CPU: reference kernels)")
    p.add_argument("--out", metavar="DIR", default=None, help="write DIR/bench.json and DIR/bench.md")
    p.add_argument("--force", action="store_true", help="overwrite existing bench.json / bench.md in --out")
    p.add_argument("--device", type=device, default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--m", type=_csv(int), default=None, metavar="M,M,...",
                   help="token counts for the layer benchmark (default 1,256,512,4608,9216; --small: 1,64)")
    p.add_argument("--formats", type=_csv(str, LAYER_FORMATS), default=list(LAYER_FORMATS), metavar="F,F,...",
                   help=f"layer formats (default {','.join(LAYER_FORMATS)})")
    p.add_argument("--model-formats", type=_csv(str, MODEL_FORMATS), default=list(MODEL_FORMATS), metavar="F,F,...",
                   help=f"whole-model formats (default {','.join(MODEL_FORMATS)})")
    p.add_argument("--shapes", type=_csv(str, SHAPE_SETS), default=["flux1", "t5"], metavar="SET,SET,...",
                   help=f"layer shape sets (default flux1,t5; of {','.join(SHAPE_SETS)}: FLUX.2 [dev], [klein] 9B "
                        f"and FLUX.2's text encoders)")
    p.add_argument("--models", type=_csv(str, tuple(MODELS)), default=["flux1-dev"], metavar="NAME,NAME,...",
                   help=f"whole transformers (default flux1-dev; of {','.join(MODELS)}; flux2-dev's BF16 weights "
                        f"are 64 GB)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per measurement, median reported (default 20; --small 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 5; --small 1)")
    p.add_argument("--rank", type=int, default=RANK, help=f"low-rank branch rank (default {RANK})")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer benchmark")
    p.add_argument("--no-model", action="store_true", help="skip the whole-transformer benchmark")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def check_args(args) -> None:
    """Everything the run would only find out at its end (or measure as nothing), refused before it starts."""
    import os

    if args.no_layers and args.no_model:
        raise ValueError("--no-layers and --no-model together leave nothing to measure; drop one of them")
    for flag, values, what in (("--m", args.m, "token counts"), ("--formats", args.formats, "layer formats"),
                               ("--model-formats", args.model_formats, "model formats")):
        if values is not None and not values:
            raise ValueError(f"{flag}: empty; give one or more comma-separated {what}")
    bad = [m for m in args.m or () if m < 1]
    if bad:
        raise ValueError(f"--m: token counts must be >= 1, got {bad[0]}")
    if args.rank < 0:
        raise ValueError(f"--rank must be >= 0 (0: no low-rank branch), got {args.rank}")
    if args.runs is not None and args.runs < 1:
        raise ValueError(f"--runs must be >= 1, got {args.runs}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if not args.out:
        return
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise NotADirectoryError(f"--out {args.out}: is a file, expected a folder (bench.json and bench.md go in it)")
    for name in ("bench.json", "bench.md"):
        path = os.path.join(args.out, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise FileExistsError(f"{path}: exists and is not a regular file; choose another --out folder")
        if os.path.exists(path) and not args.force:
            raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    parent = os.path.abspath(args.out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"--out {args.out}: {parent} is a file, so the folder cannot be made")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {args.out}: cannot write to {parent}")


def run(args) -> int:
    from .benchmark import markdown, run_bench, write_results

    check_args(args)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    result = run_bench(device=args.device, small=args.small, ms=args.m, formats=args.formats,
                       model_formats=args.model_formats, warmup=args.warmup, runs=args.runs, rank=args.rank,
                       layers=not args.no_layers, model=not args.no_model, seed=args.seed, log=log,
                       shapes=args.shapes, models=args.models)
    if args.out:
        for path in write_results(result, args.out, force=args.force):
            log(f"wrote {path}")
    print(markdown(result), end="")
    return 0
