"""ComfyUI's standard LoRA loading on lowbit models (nodes/patcher.py): key formats, branch routing,
restore, and a sampler run compared with the 16-bit model plus the same LoRA.

Needs a ComfyUI checkout (0.29.0) in COMFYUI_PATH and its Python environment:
    COMFYUI_PATH=/work/comfyui /work/cvenv/bin/python -m pytest -q tests/test_comfyui_lora.py
"""
import hashlib
import logging
import os

import pytest
import torch
from synthetic import quantize_linears, randomize_module
from torch.utils._python_dispatch import TorchDispatchMode

COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY, reason="COMFYUI_PATH is not set (point it at a ComfyUI 0.29.0 checkout)")]

H = 256
TINY = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=H,
            mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56], theta=10000,
            patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])



@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LOWBIT_BACKEND", "reference")


TERNARY = "double_blocks.1.img_attn.proj"  # ternary without a branch: a LoRA creates one


def _select(name, module):
    if not name.startswith(("double_blocks.", "single_blocks.")):
        return None
    return "w4a16" if name.endswith(".lin") else "ternary" if name == TERNARY else "svdq_w4a4"


def _layer_args(name, fmt):
    if fmt == "svdq_w4a4":
        return {"iters": 3, **({"act_unsigned": True} if name.endswith((".img_mlp.2", ".txt_mlp.2")) else {})}
    return {"rank": 0, "iters": 1} if fmt == "ternary" else {}


def _quantize_sd(model, rank=16):
    sd, layers = quantize_linears(model, _select, rank, _layer_args)
    return {k.replace("_norm.weight", "_norm.scale"): v for k, v in sd.items()}, layers


def tiny_state_dicts():
    """(16-bit state dict, its lowbit state dict, lowbit.layers) of one tiny random FLUX in ComfyUI's naming."""
    import comfy.ldm.flux.model

    flux = comfy.ldm.flux.model.Flux(operations=comfy.ops.manual_cast, dtype=torch.bfloat16, **TINY)
    randomize_module(flux, 0)
    sd16 = {k.replace("_norm.weight", "_norm.scale"): v.clone() for k, v in flux.state_dict().items()}
    qsd, layers = _quantize_sd(flux)
    return sd16, qsd, layers


def load_lowbit_sd(sd, layers):
    """A lowbit ModelPatcher of the lowbit state dict `sd` (a copy: ComfyUI's loader consumes its dict)."""
    import comfy.sd

    from comfyui_lowbit.nodes.ops import make_ops
    from comfyui_lowbit.nodes.patcher import wrap_patcher

    options = {"custom_operations": make_ops(layers)}
    return wrap_patcher(comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options=options))


@pytest.fixture(scope="module")
def models(comfy):
    """(16-bit ModelPatcher, lowbit ModelPatcher, lowbit.layers) for one tiny random FLUX."""
    sd16, qsd, layers = tiny_state_dicts()
    return comfy.sd.load_diffusion_model_state_dict(sd16), load_lowbit_sd(qsd, layers), layers


def _lowbit(mp):
    from comfyui_lowbit.nodes.patcher import lowbit_layers

    return lowbit_layers(mp.model)


def _hashes(mp):
    out = {}
    for path, m in _lowbit(mp).items():
        for k, v in m.state_dict().items():
            out[f"{path}.{k}"] = hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def _pair(g, rows, cols, rank):
    return (0.1 * torch.randn(rows, rank, generator=g)).to(torch.bfloat16), (0.1 * torch.randn(rank, cols, generator=g)).to(torch.bfloat16)


# (BFL layer, out rows, in cols) the test LoRAs touch: quantized W4A4 / W4A16 layers and 16-bit ones
TARGETS = [("double_blocks.0.img_attn.qkv", 3 * H, H), ("double_blocks.1.txt_mlp.2", H, 4 * H),
           ("double_blocks.0.img_mod.lin", 6 * H, H), ("single_blocks.1.linear1", 7 * H, H),
           ("single_blocks.0.linear2", H, 5 * H), (TERNARY, H, H), ("img_in", H, 64), ("final_layer.linear", 64, H)]
