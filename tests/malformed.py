"""Malformed lowbit checkpoints, one per class of damage, made from a valid tiny lowbit file: each case is
(name, edit, expected substrings of the one-line error). Used by the CLI tests (test_validation.py) and the
loader-node tests in headless ComfyUI (test_comfyui_validation.py)."""
import json
import struct

import torch
from safetensors import safe_open
from safetensors.torch import save_file

QKV = "double_blocks.0.img_attn.qkv"
NORM = "double_blocks.0.img_attn.norm.query_norm.scale"


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _edit_tensors(fn):
    def edit(sd, meta):
        fn(sd)
    return edit


def _edit_meta(key, fn):
    def edit(sd, meta):
        meta[key] = fn(meta[key])
    return edit


def _edit_layer(fn):
    def edit(sd, meta):
        layers = json.loads(meta["lowbit.layers"])
        fn(layers)
        meta["lowbit.layers"] = json.dumps(layers)
    return edit


def _edit_config(key, value):
    def edit(sd, meta):
        cfg = json.loads(meta["lowbit.config"])
        cfg[key] = value
        meta["lowbit.config"] = json.dumps(cfg)
    return edit


def _poke(key, index, value):
    def fn(sd):
        t = sd[key].clone()
        t.view(-1)[index] = value
        sd[key] = t
    return fn


def _set(key, value):
    def fn(sd):
        sd[key] = value(sd[key]) if callable(value) else value
    return fn


