"""ComfyUI integration: the custom operations in-process, then the nodes in a real headless ComfyUI.

Needs a ComfyUI checkout (0.29.0) in COMFYUI_PATH and its Python environment:
    COMFYUI_PATH=/work/comfyui /work/cvenv/bin/python -m pytest -q tests/test_comfyui_nodes.py
"""
import os
import sys

import pytest
import torch
from synthetic import quantize_linears, randomize_module

COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY, reason="COMFYUI_PATH is not set (point it at a ComfyUI 0.29.0 checkout)")]

TINY = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=256,
            mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56], theta=10000,
            patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
TINY_T5 = dict(d_ff=256, d_kv=64, d_model=128, num_heads=2, num_layers=2, vocab_size=512, dense_act_fn="gelu_pytorch_tanh",
               is_gated_act=True, model_type="t5", relative_attention_num_buckets=32, layer_norm_epsilon=1e-6)



_QUANTIZED = {}


def _quantized_flux(model, fmt):
    """(state dict, layers) of the in-process tiny FLUX quantized with block format `fmt`, computed once."""
    if fmt not in _QUANTIZED:
        _QUANTIZED[fmt] = quantize_linears(model, _flux_fmt(fmt))
    sd, layers = _QUANTIZED[fmt]
    return dict(sd), {k: dict(v) for k, v in layers.items()}


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
    randomize_module(model, 0)
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
    qsd, layers = _quantized_flux(tiny_flux, fmt)
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

    qsd, layers = _quantized_flux(tiny_flux, "svdq_w4a4")
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
    randomize_module(t5, 2)
    qsd, layers = quantize_linears(t5, lambda n, m: "w4a16" if n.startswith("encoder.") else None)
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

    qsd, layers = _quantized_flux(tiny_flux, "svdq_w4a4")
    layers.pop("double_blocks.1.img_attn.qkv")
    with pytest.raises(ValueError, match=r"double_blocks\.1\.img_attn\.qkv.*lowbit\.layers"):
        comfy.sd.load_diffusion_model_state_dict(_bfl(qsd), model_options={"custom_operations": make_ops(layers, source="x.safetensors")})


def test_backend_choice_is_per_model_during_sampling(comfy, tmp_path):
    """backend='reference' holds inside this model's calls only (an APPLY_MODEL wrapper, kept by clones);
    outside them the process default is untouched. backend='triton' on a CPU-only ComfyUI is refused at load."""
    import comfy.sample
    from tiny_models import write_tiny_lowbit_flux

    from comfyui_lowbit import kernels
    from comfyui_lowbit.nodes.loaders import load_lowbit_diffusion_model
    from comfyui_lowbit.nodes.ops import lowbit_modules

    path = write_tiny_lowbit_flux(tmp_path / "w4a4.safetensors", "svdq_w4a4", rank=16, vec_in_dim=64)
    mp = load_lowbit_diffusion_model(path, None, "reference").clone()
    seen = []
    layer = next(iter(lowbit_modules(mp.model.diffusion_model).values()))
    layer.register_forward_pre_hook(lambda m, a: seen.append(kernels.requested_backend()))
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 8, 128, generator=g), {"pooled_output": torch.randn(1, 64, generator=g), "guidance": 3.5}]]
    latent = torch.zeros(1, 16, 4, 4)
    noise = torch.randn(latent.shape, generator=g)
    out = comfy.sample.sample(mp, noise, 2, 1.0, "euler", "simple", cond, cond, latent, disable_pbar=True, seed=0)
    assert torch.isfinite(out).all()
    assert seen and set(seen) == {"reference"}
    assert kernels.requested_backend() == os.environ.get("LOWBIT_BACKEND", "auto")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="backend 'triton' needs a GPU"):
            load_lowbit_diffusion_model(path, None, "triton")


# ---------------------------------------------------------------------------------------------------------
# Headless ComfyUI server (one per module): tiny FLUX / T5 / CLIP-L files (tests/tiny_models.py, quantized
# through checkpoint.convert) in a temporary base directory, API workflows over HTTP. The tiny FLUX reads
# T5 width 128 and a pooled vector of 64 (the tiny CLIP-L's width); where no text encoder is involved,
# the conditioning comes from a seeded test node.