DIFFUSERS = {  # BFL layer -> diffusers modules (row slices of fused layers follow ComfyUI's offsets)
    "double_blocks.0.img_attn.qkv": [("transformer_blocks.0.attn.to_q", H), ("transformer_blocks.0.attn.to_k", H),
                                     ("transformer_blocks.0.attn.to_v", H)],
    "double_blocks.1.txt_mlp.2": [("transformer_blocks.1.ff_context.net.2", H)],
    "double_blocks.0.img_mod.lin": [("transformer_blocks.0.norm1.linear", 6 * H)],
    "single_blocks.1.linear1": [("single_transformer_blocks.1.attn.to_q", H), ("single_transformer_blocks.1.attn.to_k", H),
                                ("single_transformer_blocks.1.attn.to_v", H), ("single_transformer_blocks.1.proj_mlp", 4 * H)],
    "single_blocks.0.linear2": [("single_transformer_blocks.0.proj_out", H)],
    TERNARY: [("transformer_blocks.1.attn.to_out.0", H)],
    "img_in": [("x_embedder", H)],
    "final_layer.linear": [("proj_out", 64)],
}


def make_lora(fmt: str, seed: int = 0, rank: int = 4, alpha: float = 4.0) -> dict:
    """A LoRA state dict over TARGETS in one of the key formats ComfyUI maps."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for layer, rows, cols in TARGETS:
        if fmt == "diffusers":  # PEFT: transformer.<module>.lora_A / lora_B, no alpha (scale 1)
            for mod, n in DIFFUSERS[layer]:
                up, down = _pair(g, n, cols, rank)
                sd[f"transformer.{mod}.lora_A.weight"], sd[f"transformer.{mod}.lora_B.weight"] = down, up
            continue
        up, down = _pair(g, rows, cols, rank)
        name = f"diffusion_model.{layer}" if fmt == "bfl" else "lora_unet_" + layer.replace(".", "_")
        sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"] = up, down
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def _comfy_delta(comfy, patches, key, shape):
    """ComfyUI's own float32 merge of the patches on a zero weight: the LoRA's delta W."""
    return comfy.lora.calculate_weight(patches, torch.zeros(shape, dtype=torch.float32), key).double()


def _dequant(m):
    return m.dequantize().double()


@pytest.mark.parametrize("fmt", ["bfl", "kohya", "diffusers"])
def test_key_formats_route_into_branch(comfy, models, fmt):
    """Every key format maps; on each quantized layer the branch adds exactly ComfyUI's merged delta."""
    mp16, mpq, layers = models
    lora = make_lora(fmt, seed=1)
    before = _hashes(mpq)
    q = _lowbit(mpq)
    deq0 = {p: _dequant(m) for p, m in q.items()}
    lq, _ = comfy.sd.load_lora_for_models(mpq, None, lora, 0.8, 0)
    keys = {k if isinstance(k, str) else k[0] for k in lq.patches}
    assert type(lq).__name__.startswith("LowBit")
    for layer, _, _ in TARGETS:
        assert f"diffusion_model.{layer}.weight" in lq.patches, f"{fmt}: {layer} not mapped"
    lq.patch_model()
    try:
        checked = 0
        for layer, rows, cols in TARGETS:
            key = f"diffusion_model.{layer}.weight"
            want = _comfy_delta(comfy, lq.patches[key], key, (rows, cols))
            if layer in layers:
                m = q[f"diffusion_model.{layer}"]
                assert m.weight.dtype == torch.uint8
                got = _dequant(m) - deq0[f"diffusion_model.{layer}"]
                rel = ((got - want).norm() / want.norm()).item()
                assert rel < 1e-2, f"{fmt} {layer}: branch delta vs ComfyUI merge {rel:.2e}"
                checked += 1
            else:  # 16-bit layers: ComfyUI's usual merge, into the real weight
                w = lq.model.get_submodule(f"diffusion_model.{layer}").weight.double()
                w0 = lq.backup[key].weight.double()
                rel = ((w - w0 - want).norm() / want.norm()).item()
                assert rel < 2e-2, f"{fmt} {layer}: 16-bit merge {rel:.2e}"
        assert checked == 6 and len(keys) >= 8
    finally:
        lq.unpatch_model()
    assert _hashes(mpq) == before
    for p, m in q.items():
        assert torch.equal(_dequant(m), deq0[p])


