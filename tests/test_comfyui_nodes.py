"""ComfyUI integration: the custom operations in-process, then the nodes in a real headless ComfyUI.

Needs a ComfyUI checkout (0.29.0) in COMFYUI_PATH and its Python environment:
    COMFYUI_PATH=/work/comfyui /work/cvenv/bin/python -m pytest -q tests/test_comfyui_nodes.py
"""
import os
import sys

import pytest
import torch

COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY, reason="COMFYUI_PATH is not set (point it at a ComfyUI 0.29.0 checkout)")]

TINY = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=256,
            mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56], theta=10000,
            patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
TINY_T5 = dict(d_ff=256, d_kv=64, d_model=128, num_heads=2, num_layers=2, vocab_size=512, dense_act_fn="gelu_pytorch_tanh",
               is_gated_act=True, model_type="t5", relative_attention_num_buckets=32, layer_norm_epsilon=1e-6)


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI imported in this process, CPU only."""
    if COMFY not in sys.path:
        sys.path.insert(0, COMFY)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management
    import comfy.ops
    import comfy.sd

    return comfy


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    for n, p in module.named_parameters():
        v = torch.randn(p.shape, generator=g) * (0.05 if p.dim() > 1 else 0.1)
        if "norm" in n or n.endswith("scale"):
            v = 1 + v
        p.data = v.to(p.dtype)


def _quantize_sd(model, select, rank=16):
    """(state dict with the selected linears quantized, lowbit.layers)."""
    from comfyui_lowbit import quant_ops

    sd, layers = {}, {}
    quantized = {}
    for n, m in model.named_modules():
        fmt = select(n, m) if isinstance(m, torch.nn.Linear) else None
        if fmt:
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.weight.detach().float()
            if m.bias is not None:
                lin.bias.data = m.bias.detach().float()
            packed = quant_ops.quantize_linear(lin, fmt, rank=rank, dtype=torch.bfloat16).packed()
            quantized[n] = packed
            layers[n] = packed.config()
            sd.update({f"{n}.{k}": v for k, v in packed.tensors().items()})
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[0] not in quantized:
            sd[k] = v.clone()
    return sd, layers


def _flux_fmt(fmt):
    def select(name, module):
        if not name.startswith(("double_blocks.", "single_blocks.")):
            return None
        if name.endswith((".lin",)):
            return "w4a16"
        return fmt
    return select


def _bfl(sd):
    return {k.replace("_norm.weight", "_norm.scale"): v for k, v in sd.items()}


@pytest.fixture(scope="module")
def tiny_flux(comfy):
    import comfy.ldm.flux.model

    model = comfy.ldm.flux.model.Flux(operations=comfy.ops.manual_cast, dtype=torch.bfloat16, **TINY)
    _randomize(model, 0)
    return model


def _flux_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(1, 16, 8, 8, generator=g), timestep=torch.tensor([0.7]),
                context=torch.randn(1, 8, 64, generator=g), y=torch.randn(1, 32, generator=g),
                guidance=torch.tensor([3.5]))


@pytest.mark.parametrize("fmt,tol", [("svdq_w4a4", 0.3), ("ternary", 0.6)])
def test_ops_build_comfy_flux_with_quantized_layers(comfy, tiny_flux, fmt, tol):
    """The Ops-built model equals ComfyUI's 16-bit FLUX with each quantized layer swapped for a standalone
    lowbit module (so the integration adds no error), and stays near the 16-bit model (random weights,
    measured: W4A4 ~0.16, ternary ~0.4 relative error)."""
    from comfyui_lowbit.nodes.ops import lowbit_modules, make_ops
    from comfyui_lowbit.quant_ops import LowBitLinear, MODULES

    sd16 = {k: v.clone() for k, v in tiny_flux.state_dict().items()}
    qsd, layers = _quantize_sd(tiny_flux, _flux_fmt(fmt))
    ref = comfy.sd.load_diffusion_model_state_dict(_bfl(sd16))
    mp = comfy.sd.load_diffusion_model_state_dict(_bfl(qsd), model_options={"custom_operations": make_ops(layers)})
    dm = mp.model.diffusion_model
    quant = lowbit_modules(dm)
    assert set(quant) == set(layers) and len(layers) > 20
    for name, m in quant.items():  # logical shapes, packed weight in the state dict
        orig = tiny_flux.get_submodule(name)
        assert (m.in_features, m.out_features) == (orig.in_features, orig.out_features)
        assert tuple(m.weight_shape) == tuple(orig.weight.shape)
        assert isinstance(m, LowBitLinear) and m.weight.dtype == torch.uint8
    keys = mp.model.state_dict().keys()
    assert "diffusion_model.double_blocks.0.img_attn.qkv.weight" in keys
    assert "diffusion_model.double_blocks.0.img_attn.qkv.wscales" in keys
    # 16-bit layers are ComfyUI's own and hold the same weights
    assert not isinstance(dm.img_in, LowBitLinear)
    torch.testing.assert_close(dm.img_in.weight.float(), ref.model.diffusion_model.img_in.weight.float())
    with torch.no_grad():
        a = ref.model.diffusion_model(**_flux_inputs())
        b = dm(**_flux_inputs())
        swapped = comfy.sd.load_diffusion_model_state_dict(_bfl(sd16)).model.diffusion_model
        for name, m in quant.items():
            swapped.set_submodule(name, MODULES[m.fmt](m.packed()))
        c = swapped(**_flux_inputs())
    torch.testing.assert_close(b, c, rtol=0, atol=0)
    rel = ((a.float() - b.float()).norm() / a.float().norm()).item()
    print(f"{fmt}: relative output error vs 16-bit {rel:.3f}")
    assert rel < tol, f"{fmt}: relative output error {rel:.3f} vs the 16-bit model (bound {tol})"


def test_ops_low_vram_partial_load_and_offload(comfy, tiny_flux):
    """ModelPatcher's low-VRAM load marks offloaded quantized layers for casting; results do not change."""
    from comfyui_lowbit.nodes.ops import lowbit_modules, make_ops

    qsd, layers = _quantize_sd(tiny_flux, _flux_fmt("svdq_w4a4"))
    mp = comfy.sd.load_diffusion_model_state_dict(_bfl(qsd), model_options={"custom_operations": make_ops(layers)})
    dm = mp.model.diffusion_model
    with torch.no_grad():
        full = dm(**_flux_inputs())
    cpu = torch.device("cpu")
    mp.patch_model(device_to=cpu, lowvram_model_memory=200 * 1024)  # far below the model size
    try:
        assert mp.model.model_lowvram
        cast = [n for n, m in lowbit_modules(dm).items() if m.comfy_cast_weights]
        assert cast, "no quantized layer was put in low-VRAM (cast) mode"
        with torch.no_grad():
            low = dm(**_flux_inputs())
        torch.testing.assert_close(low, full)
    finally:
        mp.unpatch_model(device_to=cpu)
    assert not any(m.comfy_cast_weights for m in lowbit_modules(dm).values())


