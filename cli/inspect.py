"""`lowbit inspect`: what a lowbit checkpoint holds (format version, layers per format, sizes)."""
import os

from .quantize import gb


def add_parser(sub) -> None:
    i = sub.add_parser("inspect", help="show what a lowbit checkpoint holds",
                       description="Format version, quantized layers per format, parameter count and sizes.")
    i.add_argument("file", help="lowbit .safetensors checkpoint")
    i.set_defaults(run=run_inspect)


def run_inspect(args) -> int:
    from ..checkpoint import load_checkpoint, logical_size

    sd, info = load_checkpoint(args.file)  # NotALowbitCheckpoint (a ValueError) -> one line, exit 1
    params, bf16 = logical_size(sd, info)
    size = os.path.getsize(args.file)
    print(f"file:            {args.file}")
    print(f"lowbit format:   version {info.format_version}, model {info.model}")
    for fmt, n in sorted(info.format_counts().items()):
        print(f"  {fmt:<14} {n} layers")
    n16 = len({k.rpartition('.')[0] for k in sd} - set(info.layers))
    print(f"  {'16-bit':<14} {n16} layers/tensor groups")
    print(f"parameters:      {params / 1e6:.2f} M")
    print(f"size on disk:    {gb(size)}")
    print(f"BF16 copy:       {gb(bf16)} ({bf16 / max(size, 1):.2f}x the size on disk)")
    if info.config:
        keys = ("hidden_size", "depth", "depth_single_blocks", "guidance_embed") if info.model == "flux" else \
            ("d_model", "num_layers", "num_heads", "d_ff")
        print("config:          " + ", ".join(f"{k}={info.config[k]}" for k in keys if k in info.config))
    for k in ("lowbit.source", "lowbit.args"):
        if k in info.metadata:
            print(f"{k[7:]:<8}         {info.metadata[k]}")
    return 0