def _inputs():
    g = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(1, 16, 8, 8, generator=g), timestep=torch.tensor([0.7]),
                context=torch.randn(1, 8, 64, generator=g), y=torch.randn(1, 32, generator=g),
                guidance=torch.tensor([3.5]))


def _run(mp):
    mp.patch_model()
    try:
        with torch.no_grad():
            return mp.model.diffusion_model(**_inputs()).float()
    finally:
        mp.unpatch_model()


def _float_flux(comfy, mp, weights):
    """A float32 ComfyUI Flux with mp's 16-bit tensors (as patched now) and `weights` {path: (W, b)} for the
    quantized layers."""
    import comfy.ldm.flux.model

    flux = comfy.ldm.flux.model.Flux(operations=comfy.ops.manual_cast, dtype=torch.float32, **TINY)
    src = mp.model.diffusion_model.state_dict()
    sd = {}
    for k in flux.state_dict():
        path, _, name = k.rpartition(".")
        if f"diffusion_model.{path}" in weights:
            w, b = weights[f"diffusion_model.{path}"]
            sd[k] = w if name == "weight" else b
        else:
            sd[k] = src[k].float()
    flux.load_state_dict(sd)
    return flux


def _forward(model):
    with torch.no_grad():
        return model(**_inputs()).float()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def base_error(comfy, models):
    """(relative output error of the lowbit model against its dequantized float self, {path: (W, b)})."""
    _, mpq, _ = models
    base_w = {p: (m.dequantize(), m.float_bias()) for p, m in _lowbit(mpq).items()}
    mpq.patch_model()
    try:
        return _rel(_forward(mpq.model.diffusion_model), _forward(_float_flux(comfy, mpq, base_w))), base_w
    finally:
        mpq.unpatch_model()


@pytest.mark.parametrize("fmt", ["bfl", "kohya", "diffusers"])
def test_lowbit_with_lora_matches_dequantized_model_with_float_merge(comfy, models, base_error, fmt):
    """Model level: lowbit + LoRA against the dequantized model with the LoRA merged in float32 (ComfyUI's
    calculate_weight), within the quantization error the base lowbit model has against its dequantized self."""
    _, mpq, _ = models
    e0, base_w = base_error
    lq, _ = comfy.sd.load_lora_for_models(mpq, None, make_lora(fmt, seed=6), 0.8, 0)
    merged = {}
    for p, (w, b) in base_w.items():
        key = f"{p}.weight"
        merged[p] = (w + _comfy_delta(comfy, lq.patches[key], key, w.shape).float() if key in lq.patches else w, b)
    lq.patch_model()
    try:
        out_q, out_f = _forward(lq.model.diffusion_model), _forward(_float_flux(comfy, lq, merged))
    finally:
        lq.unpatch_model()
    e1 = _rel(out_q, out_f)
    print(f"{fmt}: lowbit vs dequantized float model: base {e0:.4f}, with LoRA {e1:.4f} (relative L2 of the output)")
    assert e1 < 1.2 * e0 + 0.01


