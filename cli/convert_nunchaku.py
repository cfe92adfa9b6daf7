"""`lowbit convert-nunchaku`: a Nunchaku SVDQuant INT4 FLUX file -> a lowbit checkpoint."""
import json
import os


def add_parser(sub) -> None:
    p = sub.add_parser("convert-nunchaku", help="convert a Nunchaku SVDQuant INT4 FLUX checkpoint",
                       description="Convert a Nunchaku SVDQuant INT4 FLUX.1 single-file checkpoint "
                                   "(svdq-int4_r32-flux.1-*.safetensors) into a lowbit checkpoint with BFL/ComfyUI "
                                   "names (lossless: same weights, scales, smoothing and low-rank branches). "
                                   "NVFP4 (svdq-fp4) files and Nunchaku's legacy folder format are not supported.")
    p.add_argument("input", help="Nunchaku .safetensors file")
    p.add_argument("output", help="output lowbit .safetensors")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.set_defaults(run=run)


def run(args) -> int:
    import logging

    from ..checkpoint import check_output, convert_state_dict, read_nunchaku, save_checkpoint

    logging.basicConfig(format="lowbit convert-nunchaku: warning: %(message)s", level=logging.WARNING)

    size = os.path.getsize(args.input) if os.path.isfile(args.input) else 0
    # fail before the (long) read; the output is about the input's size (the fused single-block branches a bit more)
    check_output(args.output, [args.input], args.force, needed_bytes=int(1.1 * size))
    sd, meta = read_nunchaku(args.input)
    tensors, layers, config = convert_state_dict(sd, meta, source=args.input, consume=True)
    extra = {"lowbit.source": f"nunchaku:{os.path.basename(args.input)}"}
    if "quantization_config" in meta:
        extra["lowbit.args"] = json.dumps({"nunchaku_quantization_config": json.loads(meta["quantization_config"])})
    save_checkpoint(args.output, tensors, layers, "flux", config, force=args.force, extra_meta=extra)
    counts = {}
    for cfg in layers.values():
        counts[cfg["format"]] = counts.get(cfg["format"], 0) + 1
    print(f"{args.output}: flux ({', '.join(f'{n} {f}' for f, n in sorted(counts.items()))} layers; "
          f"{config['depth']} double + {config['depth_single_blocks']} single blocks) from {args.input}")
    return 0