def test_ops_on_comfy_t5_text_encoder(comfy):
    """ComfyUI's FLUX text encoder classes hard-code T5-XXL / CLIP-L sizes, so the Ops path is tested on
    ComfyUI's T5 module built from a tiny config (the loader passes the same config override)."""
    import comfy.text_encoders.t5
    from comfyui_lowbit.nodes.ops import lowbit_modules, make_ops
    from comfyui_lowbit.quant_ops import MODULES

    t5 = comfy.text_encoders.t5.T5(TINY_T5, torch.bfloat16, None, comfy.ops.manual_cast)
    _randomize(t5, 2)
    qsd, layers = _quantize_sd(t5, lambda n, m: "w4a16" if n.startswith("encoder.") else None)
    qt5 = comfy.text_encoders.t5.T5(TINY_T5, torch.bfloat16, None, make_ops(layers))
    missing, unexpected = qt5.load_state_dict(qsd, strict=False)
    assert not missing and not unexpected
    assert set(lowbit_modules(qt5)) == set(layers) and len(layers) == 2 * 7
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(1, 12)
    with torch.no_grad():
        a = t5(ids, mask)[0].float()
        b = qt5(ids, mask)[0].float()
        for name, m in lowbit_modules(qt5).items():
            t5.set_submodule(name, MODULES[m.fmt](m.packed()))
        c = t5(ids, mask)[0].float()
    torch.testing.assert_close(b, c, rtol=0, atol=0)
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 0.5, f"W4A16 T5 (random weights; measured ~0.36): relative error {rel:.3f}"


def test_unknown_layer_config_is_a_clear_error(comfy, tiny_flux):
    from comfyui_lowbit.nodes.ops import make_ops

    qsd, layers = _quantize_sd(tiny_flux, _flux_fmt("svdq_w4a4"))
    layers.pop("double_blocks.1.img_attn.qkv")
    with pytest.raises(ValueError, match=r"double_blocks\.1\.img_attn\.qkv.*lowbit\.layers"):
        comfy.sd.load_diffusion_model_state_dict(_bfl(qsd), model_options={"custom_operations": make_ops(layers, source="x.safetensors")})