def test_strength_change_and_removal_move_output_like_16bit(comfy, models):
    mp16, mpq, _ = models
    q = _lowbit(mpq)
    packed = {p: (m.weight, m.wscales) for p, m in q.items()}
    base = _run(mpq)
    lora = make_lora("kohya", seed=2)
    outs = {}
    for s in (1.0, 0.5, -1.0, 0.0):
        lq, _ = comfy.sd.load_lora_for_models(mpq, None, lora, s, 0)
        outs[s] = _run(lq)
        for p, m in q.items():  # the very tensors loaded once: no reload, no copy
            assert m.weight is packed[p][0] and m.wscales is packed[p][1]
    assert torch.equal(outs[0.0], base)
    assert torch.equal(_run(mpq), base)  # LoRA removed: the original model
    base16 = _run(mp16)
    for s in (1.0, 0.5, -1.0):  # the LoRA moves the output as it moves the 16-bit model's
        l16, _ = comfy.sd.load_lora_for_models(mp16, None, lora, s, 0)
        dq, d16 = outs[s] - base, _run(l16) - base16
        cos = torch.nn.functional.cosine_similarity(dq.flatten(), d16.flatten(), dim=0).item()
        print(f"strength {s}: |LoRA effect| {d16.norm() / base16.norm():.3f} of the output, cosine lowbit vs 16-bit {cos:.3f}")
        assert dq.norm() > 0.05 * base.norm() and cos > 0.8


