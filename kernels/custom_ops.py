"""The kernel ops as PyTorch custom operators (torch.ops.lowbit.*): what torch.compile sees of them.

Dynamo records a call as one opaque node (no graph break) whose fake implementation gives the output shapes,
dtypes and strides; Inductor neither traces into it nor fuses across it. At run time the node calls the dispatched
kernel on the real tensors (backend_for then, so LOWBIT_BACKEND, set_backend and the loader's per-model backend
still decide), exactly as an eager call does. Only compiled code calls them: eager calls skip the dispatcher
(kernels/__init__.py).

The schemas take every argument positionally under the reference's names; None tensors are `Tensor?`;
quantize_act_int4's `unsigned` (a bool or a channel index) travels as its channel index, and a missing low-rank
result (no proj_down) as an empty (M, 0) tensor. Outputs have one layout whatever the backend (the fake
implementations state it): standard contiguous strides, except quantize_act_int4's scales, which are group-major
(a transposed (G, M) tensor, the layout the Triton GEMM reads).
"""
import inspect
import itertools
import logging

import torch

from . import reference
from .dispatch import backend_for

F32 = torch.float32
AVAILABLE = hasattr(torch.library, "custom_op")  # torch >= 2.4

_GEMM = "Tensor? lr, Tensor? proj_up, Tensor? bias, ScalarType out_dtype"
_QUANT = "-> (Tensor, Tensor, Tensor)"
SCHEMAS = {
    "lora_down": "(Tensor x, Tensor proj_down) -> Tensor",
    "quantize_act_int4": f"(Tensor x, Tensor? smooth, Tensor? proj_down, int group_size, int unsigned) {_QUANT}",
    "quantize_act_int8": f"(Tensor x, Tensor? proj_down, Tensor? smooth) {_QUANT}",
    "quantize_act_fp8": f"(Tensor x, Tensor? smooth, Tensor? proj_down) {_QUANT}",
    "w4a4_gemm": f"(Tensor qx, Tensor ascales, Tensor qweight, Tensor wscales, {_GEMM}) -> Tensor",
    "w4a8_gemm": f"(Tensor qx, Tensor xscales, Tensor qweight, Tensor wscales, {_GEMM}, Tensor? s0) -> Tensor",
    "w4a16_gemm": "(Tensor x, Tensor qweight, Tensor wscales, Tensor? wzeros, Tensor? bias, ScalarType? out_dtype, "
                  "Tensor? lr, Tensor? proj_up) -> Tensor",
    "ternary_gemm": "(Tensor x, Tensor qweight, Tensor wscales, Tensor? lr, Tensor? proj_up, Tensor? bias, "
                    "ScalarType? out_dtype) -> Tensor",
    "ternary_int8_gemm": f"(Tensor qx, Tensor xscales, Tensor qweight, Tensor wscales, {_GEMM}) -> Tensor",
    "int4_fp8_gemm": f"(Tensor qx, Tensor xscales, Tensor qweight, Tensor wscales, {_GEMM}) -> Tensor",
    "ternary_fp8_gemm": f"(Tensor qx, Tensor xscales, Tensor qweight, Tensor wscales, {_GEMM}) -> Tensor",
}
QUANTIZE = ("quantize_act_int4", "quantize_act_int8", "quantize_act_fp8")
# the public (reference) signature of each op: parameter names in order, defaults
PARAMS = {name: [(p.name, p.default) for p in inspect.signature(getattr(reference, name)).parameters.values()]
          for name in SCHEMAS}
PROJ_DOWN = {name: [n for n, _ in PARAMS[name]].index("proj_down") for name in QUANTIZE}


def _strides(shape) -> tuple:
    """torch's contiguous strides for `shape` (a size-0 dim counts as 1)."""
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= max(n, 1)
    return tuple(reversed(out))


def _group_major(shape) -> tuple:
    """Strides of (M, G) scales stored as a transposed (G, M) tensor."""
    return 1, shape[0]


def _laid_out(t, strides_of=_strides):
    """`t` with the strides the fake implementation gives (a copy only where a backend returned others)."""
    want = strides_of(t.shape)
    return t if t.stride() == want else torch.empty_strided(t.shape, want, dtype=t.dtype, device=t.device).copy_(t)


def _empty(like, shape, dtype, strides_of=_strides):
    return torch.empty_strided(shape, strides_of(shape), dtype=dtype, device=like.device)


