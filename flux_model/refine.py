"""Block-wise refinement of a lowbit FLUX checkpoint (`lowbit quantize --refine STEPS`): block by block in model
order, the quantized block's scales, low-rank branches and biases (codes fixed) are trained so that its output
matches the 16-bit block's, on the first-block inputs recorded in the calibration file carried through the
earlier blocks (16-bit inputs for the targets, the refined quantized blocks' outputs for the quantized path).
FLUX.2: the blocks take the global modulation's outputs, computed from the recorded vec by the 16-bit modulation
for the targets and by the checkpoint's (w4a16) one for the quantized path."""
import json
import time

import torch

from ..checkpoint import META_VERSION, CalibrationFile, FluxSource, load_checkpoint, read_info, save_checkpoint
from ..quant_ops import REFINE_FORMATS, REFINE_LR, REFINE_TENSORS, refine_block
from .loading import flux_from_state_dict, flux_state_dict
from .model import DoubleStreamBlock, Modulation, SingleStreamBlock

_CORE_META = (META_VERSION, "lowbit.model", "lowbit.layers", "lowbit.config")


def _run_double(block, inp):
    img, txt, vec, pe = inp
    return torch.cat(block(img, txt, vec, pe), dim=1)


def _run_single(block, inp):
    x, vec, pe = inp
    return block(x, vec, pe)


def _reference_block(cls, config, tensors, device):
    h = config["hidden_size"]
    blk = cls(h, config["num_heads"], int(h * config["mlp_ratio"]), config["qkv_bias"], dtype=torch.float32,
              flux2=config.get("image_model") == "flux2")
    blk.load_state_dict(tensors, strict=True)
    return blk.to(device).eval()


@torch.no_grad()
def _modulations(config, source, model, vecs, device):
    """[(double-block vec, single-block vec)] per recorded vec for the 16-bit path and the quantized path: the vec
    itself twice (FLUX.1), or the global modulation's outputs (FLUX.2)."""
    if config.get("image_model") != "flux2":
        return [(v, v) for v in vecs], [(v, v) for v in vecs]
    h = config["hidden_size"]
    ref = {}
    for name, n in (("double_stream_modulation_img", 6), ("double_stream_modulation_txt", 6),
                    ("single_stream_modulation", 3)):
        ref[name] = Modulation(h, n, dtype=torch.float32, bias=False)
        ref[name].load_state_dict(source.tensors(name + "."), strict=True)
        ref[name].to(device).eval()
    fp = [((ref["double_stream_modulation_img"](v.float()), ref["double_stream_modulation_txt"](v.float())),
           ref["single_stream_modulation"](v.float())) for v in vecs]
    return fp, [model.modulations(v) for v in vecs]


@torch.no_grad()
def _outputs(block, run, inputs):
    return [run(block, inp) for inp in inputs]


def refine_flux_checkpoint(path: str, src: str, calib: str, steps: int, device="cpu", lr: float = REFINE_LR,
                           progress=None, train=REFINE_TENSORS, formats=REFINE_FORMATS) -> dict:
    """Refine the lowbit FLUX checkpoint at `path` (quantized from `src`) in place, atomically.
    progress(done, total) after every block. Returns {"blocks": [(name, error before, error after)], "seconds"}.
    Trains with autograd even when called under torch.inference_mode (ComfyUI nodes)."""
    with torch.inference_mode(False):
        return _refine(path, src, calib, steps, device, lr, progress, train, formats)


def _refine(path, src, calib, steps, device, lr, progress, train, formats):
    t0 = time.time()
    if steps < 1:
        raise ValueError(f"refine steps must be >= 1, got {steps}")
    info = read_info(path)
    if info.model != "flux":
        raise ValueError(f"{path}: block-wise refinement is for FLUX transformers, this is a {info.model!r} checkpoint")
    items = CalibrationFile(calib).block_inputs()
    source = FluxSource(src)
    sd, info = load_checkpoint(path, device=device)
    config = info.config
    model = flux_from_state_dict(sd, config, info.layers).eval()
    txt_len = items[0]["txt"].shape[1]
    fp, vecs = [], []
    for it in items:
        img, txt, vec = (it[k].to(device) for k in ("img", "txt", "vec"))
        pe = (it["pe_cos"].to(device), it["pe_sin"].to(device))
        fp.append((img, txt, vec, pe))
        vecs.append(vec)
    fp_mod, q_mod = _modulations(config, source, model, vecs, device)
    q = [(i, t, m[0], pe) for (i, t, _, pe), m in zip(fp, q_mod)]
    fp = [(i, t, m[0], pe) for (i, t, _, pe), m in zip(fp, fp_mod)]
    blocks = [(f"double_blocks.{i}", b, DoubleStreamBlock, _run_double) for i, b in enumerate(model.double_blocks)]
    blocks += [(f"single_blocks.{i}", b, SingleStreamBlock, _run_single) for i, b in enumerate(model.single_blocks)]
    report = []
    for done, (name, block, cls, run) in enumerate(blocks, 1):
        if name == "single_blocks.0":  # the single blocks read [txt, img] as one sequence
            fp = [(torch.cat([t, i], 1), m[1], pe) for (i, t, _, pe), m in zip(fp, fp_mod)]
            q = [(torch.cat([t, i], 1), m[1], pe) for (i, t, _, pe), m in zip(q, q_mod)]
        ref = _reference_block(cls, config, source.tensors(name + "."), device)
        targets = _outputs(ref, run, fp)
        del ref
        before, after = refine_block(block, run, q, targets, steps, lr, train, formats)
        outs = _outputs(block, run, q)
        report.append((name, before, after))
        if cls is DoubleStreamBlock:
            n_img = fp[0][0].shape[1]
            fp = [(t[:, :n_img], t[:, n_img:], *inp[2:]) for t, inp in zip(targets, fp)]
            q = [(o[:, :n_img], o[:, n_img:], *inp[2:]) for o, inp in zip(outs, q)]
        else:
            fp = [(t, *inp[1:]) for t, inp in zip(targets, fp)]
            q = [(o, *inp[1:]) for o, inp in zip(outs, q)]
        if progress is not None:
            progress(done, len(blocks))
    tensors, layers = flux_state_dict(model)
    meta = {k: v for k, v in info.metadata.items() if k not in _CORE_META}
    meta["lowbit.refine"] = json.dumps({"steps": steps, "block_inputs": len(items), "txt_tokens": txt_len})
    save_checkpoint(path, {k: v.cpu() for k, v in tensors.items()}, layers, "flux", config, force=True, extra_meta=meta)
    return {"blocks": report, "seconds": time.time() - t0, "block_inputs": len(items)}