class _Recorder(TorchDispatchMode):
    """Every tensor an op reads or writes while active."""

    def __init__(self):
        super().__init__()
        self.inputs, self.outputs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.inputs += [(func, t) for t in torch.utils._pytree.tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
        self.outputs += [(func, t) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_stack_restrength_remove_one_equal_float_merge(comfy, models):
    """Two stacked LoRAs (kohya + diffusers), then a new strength (negative), then one removed: on every
    quantized layer the branch adds ComfyUI's float merge of the patches; base tensors untouched throughout."""
    _, mpq, _ = models
    q = _lowbit(mpq)
    before = _hashes(mpq)
    deq0 = {p: _dequant(m) for p, m in q.items()}
    packed = {p: (m.weight, m.wscales) for p, m in q.items()}
    ka, df = make_lora("kohya", seed=2), make_lora("diffusers", seed=3)
    rec = _Recorder()
    qkv = q["diffusion_model.double_blocks.0.img_attn.qkv"]
    ranks = {}
    for what, loras in [("stacked", [(ka, 1.0), (df, 0.6)]), ("new strength", [(ka, -0.5), (df, 0.6)]),
                        ("one removed", [(df, 0.6)])]:
        lq = mpq
        for sd, strength in loras:
            lq, _ = comfy.sd.load_lora_for_models(lq, None, sd, strength, 0)
        with rec:
            lq.patch_model()
        try:
            for layer, rows, cols in TARGETS:
                p = f"diffusion_model.{layer}"
                if p not in q:
                    continue
                m = q[p]
                assert m.weight is packed[p][0] and m.wscales is packed[p][1]  # loaded once, never copied
                want = _comfy_delta(comfy, lq.patches[p + ".weight"], p + ".weight", (rows, cols))
                rel = ((_dequant(m) - deq0[p] - want).norm() / want.norm()).item()
                assert rel < 1e-2, f"{what} {layer}: branch delta vs ComfyUI float merge {rel:.2e}"
                assert m.branch()[0].shape[1] % 16 == 0
            ranks[what] = qkv.branch()[0].shape[1]
        finally:
            with rec:
                lq.unpatch_model()
    assert ranks == {"stacked": 32, "new strength": 32, "one removed": 32}  # 16 + 4 (+ 3 x 4 q/k/v), padded
    assert qkv.branch()[0].shape[1] == 16 and _hashes(mpq) == before
    for p, m in q.items():
        assert torch.equal(_dequant(m), deq0[p])
    assert rec.outputs, "the recorder saw no ops"
    ids = {id(t) for pair in packed.values() for t in pair}
    touched = sorted({str(func) for func, t in rec.inputs if id(t) in ids and not func.is_view})  # detach() from state_dict() is a view
    assert not touched, f"ops read packed weights / scales while patching: {touched}"
    shapes = {(m.out_features, m.in_features) for m in q.values()}
    shapes |= {(k, n) for n, k in shapes}
    copies = sorted({(str(func), tuple(t.shape)) for func, t in rec.outputs
                     if t.is_floating_point() and tuple(t.shape) in shapes and not func.is_view})
    assert not copies, f"16-bit tensors of a quantized layer's full shape were built: {copies}"


def test_shape_mismatch_is_an_error_naming_key_and_shapes(comfy, models):
    _, mpq, _ = models
    g = torch.Generator().manual_seed(4)
    up, down = _pair(g, 3 * H, 2 * H, 4)  # qkv takes 256 inputs, not 512
    lora = {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down}
    lq, _ = comfy.sd.load_lora_for_models(mpq, None, lora, 1.0, 0)
    before = _hashes(mpq)
    with pytest.raises(ValueError, match=r"double_blocks\.0\.img_attn\.qkv.*\(768, 4\).*\(4, 512\).*\(768, 256\)"):
        lq.patch_model()
    lq.unpatch_model()
    assert _hashes(mpq) == before


def test_unsupported_patch_types_warn_once(comfy, models, caplog):
    _, mpq, _ = models
    diff = {"diffusion_model.double_blocks.0.img_attn.proj.diff": torch.zeros(H, H),
            "diffusion_model.double_blocks.1.img_attn.proj.diff": torch.zeros(H, H)}
    lq, _ = comfy.sd.load_lora_for_models(mpq, None, diff, 1.0, 0)
    with caplog.at_level(logging.WARNING, logger="comfyui_lowbit"):
        lq.patch_model()
        lq.unpatch_model()
    lines = [r.getMessage() for r in caplog.records if r.name == "comfyui_lowbit"]
    assert len(lines) == 1 and "2 LoRA patches" in lines[0] and "img_attn.proj" in lines[0]


def test_clone_disable_dynamic_and_return_weight(comfy, models):
    _, mpq, _ = models
    c = mpq.clone()
    assert type(c).__name__.startswith("LowBit")
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    w = c.patch_weight_to_device(key, return_weight=True)
    assert w is _lowbit(c)["diffusion_model.double_blocks.0.img_attn.qkv"].weight


def test_lora_stack_reports_unmatched_keys_in_one_line(comfy, models, caplog):
    from comfyui_lowbit.nodes.lora_stack import apply_lora

    _, mpq, _ = models
    lora = make_lora("kohya", seed=5)
    extra = {f"lora_unet_no_such_layer_{i}.lora_up.weight": torch.zeros(4, 4) for i in range(6)}
    with caplog.at_level(logging.WARNING):
        out, unmatched = apply_lora(mpq, {**lora, **extra}, 0.8, "mixed.safetensors")
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert "mixed.safetensors: 6 of" in lines[0] and "no_such_layer" in lines[0] and len(unmatched) == 6
    ref, _ = comfy.sd.load_lora_for_models(mpq, None, lora, 0.8, 0)  # the same patches as ComfyUI's loader
    assert set(out.patches) == set(ref.patches) and type(out) is type(ref)
    for k in ref.patches:
        assert [p[0] for p in out.patches[k]] == [p[0] for p in ref.patches[k]]


def test_low_vram_partial_load_gives_the_same_output(comfy, models):
    """ModelPatcher's low-VRAM load (16-bit LoRAs applied at cast time, quantized layers left offloaded):
    the branch still carries the LoRA and the output matches a full load."""
    _, mpq, _ = models
    lq, _ = comfy.sd.load_lora_for_models(mpq, None, make_lora("diffusers", seed=7), 0.9, 0)
    full = _run(lq)
    lq.patch_model(lowvram_model_memory=1)
    try:
        assert lq.model.model_lowvram
        assert lq.model.diffusion_model.double_blocks[0].img_attn.qkv.branch()[0].shape[1] == 32
        with torch.no_grad():
            low = lq.model.diffusion_model(**_inputs()).float()
    finally:
        lq.unpatch_model()
    assert _lowbit(mpq)["diffusion_model.double_blocks.0.img_attn.qkv"].branch()[0].shape[1] == 16
    torch.testing.assert_close(low, full, rtol=1e-2, atol=1e-2)