def _impl(name):
    names = [n for n, _ in PARAMS[name]]

    def impl(*args):
        out = getattr(backend_for(args[0].device), name)(**dict(zip(names, args)))
        if name not in QUANTIZE:
            return _laid_out(out)
        q, s, lr = out
        x = args[0]
        lr = _empty(x, (x.shape[0], 0), F32) if lr is None else _laid_out(lr)
        return _laid_out(q), _laid_out(s, _group_major if name == "quantize_act_int4" else _strides), lr

    impl.__name__ = name
    return impl


def _lr_fake(x, proj_down):
    return _empty(x, (x.shape[0], 0 if proj_down is None else proj_down.shape[1]), F32)


def _fakes():
    def gemm(qx, xscales, qweight, wscales, lr, proj_up, bias, out_dtype, s0=None):
        return _empty(qx, (qx.shape[0], qweight.shape[0]), out_dtype)

    def quantize_act_int4(x, smooth, proj_down, group_size, unsigned):
        m, k = x.shape
        return (_empty(x, (m, k), torch.int8), _empty(x, (m, k // group_size), F32, _group_major),
                _lr_fake(x, proj_down))

    def row_quant(dtype, smooth_first):
        def fake(x, a, b):
            m, k = x.shape
            return _empty(x, (m, k), dtype), _empty(x, (m,), F32), _lr_fake(x, b if smooth_first else a)
        return fake

    def w4a16_gemm(x, qweight, wscales, wzeros, bias, out_dtype, lr, proj_up):
        return _empty(x, (x.shape[0], qweight.shape[0]), out_dtype or x.dtype)

    def ternary_gemm(x, qweight, wscales, lr, proj_up, bias, out_dtype):
        return _empty(x, (x.shape[0], qweight.shape[0]), out_dtype or x.dtype)

    return {"lora_down": lambda x, proj_down: _lr_fake(x, proj_down),
            "quantize_act_int4": quantize_act_int4,
            "quantize_act_int8": row_quant(torch.int8, False),
            "quantize_act_fp8": row_quant(torch.float8_e4m3fn, True),
            "w4a4_gemm": gemm, "w4a8_gemm": gemm, "ternary_int8_gemm": gemm, "int4_fp8_gemm": gemm,
            "ternary_fp8_gemm": gemm, "w4a16_gemm": w4a16_gemm, "ternary_gemm": ternary_gemm}


def _free_namespace() -> str:
    """`lowbit`, or `lowbit1`, ... where another copy of this package (imported under another module name in the
    same process) has registered its ops already: each copy's ops call its own dispatch state."""
    for i in itertools.count():
        ns = "lowbit" if i == 0 else f"lowbit{i}"
        try:
            getattr(getattr(torch.ops, ns), "lora_down")
        except AttributeError:
            return ns


def _register():
    ns = _free_namespace()
    fakes = _fakes()
    ops = {}
    for name, schema in SCHEMAS.items():
        op = torch.library.custom_op(f"{ns}::{name}", _impl(name), mutates_args=(), schema=schema)
        op.register_fake(fakes[name])
        ops[name] = op
    return ns, ops


NAMESPACE, OPS, ERROR = None, {}, "torch.library.custom_op is missing (torch < 2.4)"
if AVAILABLE:
    try:
        NAMESPACE, OPS = _register()
        ERROR = None
    except Exception as e:  # an API change in some torch release: fall back, say why (kernels/__init__.py)
        AVAILABLE, ERROR = False, f"{type(e).__name__}: {e}"
        logging.getLogger("comfyui_lowbit").warning(
            "comfyui-lowbit: the kernel ops could not be registered as torch custom operators (%s); under "
            "torch.compile each one breaks the graph", ERROR)


def call(name, args, kwargs):
    """kernels.<name>(*args, **kwargs) through the custom operator (what a compiled model runs)."""
    params = PARAMS[name]
    vals = list(args)
    for n, default in params[len(args):]:
        vals.append(kwargs.pop(n) if n in kwargs else default)
    missing = [n for (n, _), v in zip(params, vals) if v is inspect.Parameter.empty]
    if kwargs or len(vals) > len(params) or missing:
        raise TypeError(f"{name}() takes ({', '.join(n for n, _ in params)}); got {len(args)} positional arguments, "
                        f"unknown keywords {sorted(kwargs)}, missing {missing}")
    if name == "lora_down" and vals[1] is None:
        return None
    if name == "quantize_act_int4" and isinstance(vals[4], bool):
        vals[4] = 0 if vals[4] else vals[0].shape[1]  # True: every channel unsigned; False: none (u = K)
    out = OPS[name](*vals)
    if name in QUANTIZE:
        q, s, lr = out
        return q, s, None if vals[PROJ_DOWN[name]] is None else lr
    return out