VEC = 64  # pooled width: the tiny CLIP-L's hidden size and the tiny FLUX's vec_in_dim
LATENT_TOL = {"svdq_w4a4": 0.15, "ternary": 0.35}  # sampled latent vs 16-bit, relative L2 (measured below)
TE_TOL = 0.25  # latent from lowbit text encoders vs from the same 16-bit ones, relative L2
RSS_BOUND_MB = 32  # a leaked tiny model is ~1 MB: the live-module count is the exact check, RSS the coarse one


def _tiny_clip_l(comfy, seed=5):
    """A ComfyUI CLIP-L text model with CLIP-L's vocabulary and positions but width 64 and 2 layers."""
    import json

    import comfy.clip_model

    with open(os.path.join(COMFY, "comfy", "sd1_clip_config.json")) as f:
        cfg = json.load(f)
    cfg.update(hidden_size=VEC, num_attention_heads=1, intermediate_size=128, num_hidden_layers=2)
    model = comfy.clip_model.CLIPTextModel(cfg, torch.bfloat16, "cpu", comfy.ops.manual_cast)
    randomize_module(model, seed)
    return model, cfg


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    from comfyui_harness import ComfyServer
    from safetensors.torch import save_file
    from tiny_models import write_tiny_flux, write_tiny_lowbit_flux, write_tiny_t5

    from comfyui_lowbit import checkpoint

    base = tmp_path_factory.mktemp("comfyui")
    # TRITON_INTERPRET is removed so the server is a plain CPU-only ComfyUI (backend=triton must be refused)
    srv = ComfyServer(COMFY, base, python=sys.executable, extra_args=["--cache-classic"], env={"TRITON_INTERPRET": None})
    srv._layout()
    dm, te = srv.models / "diffusion_models", srv.models / "text_encoders"
    write_tiny_flux(dm / "tiny_flux_bf16.safetensors", vec_in_dim=VEC)
    write_tiny_lowbit_flux(dm / "tiny_flux_w4a4.safetensors", "svdq_w4a4", rank=16, vec_in_dim=VEC)
    write_tiny_lowbit_flux(dm / "tiny_flux_ternary.safetensors", "ternary", rank=32, vec_in_dim=VEC)
    write_tiny_t5(te / "tiny_t5_bf16.safetensors")
    clip, cfg = _tiny_clip_l(comfy)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(te / "tiny_clip_l_bf16.safetensors"))
    qsd, layers = quantize_linears(clip, lambda n, m: "w4a16" if n.startswith("text_model.encoder.") else None)
    checkpoint.save_checkpoint(str(te / "tiny_clip_l_w4a16.safetensors"), qsd, layers, model="clip_l", config=cfg)
    with srv:
        info = srv.get("/object_info")
        from comfyui_lowbit.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401 (import check)
        missing = [n for n in NODE_CLASS_MAPPINGS if n not in info]
        assert not missing, f"pack did not register {missing}:\n{srv.log_tail()}"
        yield srv