def _truncate(src, dst):
    data = open(src, "rb").read()
    open(dst, "wb").write(data[: len(data) * 2 // 3])


def _header_lies(src, dst):
    """The header says img_in.weight is twice as wide as the bytes it points at."""
    data = open(src, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["img_in.weight"]["shape"][1] *= 2
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    open(dst, "wb").write(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


FILE_CASES = {  # name -> (write(src, dst), expected)
    "truncated": (_truncate, ["truncated"]),
    "header-lies": (_header_lies, ["header", "disagree"]),
}

CASES = {  # name -> (edit(sd, meta), expected)
    "missing-16bit": (_edit_tensors(lambda sd: sd.pop("final_layer.linear.weight")),
                      ["final_layer.linear.weight", "missing"]),
    "misshaped-16bit": (_edit_tensors(_set("img_in.weight", lambda t: t[:, :32].contiguous())),
                        ["img_in.weight", "shape (256, 32)", "expected (256, 64)"]),
    "mistyped-16bit": (_edit_tensors(_set("img_in.weight", lambda t: t.to(torch.int32))),
                       ["img_in.weight", "torch.int32", "float"]),
    "extra-tensor": (_edit_tensors(_set("double_blocks.0.img_attn.extra", torch.zeros(4))),
                     ["unexpected tensor double_blocks.0.img_attn.extra"]),
    "missing-packed": (_edit_tensors(lambda sd: sd.pop(f"{QKV}.wscales")), [f"{QKV}.wscales", "missing"]),
    "misshaped-packed": (_edit_tensors(_set(f"{QKV}.weight", lambda t: t[:-128].contiguous())),
                         [f"{QKV}.weight", "expected the packed svdq_w4a4 weight uint8 (768, 128)"]),
    "mistyped-packed": (_edit_tensors(_set(f"{QKV}.weight", lambda t: t.view(torch.int8))),
                        [f"{QKV}.weight", "torch.int8", "uint8"]),
    "misshaped-scales": (_edit_tensors(_set(f"{QKV}.wscales", lambda t: t[:, :-1].contiguous())),
                         [f"{QKV}.wscales", "(4, 768)"]),
    "mistyped-scales": (_edit_tensors(_set(f"{QKV}.wscales", lambda t: t.float())), [f"{QKV}.wscales", "16-bit"]),
    "layers-list": (_edit_meta("lowbit.layers", lambda v: json.dumps(list(json.loads(v)))),
                    ["lowbit.layers", "JSON list, expected a JSON dict"]),
    "layers-not-json": (_edit_meta("lowbit.layers", lambda v: v[:-1]), ["lowbit.layers", "not JSON"]),
    "layer-entry-string": (_edit_layer(lambda d: d.__setitem__(QKV, "svdq_w4a4")), [QKV, "expected a JSON dict"]),
    "lying-in-features": (_edit_layer(lambda d: d[QKV].__setitem__("in_features", 512)),
                          [QKV, "in_features 512", "(768, 256)"]),
    "in-features-string": (_edit_layer(lambda d: d[QKV].__setitem__("in_features", "256")),
                           [QKV, "in_features", "positive int"]),
    "unknown-format": (_edit_layer(lambda d: d[QKV].__setitem__("format", "int3")), [QKV, "'int3'"]),
    "config-list": (_edit_meta("lowbit.config", lambda v: "[1, 2]"), ["lowbit.config", "JSON list"]),
    "config-bad-type": (_edit_config("depth", "2"), ["lowbit.config", "'depth'", "'2'"]),
    "config-lies": (_edit_config("depth", 3), ["double_blocks.2.", "missing"]),
    "version-0": (_edit_meta("lowbit.format_version", lambda v: "0"), ["format version 0"]),
    "version-newer": (_edit_meta("lowbit.format_version", lambda v: "99"), ["format version 99", "newer"]),
    "version-not-int": (_edit_meta("lowbit.format_version", lambda v: "one"), ["'one'", "integer"]),
    "bad-model": (_edit_meta("lowbit.model", lambda v: "unet"), ["lowbit.model", "'unet'"]),
    "nan-wscales": (_edit_tensors(_poke(f"{QKV}.wscales", 5, float("nan"))), [f"{QKV}.wscales", "NaN"]),
    "inf-smooth": (_edit_tensors(_poke(f"{QKV}.smooth", 0, float("inf"))), [f"{QKV}.smooth", "infinite"]),
    "nan-norm": (_edit_tensors(_poke(NORM, 1, float("nan"))), [NORM, "NaN"]),
    "inf-bias": (_edit_tensors(_poke("final_layer.linear.bias", 2, float("-inf"))), ["final_layer.linear.bias"]),
    "nan-embedder": (_edit_tensors(_poke("img_in.weight", 7, float("nan"))), ["img_in.weight", "NaN"]),
}
T5_CASES = {  # on a lowbit T5 (the text encoder loader)
    "t5-missing-norm": (_edit_tensors(lambda sd: sd.pop("encoder.final_layer_norm.weight")),
                        ["encoder.final_layer_norm.weight", "missing"]),
    "t5-nan-embedding": (_edit_tensors(_poke("shared.weight", 3, float("nan"))), ["shared.weight", "NaN"]),
    "t5-config-type": (_edit_config("d_model", "128"), ["lowbit.config", "'d_model'", "'128'"]),
}
GMOD = "single_stream_modulation.lin"
FLUX2_CASES = {  # on a lowbit tiny FLUX.2 (global modulation, no biases)
    "flux2-missing-global-mod": (_edit_tensors(lambda sd: sd.pop(f"{GMOD}.wscales")), [f"{GMOD}.wscales", "missing"]),
    "flux2-flux1-tensor": (_edit_tensors(_set("double_blocks.0.img_mod.lin.weight", torch.zeros(1536, 256))),
                           ["unexpected tensor double_blocks.0.img_mod.lin.weight"]),
    "flux2-image-model": (_edit_config("image_model", "flux3"), ["lowbit.config image_model", "'flux3'"]),
    "flux2-config-says-flux1": (_edit_config("image_model", "flux"), ["says out_features", "the flux config gives"]),
    "flux2-nan-global-mod": (_edit_tensors(_poke("double_stream_modulation_txt.lin.wscales", 2, float("nan"))),
                             ["double_stream_modulation_txt.lin.wscales", "NaN"]),
}
TE_CASES = {  # on a lowbit tiny FLUX.2 text encoder (Mistral-shaped)
    "te-missing-embedding": (_edit_tensors(lambda sd: sd.pop("model.embed_tokens.weight")),
                             ["model.embed_tokens.weight", "missing"]),
    "te-model-type": (_edit_config("model_type", "gemma3_4b"), ["model_type", "'gemma3_4b'", "mistral3_24b"]),
    "te-nan-norm": (_edit_tensors(_poke("model.layers.1.input_layernorm.weight", 3, float("nan"))),
                    ["model.layers.1.input_layernorm.weight", "NaN"]),
}
ALL = sorted(FILE_CASES) + sorted(CASES)


def write_case(name: str, src, dst) -> list:
    """Write malformed case `name` of the valid lowbit file `src` to `dst`; the expected error substrings."""
    src, dst = str(src), str(dst)
    if name in FILE_CASES:
        write, expected = FILE_CASES[name]
        write(src, dst)
        return expected
    edit, expected = {**CASES, **T5_CASES, **FLUX2_CASES, **TE_CASES}[name]
    sd, meta = _read(src)
    edit(sd, meta)
    save_file({k: v.contiguous() for k, v in sd.items()}, dst, metadata=meta)
    return expected
