"""torch.compile of quantized layers: the kernel ops are custom operators (kernels/custom_ops.py), so dynamo keeps
one graph across them (no graph break, fullgraph=True works) and the compiled layer gives bitwise the eager output
in every format and activation mode (aot_eager for the whole matrix, inductor on two layers: it compiles C++).
Traced instead of opaque, Inductor fused away the reference's roundings to 16 bits (differences of 3e-3).
"""
import dataclasses
import inspect
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters

from comfyui_lowbit import kernels
from comfyui_lowbit.kernels import custom_ops, reference
from comfyui_lowbit.quant_ops import module_from_packed, quantize_linear, set_activations

pytestmark = pytest.mark.skipif(not hasattr(torch.library, "custom_op"),
                                reason="torch.library.custom_op needs torch >= 2.4")

K, N = 256, 96
# (layer, activation mode; int8p: int8 with progressive group scales; int4 on ternary: its own 16-bit or int8 path)
CASES = [("w4a4", "int4"), ("w4a4", "int8"), ("w4a4", "int8p"), ("w4a4", "fp8"),
         ("w4a4_unsigned", "int4"), ("w4a4_unsigned", "int8"), ("w4a4_unsigned", "fp8"),
         ("w4a4_unsigned_from_128", "int4"), ("w4a4_rank0", "int4"),
         ("ternary", "int4"), ("ternary", "int8"), ("ternary", "fp8"), ("ternary_int8", "int4"),
         ("ternary_rank0", "int4"), ("w4a16", "int4"), ("w4a16_lora", "int4")]


def _layer(name):
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N)
    if name.startswith("w4a16"):
        m = quantize_linear(lin, "w4a16", dtype=torch.bfloat16)
        if name == "w4a16_lora":  # a run-time branch, as a LoRA gives
            g = torch.Generator().manual_seed(1)
            m.set_branch((0.05 * torch.randn(K, 32, generator=g)).bfloat16(),
                         (0.05 * torch.randn(N, 32, generator=g)).bfloat16())
        return m
    fmt = "ternary" if name.startswith("ternary") else "svdq_w4a4"
    opts = {"act_unsigned": True} if "unsigned" in name else {"act_int8": True} if name == "ternary_int8" else {}
    m = quantize_linear(lin, fmt, rank=0 if name.endswith("rank0") else 16, dtype=torch.bfloat16, iters=1, **opts)
    if name == "w4a4_unsigned_from_128":  # signed channels [0, 128), unsigned [128, 256) (single-block linear2)
        m = module_from_packed(dataclasses.replace(m.packed(), act_unsigned_from=128))
    return m


@pytest.fixture(scope="module")
def layers():
    return {name: _layer(name) for name in dict.fromkeys(n for n, _ in CASES)}


def _inputs(unsigned):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 20, K, generator=g), torch.randn(1, 7, K, generator=g).bfloat16()]  # 2 token counts, 2 dtypes
    return [torch.nn.functional.gelu(x.float(), approximate="tanh").to(x.dtype) for x in xs] if unsigned else xs


def _mode(m, mode):
    set_activations(m, mode.rstrip("p"), progressive=mode == "int8p")