def test_server_node_definitions(server):
    """Every pack node is in category 'lowbit' with a display name and a tooltip on every input."""
    from comfyui_lowbit.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS) and len(NODE_CLASS_MAPPINGS) >= 5
    for name in NODE_CLASS_MAPPINGS:
        d = server.object_info(name)
        assert d["category"] == "lowbit", name
        assert d["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[name]
        for section in ("required", "optional"):
            for inp, spec in d["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    loader = server.object_info("LowBitDiffusionModelLoader")["input"]["required"]
    assert {"tiny_flux_w4a4.safetensors", "tiny_flux_ternary.safetensors"} <= set(loader["model_name"][0])
    assert loader["backend"][0] == ["auto", "reference", "triton"]
    assert loader["compute_dtype"][0] == ["auto", "bfloat16", "float16"]
    opt = server.object_info("LowBitDiffusionModelLoader")["input"]["optional"]
    assert opt["activations"][0] == ["auto", "int4", "int8", "fp8"] and opt["activations"][1]["default"] == "auto"
    te = server.object_info("LowBitTextEncoderLoader")["input"]["required"]
    assert "tiny_t5_bf16.safetensors" in te["clip_name1"][0] and "tiny_clip_l_bf16.safetensors" in te["clip_name2"][0]
    q = server.object_info("LowBitQuantizeModel")["input"]["required"]
    assert "diffusion_models/tiny_flux_bf16.safetensors" in q["model_name"][0]
    assert "text_encoders/tiny_t5_bf16.safetensors" in q["model_name"][0]


def _lowbit_loader(name, backend="auto", compute_dtype="auto", activations="auto"):
    return {"class_type": "LowBitDiffusionModelLoader",
            "inputs": {"model_name": name, "backend": backend, "compute_dtype": compute_dtype, "activations": activations}}


def _unet_loader(name):
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}


def _sampler(model, cond, prefix, seed=0, steps=3, ids=("3", "4", "5", "6")):
    """FluxGuidance -> EmptySD3LatentImage -> KSampler -> SaveLatent, as nodes with the given ids."""
    g, e, k, s = ids
    return {
        g: {"class_type": "FluxGuidance", "inputs": {"conditioning": cond, "guidance": 3.5}},
        e: {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        k: {"class_type": "KSampler", "inputs": {"model": model, "seed": seed, "steps": steps, "cfg": 1.0,
                                                 "sampler_name": "euler", "scheduler": "simple", "positive": [g, 0],
                                                 "negative": cond, "latent_image": [e, 0], "denoise": 1.0}},
        s: {"class_type": "SaveLatent", "inputs": {"samples": [k, 0], "filename_prefix": prefix}},
    }


def _sampling(loader, prefix, seed=0, steps=3, model_node=None):
    wf = {"1": loader,
          "2": {"class_type": "LowBitTestConditioning",
                "inputs": {"seed": 7, "tokens": 8, "context_dim": 128, "pooled_dim": VEC}}}
    wf.update(_sampler([model_node or "1", 0], ["2", 0], prefix, seed, steps))
    return wf


def _latent(server, entry, node="6"):
    from comfyui_harness import output_files
    from safetensors.torch import load_file

    files = output_files(entry, node, "latents")
    assert len(files) == 1, entry.get("outputs")
    f = files[0]
    return load_file(str(server.output / f["subfolder"] / f["filename"]))["latent_tensor"]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def latent16(server):
    return _latent(server, server.run(_sampling(_unet_loader("tiny_flux_bf16.safetensors"), "t/bf16")))


_LOWBIT_LATENTS = {}  # file name -> latent sampled with backend auto (reused by the backend test)


@pytest.mark.parametrize("fmt,name", [("svdq_w4a4", "tiny_flux_w4a4.safetensors"), ("ternary", "tiny_flux_ternary.safetensors")])
def test_server_samples_lowbit_flux_close_to_16bit(server, latent16, fmt, name):
    """KSampler (3 euler steps, 32x32) on the lowbit model vs the same workflow on the 16-bit file through
    ComfyUI's own UNETLoader. After the prompt, no module of the GPU Triton kernels was imported (CPU: auto
    -> reference)."""
    wf = _sampling(_lowbit_loader(name), f"t/{fmt}")
    wf["9"] = {"class_type": "LowBitTestModules", "inputs": {"contains": ".kernels.triton", "nonce": 1, "after": ["5", 0]}}
    entry = server.run(wf)
    lat = _LOWBIT_LATENTS[name] = _latent(server, entry)
    assert lat.shape == latent16.shape == (1, 16, 4, 4)
    assert torch.isfinite(lat).all()
    rel = _rel(lat, latent16)
    print(f"{fmt}: sampled latent relative L2 distance to the 16-bit one: {rel:.4f}")
    assert 0 < rel < LATENT_TOL[fmt], f"{fmt}: latent relative distance {rel:.3f} (bound {LATENT_TOL[fmt]})"
    assert entry["outputs"]["9"]["modules"] == [], "the CPU run imported the Triton kernels"


_MODE_LATENTS = {}


@pytest.mark.parametrize("fmt,name", [("svdq_w4a4", "tiny_flux_w4a4.safetensors"), ("ternary", "tiny_flux_ternary.safetensors")])
@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_server_fp8_and_int8_activations_close_to_16bit(server, latent16, fmt, name, mode):
    """The same checkpoint with activations=fp8 (e4m3 per token) or int8 (per token after smoothing; the PyTorch
    reference on the CPU): W4A4 lands at least as close to the 16-bit latent as with its int4 activations, and int8
    within 5% of fp8's distance (issue 28); ternary (16-bit activations otherwise) stays within a few percent of
    its own distance (with int8, which ternary takes unsmoothed, within 10%)."""
    native = _LOWBIT_LATENTS.get(name)
    if native is None:
        native = _LOWBIT_LATENTS[name] = _latent(server, server.run(_sampling(_lowbit_loader(name, activations="int4"),
                                                                             f"t/{fmt}_int4")))
    got = _MODE_LATENTS[name, mode] = _latent(server, server.run(_sampling(_lowbit_loader(name, activations=mode),
                                                                           f"t/{fmt}_{mode}")))
    rel_native, rel = _rel(native, latent16), _rel(got, latent16)
    print(f"{fmt}: sampled latent relative L2 distance to the 16-bit one: native activations {rel_native:.4f}, "
          f"{mode} {rel:.4f}")
    assert 0 < rel and not torch.equal(got, native)
    bound = rel_native if fmt == "svdq_w4a4" else (1.05 if mode == "fp8" else 1.10) * rel_native + 0.002
    assert rel <= bound, f"{fmt}: {mode} activations {rel:.4f} vs native {rel_native:.4f}"
    if mode == "int8" and fmt == "svdq_w4a4" and (name, "fp8") in _MODE_LATENTS:
        rel_fp8 = _rel(_MODE_LATENTS[name, "fp8"], latent16)
        assert rel <= 1.05 * rel_fp8, f"int8 {rel:.4f} vs fp8 {rel_fp8:.4f}"


def test_server_backend_reference_equals_auto_on_cpu_and_triton_is_refused(server):
    from comfyui_harness import ComfyError

    a = _LOWBIT_LATENTS.get("tiny_flux_w4a4.safetensors")
    if a is None:
        a = _latent(server, server.run(_sampling(_lowbit_loader("tiny_flux_w4a4.safetensors", "auto"), "t/auto")))
    r = _latent(server, server.run(_sampling(_lowbit_loader("tiny_flux_w4a4.safetensors", "reference"), "t/ref")))
    torch.testing.assert_close(a, r, rtol=0, atol=0)
    with pytest.raises(ComfyError, match=r"backend 'triton' needs a GPU.*'auto' or 'reference'"):
        server.run(_sampling(_lowbit_loader("tiny_flux_w4a4.safetensors", "triton"), "t/triton"))


def test_server_rejects_a_16bit_file_with_its_name(server):
    from comfyui_harness import ComfyError

    with pytest.raises(ComfyError, match=r"tiny_flux_bf16\.safetensors: not a lowbit checkpoint"):
        server.run(_sampling(_lowbit_loader("tiny_flux_bf16.safetensors"), "t/bad"))


def test_server_core_model_patch_applies_to_lowbit_model(server):
    """ComfyUI's ModelSamplingFlux (an object patch on the MODEL) changes the lowbit model's result the way it
    changes the 16-bit model's, and the patched lowbit latent stays near the patched 16-bit one."""
    def patched(loader, prefix):
        wf = _sampling(loader, prefix, model_node="10")
        wf["10"] = {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 3.0,
                                                                  "base_shift": 2.0, "width": 32, "height": 32}}
        return _latent(server, server.run(wf))

    p16 = patched(_unet_loader("tiny_flux_bf16.safetensors"), "t/p16")
    plow = patched(_lowbit_loader("tiny_flux_w4a4.safetensors"), "t/plow")
    plain = _LOWBIT_LATENTS.get("tiny_flux_w4a4.safetensors")
    if plain is None:
        plain = _latent(server, server.run(_sampling(_lowbit_loader("tiny_flux_w4a4.safetensors"), "t/plain")))
    print(f"ModelSamplingFlux: patched lowbit vs patched 16-bit {_rel(plow, p16):.4f}, patched vs unpatched "
          f"lowbit {_rel(plow, plain):.4f}")
    assert _rel(plow, p16) < LATENT_TOL["svdq_w4a4"]
    assert _rel(plow, plain) > 0.05


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_server_compute_dtype(server, latent16, dtype):
    """compute_dtype sets the dtype the model is stored in (ComfyUI picks float32 on CPU otherwise and computes
    in float32 there, so bfloat16 matches auto exactly, float16 rounds the scales): still close."""
    lat = _latent(server, server.run(_sampling(_lowbit_loader("tiny_flux_w4a4.safetensors", "auto", dtype), f"t/{dtype}")))
    rel = _rel(lat, latent16)
    print(f"W4A4 with compute_dtype {dtype}: latent relative distance to the 16-bit model {rel:.4f}")
    assert torch.isfinite(lat).all() and rel < LATENT_TOL["svdq_w4a4"]


def test_server_refusals_name_the_problem(server):
    """Calibrating a lowbit model and quantizing a lowbit file are refused with the reason."""
    from comfyui_harness import ComfyError

    wf = _sampling(_lowbit_loader("tiny_flux_w4a4.safetensors"), "t/calib_bad", model_node="10")
    wf["10"] = {"class_type": "LowBitCalibrate", "inputs": {"model": ["1", 0]}}
    with pytest.raises(ComfyError, match=r"LowBit Calibrate needs the 16-bit model"):
        server.run(wf)
    quant = {"1": {"class_type": "LowBitQuantizeModel", "inputs": {
        "model_name": "diffusion_models/tiny_flux_w4a4.safetensors", "format": "ternary", "rank": 16,
        "calibration": "none (data-free)", "output_name": "requantized"}}}
    with pytest.raises(ComfyError, match=r"tiny_flux_w4a4\.safetensors is already a lowbit 'flux' checkpoint"):
        server.run(quant)
    assert not (server.models / "diffusion_models" / "requantized.safetensors").exists()


def test_server_text_encoders_lowbit_t5_and_clip_l(server):
    """The quantize node writes a lowbit T5 next to the 16-bit one; LowBit Text Encoders loads it with a
    16-bit or lowbit CLIP-L (either order) through ComfyUI's FLUX text-encoder classes; CLIPTextEncode's
    conditioning then drives KSampler on the tiny FLUX. Reference: the same loader on both 16-bit files."""
    from comfyui_lowbit import checkpoint

    server.run({"1": {"class_type": "LowBitQuantizeModel", "inputs": {
        "model_name": "text_encoders/tiny_t5_bf16.safetensors", "format": "svdq_w4a4", "rank": 0,
        "calibration": "none (data-free)", "output_name": "tiny_t5_lowbit"}}})
    info = checkpoint.read_info(str(server.models / "text_encoders" / "tiny_t5_lowbit.safetensors"))
    assert info.model == "t5" and len(info.layers) == 2 * 7
    assert {c["format"] for c in info.layers.values()} == {"w4a16"}

    pairs = {"16bit": ("tiny_t5_bf16.safetensors", "tiny_clip_l_bf16.safetensors"),
             "t5_lowbit": ("tiny_t5_lowbit.safetensors", "tiny_clip_l_bf16.safetensors"),
             "both_lowbit": ("tiny_clip_l_w4a16.safetensors", "tiny_t5_lowbit.safetensors")}
    wf = {"1": _unet_loader("tiny_flux_bf16.safetensors")}
    for i, (tag, (a, b)) in enumerate(pairs.items()):
        n = lambda j: f"{i}{j}"  # noqa: E731
        wf[n(0)] = {"class_type": "LowBitTextEncoderLoader", "inputs": {"clip_name1": a, "clip_name2": b, "compute_dtype": "auto"}}
        wf[n(1)] = {"class_type": "CLIPTextEncode", "inputs": {"clip": [n(0), 0], "text": "a lighthouse on a cliff at dusk"}}
        wf.update(_sampler(["1", 0], [n(1), 0], f"t/te_{tag}", ids=(n(2), n(3), n(4), n(5))))
    entry = server.run(wf)
    lat = {tag: _latent(server, entry, f"{i}5") for i, tag in enumerate(pairs)}
    for tag in ("t5_lowbit", "both_lowbit"):
        assert torch.isfinite(lat[tag]).all()
        rel = _rel(lat[tag], lat["16bit"])
        print(f"text encoders {tag}: latent relative distance to 16-bit text encoders {rel:.4f}")
        assert 0 < rel < TE_TOL, f"{tag}: {rel:.3f}"


def _live_modules(server, nonce):
    entry = server.run({"1": {"class_type": "LowBitTestLiveModules", "inputs": {"nonce": nonce}}})
    return entry["outputs"]["1"]["live"][0]


def test_server_reload_switch_unload_no_growth(server):
    """Same model loaded twice (the backend input changes, so the loader runs again), switching between two
    lowbit models, then /free. Counted after sampling inside each prompt, exactly one model's quantized
    modules are alive (no stale copy survives a reload or a switch; --cache-classic keeps only the last
    prompt's outputs), none after the next prompt, and the server's RSS stays within the bound."""
    from comfyui_lowbit import checkpoint

    n_layers = len(checkpoint.read_info(str(server.models / "diffusion_models" / "tiny_flux_w4a4.safetensors")).layers)
    plan = [("tiny_flux_w4a4.safetensors", "auto"), ("tiny_flux_w4a4.safetensors", "reference"),
            ("tiny_flux_ternary.safetensors", "auto")] * 2
    rss, live = [], []
    for i, (name, backend) in enumerate(plan):
        wf = _sampling(_lowbit_loader(name, backend), f"t/mem{i}", seed=i, steps=1)
        wf["7"] = {"class_type": "LowBitTestLiveModules", "inputs": {"nonce": i, "after": ["5", 0]}}
        live.append(server.run(wf)["outputs"]["7"]["live"][0])
        rss.append(server.rss_mb())
    server.free()
    live_after = _live_modules(server, 99)
    rss_after = server.rss_mb()
    growth = max(rss[3:]) - rss[2]
    print(f"RSS MB per prompt: {[round(r, 1) for r in rss]}; after /free {rss_after:.1f}; growth after the "
          f"first round {growth:.1f} MB; live quantized modules per prompt {live}, after /free {live_after}")
    assert live == [n_layers] * len(plan), f"expected one model's {n_layers} quantized modules alive: {live}"
    assert live_after == 0
    assert growth < RSS_BOUND_MB, f"RSS grew {growth:.1f} MB over the second round: {rss}"
    assert rss_after < rss[2] + RSS_BOUND_MB


def test_server_calibrate_then_quantize_with_it_then_sample(server, latent16):
    """Sampling through LowBit Calibrate records every block linear; the saved file feeds the quantize node,
    whose checkpoint loads and samples; the quantize node never overwrites. (Ternary here: calibrated W4A4
    grid-searches the smoothing per layer, minutes on this shared CPU; tests/test_convert covers it.)"""
    from safetensors import safe_open

    from comfyui_harness import ComfyError, output_files
    from comfyui_lowbit import checkpoint

    wf = _sampling(_unet_loader("tiny_flux_bf16.safetensors"), "t/calib", steps=3, model_node="10")
    wf["10"] = {"class_type": "LowBitCalibrate", "inputs": {"model": ["1", 0]}}
    wf["11"] = {"class_type": "LowBitSaveCalibration",
                "inputs": {"model": ["10", 0], "samples": ["5", 0], "filename_prefix": "lowbit/calib"}}
    entry = server.run(wf)
    lat = _latent(server, entry)
    torch.testing.assert_close(lat, latent16)  # recording does not change the result
    rel_path = output_files(entry, "11", "text")[0]
    calib = server.output / rel_path
    with safe_open(str(calib), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        amax = {k: f.get_tensor(k) for k in keys}
    w4 = checkpoint.read_info(str(server.models / "diffusion_models" / "tiny_flux_w4a4.safetensors"))
    blocks = {k for k in keys if k.startswith("block_input.")}
    assert keys - blocks == {f"{name}.input_{what}" for name in w4.layers for what in ("absmax", "sample")}
    # one first-block input per model call (3 steps, batch 1), all kept (default 4): 4 + 8 tokens, head dim 128
    assert blocks == {f"block_input.{i}.{n}" for i in range(3) for n in ("img", "txt", "vec", "pe_cos", "pe_sin")}
    assert amax["block_input.0.img"].shape == (1, 4, 256) and amax["block_input.0.pe_sin"].shape == (1, 1, 12, 64)
    assert meta["lowbit.calib_version"] == "2" and int(meta["lowbit.samples"]) == 3 and meta["lowbit.block_inputs"] == "3"
    amax = {k: v for k, v in amax.items() if k not in blocks}
    for k, t in amax.items():
        if k.endswith("_absmax"):
            assert t.dtype == torch.float32 and t.dim() == 1 and (t > 0).all(), k
        else:  # 3 steps of a 32x32 latent: fewer rows than 256, so every row seen is kept
            assert t.dtype == torch.bfloat16 and t.dim() == 2 and 0 < t.shape[0] <= 256, (k, t.shape)
    assert amax["double_blocks.0.img_attn.qkv.input_absmax"].shape == (256,)
    assert amax["single_blocks.0.linear2.input_absmax"].shape == (256 + 1024,)

    quant = {"1": {"class_type": "LowBitQuantizeModel", "inputs": {
        "model_name": "diffusion_models/tiny_flux_bf16.safetensors", "format": "ternary", "rank": 32,
        "calibration": rel_path, "output_name": "tiny_flux_calibrated", "refine_steps": 10}}}
    entry = server.run(quant, timeout=600)
    assert "block-wise refinement (10 steps)" in " ".join(output_files(entry, "1", "text"))
    out = server.models / "diffusion_models" / "tiny_flux_calibrated.safetensors"
    info = checkpoint.read_info(str(out))
    assert info.model == "flux" and len(info.layers) > 0 and "lowbit.refine" in info.metadata
    lat_q = _latent(server, server.run(_sampling(_lowbit_loader(out.name), "t/calibrated")))
    rel = _rel(lat_q, latent16)
    print(f"quantize node (ternary, calibrated): latent relative distance {rel:.4f}")
    assert rel < LATENT_TOL["ternary"]
    with pytest.raises(ComfyError, match=r"tiny_flux_calibrated\.safetensors.*already exists"):
        server.run(quant)


# measured on this machine (BENCHMARKS.md): W4A4 0.110 vs 0.125 with the ranges only (0.113 data-free), ternary
# 0.220 vs 0.240 (0.260 data-free); issue 14's targets (0.08 / 0.18) are not reached on this random-weight model


def test_server_calibrated_quantizers_latent_error(server, latent16, tmp_path):
    """Calibrate through ComfyUI on other noise, conditioning and resolution than the evaluation (batch 4,
    128x128, 3 steps), then quantize with the input ranges only (a version 1 file: today's calibrated
    quantizer) and with the input samples (the calibrated quantizers); sample the evaluation workflow."""
    from comfyui_harness import output_files
    from safetensors import safe_open
    from safetensors.torch import save_file

    from comfyui_lowbit import checkpoint

    wf = {"1": _unet_loader("tiny_flux_bf16.safetensors"),
          "2": {"class_type": "LowBitTestConditioning", "inputs": {"seed": 11, "tokens": 8, "context_dim": 128, "pooled_dim": VEC}},
          "10": {"class_type": "LowBitCalibrate", "inputs": {"model": ["1", 0], "tokens_per_layer": 256}}}
    wf.update(_sampler(["10", 0], ["2", 0], "t/calib4", seed=1))
    wf["4"]["inputs"].update(width=128, height=128, batch_size=4)
    wf["11"] = {"class_type": "LowBitSaveCalibration", "inputs": {"model": ["10", 0], "samples": ["5", 0], "filename_prefix": "lowbit/calib4"}}
    calib = str(server.output / output_files(server.run(wf), "11", "text")[0])
    with safe_open(calib, "pt") as f:
        assert f.metadata()["lowbit.calib_version"] == "2"
        v1 = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".input_absmax")}
        assert f.get_tensor("double_blocks.0.img_attn.qkv.input_sample").shape == (256, 256)
    calib_v1 = str(tmp_path / "calib_v1.safetensors")
    save_file(v1, calib_v1, metadata={"lowbit.calib_version": "1"})
    src = str(server.models / "diffusion_models" / "tiny_flux_bf16.safetensors")
    rel = {}
    for fmt, rank in (("svdq_w4a4", 16), ("ternary", 32)):
        for tag, c in (("ranges only", calib_v1), ("samples", calib)):
            name = f"tiny_flux_{fmt}_{'v1' if c is calib_v1 else 'v2'}.safetensors"
            s = checkpoint.quantize_file(src, str(server.models / "diffusion_models" / name), fmt, rank=rank, calib=c)
            lat = _latent(server, server.run(_sampling(_lowbit_loader(name), f"t/{name}")))
            rel[(fmt, tag)] = _rel(lat, latent16)
            print(f"{fmt} r{rank} calibrated ({tag}): latent relative L2 {rel[(fmt, tag)]:.4f}, {s['seconds']:.0f} s")
    for fmt in ("svdq_w4a4", "ternary"):
        assert rel[(fmt, "samples")] < rel[(fmt, "ranges only")], rel