def _counting(backend):
    """A dynamo backend that records each graph it is given, then compiles it with `backend`."""
    graphs = []

    def compile_fn(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend(backend)(gm, example_inputs)
    return compile_fn, graphs


def _lowbit_calls(gm) -> list:
    return [n.target.__name__.split(".")[0] for n in gm.graph.nodes if n.op == "call_function"
            and getattr(n.target, "namespace", None) == custom_ops.NAMESPACE]


@pytest.mark.parametrize("layer,mode", CASES)
def test_compiled_layer_is_one_graph_and_bitwise_eager(layers, layer, mode):
    """aot_eager, fullgraph=True: one graph per input signature that calls the lowbit ops (never the reference's
    torch code), and bitwise the eager output for float32 and bfloat16 inputs and two token counts."""
    m = layers[layer]
    _mode(m, mode)
    try:
        xs = _inputs("unsigned" in layer)
        eager = [m(x) for x in xs]  # first: layers compute their derived tensors (shift_comp, int8 scales) eagerly
        torch._dynamo.reset()
        counters.clear()
        backend, graphs = _counting("aot_eager")
        compiled = torch.compile(m, backend=backend, fullgraph=True)
        for x, want in zip(xs, eager):
            assert torch.equal(compiled(x), want), (layer, mode, x.dtype, x.shape)
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert len(graphs) == len(xs)  # one per (dtype, token count): dynamo recompiles for the new dtype
        calls = _lowbit_calls(graphs[0])
        assert calls and calls[-1].endswith("_gemm"), calls
        assert not any(n.target in (torch.round, torch.Tensor.round) for n in graphs[0].graph.nodes)
    finally:
        _mode(m, "int4")
        torch._dynamo.reset()


@pytest.mark.parametrize("layer,mode", [("w4a4_unsigned", "fp8"), ("w4a16_lora", "int4")])
def test_inductor_compiled_layer_is_bitwise_eager(layers, layer, mode):
    """Inductor (C++ on the CPU) around the ops: fullgraph, bitwise the eager output (the unsigned fp8 layer adds
    its shift compensation to the bias in the graph, a kernel Inductor generates)."""
    m = layers[layer]
    _mode(m, mode)
    try:
        x = _inputs("unsigned" in layer)[0]
        want = m(x)
        torch._dynamo.reset()
        counters.clear()
        assert torch.equal(torch.compile(m, backend="inductor", fullgraph=True)(x), want)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        _mode(m, "int4")
        torch._dynamo.reset()


def test_backend_is_chosen_when_the_compiled_graph_runs(layers, monkeypatch):
    """A graph compiled while the reference ran still follows set_backend / LOWBIT_BACKEND afterwards: the choice is
    made inside the op at run time, with no recompile."""
    try:
        from comfyui_lowbit.kernels import triton_ops
    except Exception as e:  # Triton missing, or compiled kernels without a GPU
        pytest.skip(f"the Triton kernels do not load here: {e}")
    m = layers["w4a4"]
    x = _inputs(False)[1]
    seen = []
    for name in ("quantize_act_int4", "w4a4_gemm"):
        orig = getattr(triton_ops, name)
        monkeypatch.setattr(triton_ops, name, lambda *a, _o=orig, _n=name, **kw: seen.append(_n) or _o(*a, **kw))
    torch._dynamo.reset()
    counters.clear()
    try:
        kernels.set_backend("reference")
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), m(x)) and not seen
        kernels.set_backend("triton")
        want = m(x)  # eager, Triton (the interpreter on the CPU)
        seen.clear()
        assert torch.equal(compiled(x), want)
        assert seen == ["quantize_act_int4", "w4a4_gemm"]
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        kernels.set_backend(None)
        torch._dynamo.reset()


def _op_samples():
    """(op name, args in schema order) covering None tensors, both unsigned encodings and out_dtype None."""
    g = torch.Generator().manual_seed(5)
    m, r = 3, 16
    x = torch.randn(m, K, generator=g).bfloat16()
    smooth = (torch.rand(K, generator=g) + 0.5).bfloat16()
    down = (0.05 * torch.randn(K, r, generator=g)).bfloat16()
    up = (0.05 * torch.randn(N, r, generator=g)).bfloat16()
    bias = torch.randn(N, generator=g).bfloat16()
    qw4 = kernels.pack_int4(torch.randint(-8, 8, (N, K), dtype=torch.int8, generator=g))
    ws4 = (0.01 * torch.rand(K // 64, N, generator=g)).bfloat16()
    qt = kernels.pack_ternary(torch.randint(-1, 2, (N, K), dtype=torch.int8, generator=g))
    wst = (0.01 * torch.rand(N, generator=g)).bfloat16()
    q4, s4, lr = reference.quantize_act_int4(x, smooth, down)
    q8, s8, _ = reference.quantize_act_int8(x, down, smooth)
    qf, sf, _ = reference.quantize_act_fp8(x, smooth, down)
    s1, s0 = reference.progressive_scales(ws4)
    return [("lora_down", (x, down)),
            ("quantize_act_int4", (x, smooth, down, 64, K)), ("quantize_act_int4", (x, smooth, None, 64, 128)),
            ("quantize_act_int4", (x, None, down, 64, 0)),
            ("quantize_act_int8", (x, down, smooth)), ("quantize_act_int8", (x, None, None)),
            ("quantize_act_fp8", (x, smooth, down)), ("quantize_act_fp8", (x, None, None)),
            ("w4a4_gemm", (q4, s4, qw4, ws4, lr, up, bias, torch.bfloat16)),
            ("w4a4_gemm", (q4, s4, qw4, ws4, None, None, None, torch.float32)),
            ("w4a8_gemm", (q8, s8, qw4, ws4, lr, up, bias, torch.bfloat16, None)),
            ("w4a8_gemm", (q8, s8, qw4, s1, None, None, bias.float(), torch.float16, s0)),
            ("w4a16_gemm", (x, qw4, ws4, ws4, bias, None, lr, up)),
            ("w4a16_gemm", (x.float(), qw4, ws4, None, None, torch.bfloat16, None, None)),
            ("ternary_gemm", (x, qt, wst, lr, up, bias, None)),
            ("ternary_gemm", (x.float(), qt, wst, None, None, None, None)),
            ("ternary_int8_gemm", (q8, s8, qt, wst, lr, up, bias, torch.bfloat16)),
            ("int4_fp8_gemm", (qf, sf, qw4, ws4, lr, up, bias, torch.bfloat16)),
            ("ternary_fp8_gemm", (qf, sf, qt, wst, None, None, None, torch.float32))]


def _backends():
    names = ["reference"]
    try:
        from comfyui_lowbit.kernels import triton_ops  # noqa: F401
        names.append("triton")  # TRITON_INTERPRET=1 (CI) on the CPU
    except Exception:
        pass
    return names


@pytest.mark.parametrize("backend", _backends())
def test_custom_ops_pass_opcheck(backend):
    """torch.library.opcheck on each backend: schema (no mutation, no aliasing; not for float8 inputs), fake
    implementations (shapes, dtypes, strides: both backends' outputs come in the layout they state) and AOT dispatch
    with dynamic shapes agree with the real ops; and each op gives bitwise the backend's eager call."""
    utils_all = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if backend == "triton":  # the interpreter is slow: the fake-vs-real check only (the rest is backend-independent)
        utils_all = ("test_faketensor",)
    try:
        kernels.set_backend(backend)
        for name, args in _op_samples():
            fp8_in = any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args)
            # the schema check compares inputs before and after with allclose, which float8 tensors lack
            utils = [u for u in utils_all if not (fp8_in and u == "test_schema")]
            torch.library.opcheck(custom_ops.OPS[name], args, test_utils=utils)
            got = custom_ops.OPS[name](*args)
            want = getattr(kernels.backend_for(args[0].device), name)(*args)
            for a, b in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, want))):
                assert b is None and a.shape[1] == 0 or torch.equal(a.float(), b.float()), name
    finally:
        kernels.set_backend(None)


def test_op_signatures_match_the_reference():
    """The schemas take the reference's parameters in order, and every Triton op has the same signature (the
    custom op calls the backend by keyword)."""
    for name in kernels.OPS:
        schema = getattr(torch.ops, custom_ops.NAMESPACE).__getattr__(name).default._schema
        ref = list(inspect.signature(getattr(reference, name)).parameters)
        assert [a.name for a in schema.arguments] == ref, name
    try:
        from comfyui_lowbit.kernels import triton_ops
    except Exception:
        return
    for name in kernels.OPS:
        assert list(inspect.signature(getattr(triton_ops, name)).parameters) == \
            list(inspect.signature(getattr(reference, name)).parameters), name


def test_custom_ops_are_registered_where_torch_has_the_api():
    assert custom_ops.AVAILABLE and custom_ops.NAMESPACE == "lowbit", custom_ops.ERROR


def test_without_custom_op_the_ops_are_compiler_disabled():
    """torch < 2.4 (no torch.library.custom_op, simulated): the ops fall back to torch.compiler.disable, compiled
    layers still give the eager output, one graph break per op call."""
    code = """if True:
        import torch
        from torch._dynamo.utils import counters  # torch's own modules use custom_op: imported first
        real = torch.library.custom_op
        del torch.library.custom_op
        from comfyui_lowbit import kernels
        torch.library.custom_op = real
        from comfyui_lowbit.quant_ops import quantize_linear
        assert not kernels.custom_ops.AVAILABLE and not kernels.custom_ops.OPS
        torch.manual_seed(0)
        m = quantize_linear(torch.nn.Linear(256, 96), "svdq_w4a4", rank=16, dtype=torch.bfloat16, iters=1)
        x = torch.randn(5, 256)
        assert torch.equal(torch.compile(m, backend="aot_eager")(x), m(x))
        assert sum(counters["graph_break"].values()) >= 2, dict(counters["graph_break"])
        print("ok")
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
