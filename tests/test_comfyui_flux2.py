"""FLUX.2 in ComfyUI: tiny [klein]- and [dev]-shaped transformers (ComfyUI's own Flux class, image_model flux2:
global modulation, SiLU-gated MLPs, no biases) and their tiny Qwen3 / Mistral 3 text encoders, quantized by
`checkpoint.quantize_file`, loaded by the lowbit loaders, LoRAs routed into the low-rank branch; then ComfyUI's
stock FLUX.2 graph (CLIPTextEncode, FluxGuidance, ReferenceLatent, EmptyFlux2LatentImage, Flux2Scheduler,
SamplerCustomAdvanced) in a headless server, lowbit against 16-bit.

    COMFYUI_PATH=/work/comfyui /work/comfyui/venv/bin/python -m pytest -q tests/test_comfyui_flux2.py
"""
import os
import sys

import pytest
import torch
from synthetic import quantize_linears, randomize_module

COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY, reason="COMFYUI_PATH is not set (point it at a ComfyUI 0.29.0 checkout)")]

H = 256
MLP = 3 * H
# ComfyUI's own FLUX.2 unet config (comfy/model_detection.py image_model flux2) at hidden 256
TINY = dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=384, hidden_size=H,
            mlp_ratio=3.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[32, 32, 32, 32], theta=2000,
            patch_size=1, qkv_bias=False, guidance_embed=True, txt_ids_dims=[3], global_modulation=True,
            mlp_silu_act=True, ops_bias=False, default_ref_method="index", ref_index_scale=10.0)


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LOWBIT_BACKEND", "reference")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


# ---- in process: ComfyUI's Flux (flux2) with quantized layers, LoRA routing --------------------------------------

def _bfl(sd):
    return {k.replace("_norm.weight", "_norm.scale"): v for k, v in sd.items()}


@pytest.fixture(scope="module")
def models(comfy):
    """(16-bit ModelPatcher, lowbit W4A4 ModelPatcher, lowbit.layers) of one tiny FLUX.2 built with ComfyUI's class;
    layers chosen by the FLUX.2 family's rules."""
    import comfy.ldm.flux.model

    from comfyui_lowbit.checkpoint.families import FLUX2
    from comfyui_lowbit.nodes.ops import make_ops
    from comfyui_lowbit.nodes.patcher import wrap_patcher

    flux = comfy.ldm.flux.model.Flux(operations=comfy.ops.manual_cast, dtype=torch.bfloat16, **TINY)
    randomize_module(flux, 0)

    def select(name, module):
        return FLUX2.layer_format(name, "svdq_w4a4")

    def args(name, fmt):
        return {"iters": 3, **FLUX2.layer_options(name, fmt)} if fmt == "svdq_w4a4" else {}

    qsd, layers = quantize_linears(flux, select, 16, args)
    mp16 = comfy.sd.load_diffusion_model_state_dict(_bfl({k: v.clone() for k, v in flux.state_dict().items()}))
    mpq = wrap_patcher(comfy.sd.load_diffusion_model_state_dict(_bfl(qsd), model_options={"custom_operations": make_ops(layers)}))
    return mp16, mpq, layers


def test_flux2_layers_and_signs(models):
    """ComfyUI detects FLUX.2 from the lowbit state dict; block linears are W4A4, the three global modulations
    W4A16, everything else ComfyUI's 16-bit layers; no W4A4 layer quantizes its input unsigned (SiLU gates)."""
    from comfyui_lowbit.nodes.ops import lowbit_modules

    _, mpq, layers = models
    assert type(mpq.model).__name__ == "Flux2"
    q = lowbit_modules(mpq.model.diffusion_model)
    assert {n: m.fmt for n, m in q.items()} == {n: c["format"] for n, c in layers.items()}
    mods = {n for n, c in layers.items() if c["format"] == "w4a16"}
    assert mods == {"double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin"}
    assert len(layers) == 2 * 2 * 4 + 2 * 2 + 3
    assert not any(c.get("act_unsigned") for c in layers.values())


def _inputs():
    g = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(1, 128, 4, 4, generator=g), timestep=torch.tensor([0.7]),
                context=torch.randn(1, 8, 384, generator=g), guidance=torch.tensor([3.5]))


def _run(mp):
    mp.patch_model()
    try:
        with torch.no_grad():
            return mp.model.diffusion_model(**_inputs()).float()
    finally:
        mp.unpatch_model()


def _pair(g, rows, cols, rank=4):
    return ((0.1 * torch.randn(rows, rank, generator=g)).to(torch.bfloat16),
            (0.1 * torch.randn(rank, cols, generator=g)).to(torch.bfloat16))


# (BFL layer, rows, cols): W4A4 block layers, a W4A16 global modulation, 16-bit layers
TARGETS = [("double_blocks.0.img_attn.qkv", 3 * H, H), ("double_blocks.1.txt_mlp.2", H, MLP),
           ("double_blocks.0.img_mlp.0", 2 * MLP, H), ("single_blocks.1.linear1", 3 * H + 2 * MLP, H),
           ("single_blocks.0.linear2", H, H + MLP), ("double_stream_modulation_img.lin", 6 * H, H),
           ("img_in", H, 128), ("final_layer.linear", 128, H)]
# diffusers / PEFT names as ComfyUI maps them for FLUX.2 (comfy/utils.py flux_to_diffusers): q/k/v slices of qkv,
# fused single-block projections, ff.linear_in / linear_out; ComfyUI maps no diffusers name to the global modulation
DIFFUSERS = {
    "double_blocks.0.img_attn.qkv": [("transformer_blocks.0.attn.to_q", H), ("transformer_blocks.0.attn.to_k", H),
                                     ("transformer_blocks.0.attn.to_v", H)],
    "double_blocks.1.txt_mlp.2": [("transformer_blocks.1.ff_context.linear_out", H)],
    "double_blocks.0.img_mlp.0": [("transformer_blocks.0.ff.linear_in", 2 * MLP)],
    "single_blocks.1.linear1": [("single_transformer_blocks.1.attn.to_qkv_mlp_proj", 3 * H + 2 * MLP)],
    "single_blocks.0.linear2": [("single_transformer_blocks.0.attn.to_out", H)],
    "img_in": [("x_embedder", H)],
    "final_layer.linear": [("proj_out", 128)],
}


def make_lora(fmt: str, seed: int = 0, rank: int = 4) -> dict:
    """bfl: diffusion_model.<L>.lora_up/down + alpha; aitoolkit: diffusion_model.<L>.lora_A/B (ai-toolkit's FLUX.2
    LoRAs: BFL module names, PEFT tensors); kohya: lora_unet_<L_>; diffusers: transformer.<diffusers module>."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for layer, rows, cols in TARGETS:
        if fmt == "diffusers":
            for mod, n in DIFFUSERS.get(layer, []):
                up, down = _pair(g, n, cols, rank)
                sd[f"transformer.{mod}.lora_A.weight"], sd[f"transformer.{mod}.lora_B.weight"] = down, up
            continue
        up, down = _pair(g, rows, cols, rank)
        if fmt == "aitoolkit":
            sd[f"diffusion_model.{layer}.lora_A.weight"], sd[f"diffusion_model.{layer}.lora_B.weight"] = down, up
            continue
        name = f"diffusion_model.{layer}" if fmt == "bfl" else "lora_unet_" + layer.replace(".", "_")
        sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"] = up, down
        sd[f"{name}.alpha"] = torch.tensor(float(rank))
    return sd


@pytest.mark.parametrize("fmt", ["bfl", "aitoolkit", "kohya", "diffusers"])
def test_lora_key_formats_route_into_the_branch(comfy, models, fmt):
    """Every FLUX.2 key format ComfyUI maps reaches the quantized layers; each one's branch adds exactly ComfyUI's
    own float merge of the patches (packed weights untouched); 16-bit layers get ComfyUI's usual merge."""
    from comfyui_lowbit.nodes.patcher import lowbit_layers

    _, mpq, layers = models
    q = lowbit_layers(mpq.model)
    deq0 = {p: m.dequantize().double() for p, m in q.items()}
    packed = {p: m.weight for p, m in q.items()}
    lq, _ = comfy.sd.load_lora_for_models(mpq, None, make_lora(fmt, seed=1), 0.8, 0)
    mapped = [t for t in TARGETS if fmt != "diffusers" or t[0] in DIFFUSERS]
    for layer, _, _ in mapped:
        assert f"diffusion_model.{layer}.weight" in lq.patches, f"{fmt}: {layer} not mapped"
    lq.patch_model()
    try:
        checked = 0
        for layer, rows, cols in mapped:
            key = f"diffusion_model.{layer}.weight"
            want = comfy.lora.calculate_weight(lq.patches[key], torch.zeros(rows, cols), key).double()
            if layer in layers:
                p = f"diffusion_model.{layer}"
                assert q[p].weight is packed[p]
                got = q[p].dequantize().double() - deq0[p]
                assert _rel(got, want) < 1e-2, f"{fmt} {layer}"
                checked += 1
            else:
                w = lq.model.get_submodule(f"diffusion_model.{layer}").weight.double()
                assert _rel(w - lq.backup[key].weight.double(), want) < 2e-2, f"{fmt} {layer}"
        assert checked == len([t for t in mapped if t[0] in layers])
    finally:
        lq.unpatch_model()
    for p, m in q.items():
        assert torch.equal(m.dequantize().double(), deq0[p])


def test_lora_stack_and_strength_move_output_like_16bit(comfy, models):
    """Two stacked FLUX.2 LoRAs (ai-toolkit + diffusers keys), then new strengths: no reload (the very packed
    tensors), and the lowbit model's output moves as the 16-bit model's does (cosine of the LoRA effects)."""
    from comfyui_lowbit.nodes.patcher import lowbit_layers

    mp16, mpq, _ = models
    q = lowbit_layers(mpq.model)
    packed = {p: (m.weight, m.wscales) for p, m in q.items()}
    base, base16 = _run(mpq), _run(mp16)
    a, d = make_lora("aitoolkit", seed=2), make_lora("diffusers", seed=3)
    for sa, sd_ in ((1.0, 0.6), (-0.5, 0.6), (0.0, 0.0)):
        lq, l16 = mpq, mp16
        for lora, s in ((a, sa), (d, sd_)):
            lq, _ = comfy.sd.load_lora_for_models(lq, None, lora, s, 0)
            l16, _ = comfy.sd.load_lora_for_models(l16, None, lora, s, 0)
        out, out16 = _run(lq), _run(l16)
        for p, m in q.items():
            assert m.weight is packed[p][0] and m.wscales is packed[p][1]
        if sa == sd_ == 0.0:
            assert torch.equal(out, base)
            continue
        cos = _cos(out - base, out16 - base16)
        print(f"FLUX.2 LoRA strengths {sa}/{sd_}: |effect| {_rel(out16, base16):.3f} of the output, "
              f"cosine lowbit vs 16-bit {cos:.3f}")
        assert _rel(out, base) > 0.05 and cos > 0.8


# ---- in process: the FLUX.2 text encoders ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def te_files(comfy, tmp_path_factory):
    from comfyui_harness import apply_compat
    from tiny_models import TINY_MISTRAL_CONFIG, TINY_QWEN3_CONFIG, write_tiny_llm, write_tiny_lowbit_llm

    apply_compat()
    d = tmp_path_factory.mktemp("flux2_te")
    out = {}
    for name, cfg in (("qwen3", TINY_QWEN3_CONFIG), ("mistral", TINY_MISTRAL_CONFIG)):
        out[name] = (write_tiny_llm(d / f"{name}.safetensors", cfg), write_tiny_lowbit_llm(d / f"{name}_w4a16.safetensors", cfg))
    return out


PROMPTS = ("a red fox in fresh snow at dawn", "dawn at snow fresh in fox red a")  # same bytes: same token count


@pytest.mark.parametrize("name,cls,width", [("qwen3", "KleinTokenizer", 2560), ("mistral", "Flux2Tokenizer", 5120)])
def test_text_encoder_w4a16_is_comfyuis_class(comfy, te_files, name, cls, width):
    """The lowbit encoder is ComfyUI's own FLUX.2 text-encoder class with W4A16 linears (embedding and norms 16-bit),
    equal to the 16-bit class with each quantized layer swapped for the standalone lowbit module; its conditioning
    error against the 16-bit encoder is reported next to how far apart two prompts are."""
    from comfyui_lowbit.nodes.loaders import load_lowbit_flux2_text_encoder
    from comfyui_lowbit.nodes.ops import lowbit_modules
    from comfyui_lowbit.quant_ops import MODULES

    src, lowbit = te_files[name]
    c16, cq = load_lowbit_flux2_text_encoder(src), load_lowbit_flux2_text_encoder(lowbit)
    assert type(cq.tokenizer).__name__ == cls and type(cq.cond_stage_model).__mro__[1].__name__ == "Flux2TEModel"
    quant = lowbit_modules(cq.cond_stage_model)
    assert quant and all(m.fmt == "w4a16" for m in quant.values())
    assert not any(n.endswith(("embed_tokens", "norm")) for n in quant)

    def enc(clip, text):
        return clip.encode_from_tokens(clip.tokenize(text)).float()

    a, b = enc(c16, PROMPTS[0]), enc(cq, PROMPTS[0])
    assert a.shape[-1] == 3 * 128 and a.shape == b.shape
    for n, m in quant.items():  # the integration adds nothing: same class, the layers swapped by hand
        c16.cond_stage_model.set_submodule(n, MODULES[m.fmt](m.packed()))
    torch.testing.assert_close(enc(c16, PROMPTS[0]), b, rtol=0, atol=0)
    c16 = load_lowbit_flux2_text_encoder(src)
    err, apart = _rel(b, a), _rel(enc(c16, PROMPTS[1]), a)
    print(f"{name} (width {width} class, tiny width 128): W4A16 conditioning error {err:.3f} (relative L2); "
          f"two prompts differ by {apart:.3f}")
    assert err < 0.3


def test_text_encoder_lora_goes_into_the_branch(comfy, te_files):
    """LoraLoader's clip LoRA (ComfyUI's generic text_encoders.<module> keys) on the lowbit Qwen3 encoder: each LoRA'd
    W4A16 layer computes dequant(W) + B A, the conditioning moves, and without the LoRA it is back exactly."""
    from comfyui_lowbit.nodes.loaders import load_lowbit_flux2_text_encoder
    from comfyui_lowbit.nodes.ops import lowbit_modules

    clip = load_lowbit_flux2_text_encoder(te_files["qwen3"][1])
    quant = lowbit_modules(clip.cond_stage_model)
    g = torch.Generator().manual_seed(5)
    lora = {}
    for name in ("qwen3_4b.transformer.model.layers.3.self_attn.q_proj", "qwen3_4b.transformer.model.layers.9.mlp.down_proj"):
        m = quant[name]
        lora[f"text_encoders.{name}.lora_A.weight"] = 0.05 * torch.randn(4, m.in_features, generator=g)
        lora[f"text_encoders.{name}.lora_B.weight"] = 0.05 * torch.randn(m.out_features, 4, generator=g)
    deq = {n: m.dequantize() for n, m in quant.items()}
    tokens = clip.tokenize(PROMPTS[0])
    base = clip.encode_from_tokens(tokens).float()
    _, with_lora = comfy.sd.load_lora_for_models(None, clip, lora, 0.0, 1.0)
    moved = with_lora.encode_from_tokens(tokens).float()
    print(f"Qwen3 W4A16 + clip LoRA: conditioning moved by {_rel(moved, base):.3f}")
    assert _rel(moved, base) > 0.005
    with_lora.patcher.patch_model()
    try:
        for key in {k.rsplit(".lora_", 1)[0] for k in lora}:
            name = key[len("text_encoders."):]
            a, b = lora[key + ".lora_A.weight"], lora[key + ".lora_B.weight"]
            assert _rel(quant[name].dequantize(), deq[name] + b @ a) < 1e-2, name
    finally:
        with_lora.patcher.unpatch_model()
    torch.testing.assert_close(clip.encode_from_tokens(tokens).float(), base, rtol=0, atol=0)


# ---- headless server: ComfyUI's stock FLUX.2 graph ----------------------------------------------------------------
# Tiny [klein] (no guidance embedder, Qwen3) and [dev] (guidance, Mistral 3) models; 64x64 -> 4x4 latent of 128
# channels; 4 steps of Flux2Scheduler; the reference image goes through the FLUX.2 VAE stand-in.

LATENT_TOL = {"svdq_w4a4": 0.2, "ternary": 0.3}  # transformer's latent vs 16-bit, relative L2 (measured 0.05-0.13)


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    import comfyui_standins as st
    import numpy as np
    from comfyui_harness import ComfyServer
    from PIL import Image
    from tiny_models import (TINY_MISTRAL_CONFIG, TINY_QWEN3_CONFIG, tiny_flux2_state_dict, write_tiny_flux2,
                             write_tiny_llm, write_tiny_lowbit_flux2, write_tiny_lowbit_llm)

    base = tmp_path_factory.mktemp("comfyui_flux2")
    srv = ComfyServer(COMFY, base, python=sys.executable, extra_args=["--cache-classic"])
    srv._layout()
    dm, te = srv.models / "diffusion_models", srv.models / "text_encoders"
    for kind, g in (("klein", False), ("dev", True)):
        write_tiny_flux2(dm / f"flux2_{kind}_bf16.safetensors", guidance_embed=g)
        write_tiny_lowbit_flux2(dm / f"flux2_{kind}_w4a4.safetensors", "svdq_w4a4", rank=16, guidance_embed=g)
    write_tiny_lowbit_flux2(dm / "flux2_klein_ternary.safetensors", "ternary", rank=32, guidance_embed=False)
    for name, cfg in (("qwen3", TINY_QWEN3_CONFIG), ("mistral", TINY_MISTRAL_CONFIG)):
        write_tiny_llm(te / f"{name}_bf16.safetensors", cfg)
        write_tiny_lowbit_llm(te / f"{name}_w4a16.safetensors", cfg)
    st.save(st.flux2_vae_state_dict(), srv.models / "vae" / "flux2-vae.safetensors")
    st.save(st.lora_state_dict(tiny_flux2_state_dict(guidance_embed=False), seed=10, scale=0.15),
            srv.models / "loras" / "flux2-klein-lora.safetensors")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(base / "input" / "reference.png")
    with srv:
        yield srv


def _graph(model_loader, clip_loader, prefix, guidance=None, reference=False, lora=None, seed=0):
    """ComfyUI's stock FLUX.2 text-to-image graph (as its FLUX.2 templates wire it) ending in SaveLatent."""
    wf = {"1": model_loader, "2": clip_loader,
          "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a red fox in fresh snow"}},
          "5": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
          "6": {"class_type": "Flux2Scheduler", "inputs": {"steps": 4, "width": 64, "height": 64}},
          "7": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
          "8": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
          "11": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": prefix}}}
    model, cond = ["1", 0], ["3", 0]
    if lora:
        wf["12"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": lora,
                                                                    "strength_model": 1.0}}
        model = ["12", 0]
    if guidance is not None:
        wf["4"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": cond, "guidance": guidance}}
        cond = ["4", 0]
    if reference:
        wf["13"] = {"class_type": "VAELoader", "inputs": {"vae_name": "flux2-vae.safetensors"}}
        wf["14"] = {"class_type": "LoadImage", "inputs": {"image": "reference.png"}}
        wf["15"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["14", 0], "vae": ["13", 0]}}
        wf["16"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": cond, "latent": ["15", 0]}}
        cond = ["16", 0]
    wf["9"] = {"class_type": "BasicGuider", "inputs": {"model": model, "conditioning": cond}}
    wf["10"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["8", 0], "guider": ["9", 0], "sampler": ["7", 0],
                                                                  "sigmas": ["6", 0], "latent_image": ["5", 0]}}
    return wf


def _unet(name):
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}


def _lowbit(name):
    return {"class_type": "LowBitDiffusionModelLoader", "inputs": {"model_name": name, "backend": "auto",
                                                                   "compute_dtype": "auto", "activations": "auto"}}


def _te(name):
    return {"class_type": "LowBitFlux2TextEncoderLoader", "inputs": {"clip_name": name, "compute_dtype": "auto"}}


def _latent(server, wf):
    from comfyui_harness import output_files
    from safetensors.torch import load_file

    entry = server.run(wf, timeout=900)
    f = output_files(entry, "11", "latents")
    assert len(f) == 1, entry.get("outputs")
    return load_file(str(server.output / f[0]["subfolder"] / f[0]["filename"]))["latent_tensor"]


KINDS = {"klein": ("qwen3", None), "dev": ("mistral", 4.0)}
_LAT = {}


def _sample(server, kind, model, te, **kw):
    key = (kind, model, te, tuple(sorted(kw.items())))
    if key not in _LAT:
        loader = _unet(model) if model.endswith("_bf16.safetensors") else _lowbit(model)
        _LAT[key] = _latent(server, _graph(loader, _te(te), f"f2/{kind}", guidance=KINDS[kind][1], **kw))
    return _LAT[key]


@pytest.mark.parametrize("kind,fmt", [("klein", "svdq_w4a4"), ("klein", "ternary"), ("dev", "svdq_w4a4")])
def test_stock_flux2_graph_lowbit_close_to_16bit(server, kind, fmt):
    """The stock graph on lowbit transformer + lowbit text encoder against ComfyUI's UNETLoader + the 16-bit encoder:
    latent errors reported for the transformer alone, the text encoder alone, and both."""
    te = KINDS[kind][0]
    name = f"flux2_{kind}_{'w4a4' if fmt == 'svdq_w4a4' else fmt}.safetensors"
    ref = _sample(server, kind, f"flux2_{kind}_bf16.safetensors", f"{te}_bf16.safetensors")
    model_only = _rel(_sample(server, kind, name, f"{te}_bf16.safetensors"), ref)
    te_only = _rel(_sample(server, kind, f"flux2_{kind}_bf16.safetensors", f"{te}_w4a16.safetensors"), ref)
    both = _rel(_sample(server, kind, name, f"{te}_w4a16.safetensors"), ref)
    print(f"FLUX.2 {kind} {fmt}: latent error vs 16-bit: transformer {model_only:.3f}, text encoder (W4A16) "
          f"{te_only:.3f}, both {both:.3f}")
    assert ref.shape == (1, 128, 4, 4) and torch.isfinite(ref).all()
    assert model_only < LATENT_TOL[fmt] and te_only < 0.1 and both < LATENT_TOL[fmt] + 0.05


def test_stock_flux2_graph_with_lora(server):
    """LoraLoaderModelOnly with an ai-toolkit-keyed FLUX.2 LoRA on the lowbit [klein] model moves the latent as it
    moves the 16-bit model's (cosine of the LoRA effects)."""
    te = "qwen3_bf16.safetensors"
    b16 = _sample(server, "klein", "flux2_klein_bf16.safetensors", te)
    l16 = _sample(server, "klein", "flux2_klein_bf16.safetensors", te, lora="flux2-klein-lora.safetensors")
    bq = _sample(server, "klein", "flux2_klein_w4a4.safetensors", te)
    lq = _sample(server, "klein", "flux2_klein_w4a4.safetensors", te, lora="flux2-klein-lora.safetensors")
    effect, cos = _rel(l16, b16), _cos(lq - bq, l16 - b16)
    print(f"FLUX.2 klein W4A4 + LoRA: LoRA effect {effect:.3f} of the 16-bit latent, cosine lowbit vs 16-bit {cos:.3f}")
    assert effect > 0.05 and cos > 0.8


def test_stock_flux2_graph_with_reference_image(server):
    """VAEEncode -> ReferenceLatent (FLUX.2's reference images, method "index") works on the lowbit [dev] model
    unchanged: the reference changes the latent, and lowbit stays near 16-bit with it."""
    te = "mistral_w4a16.safetensors"
    ref16 = _sample(server, "dev", "flux2_dev_bf16.safetensors", te, reference=True)
    refq = _sample(server, "dev", "flux2_dev_w4a4.safetensors", te, reference=True)
    noref = _sample(server, "dev", "flux2_dev_w4a4.safetensors", te)
    moved, err = _rel(refq, noref), _rel(refq, ref16)
    print(f"FLUX.2 dev W4A4 with a reference image: the reference moves the latent by {moved:.3f}; "
          f"error vs 16-bit {err:.3f}")
    assert moved > 0.02 and err < LATENT_TOL["svdq_w4a4"]


def test_calibrate_and_quantize_nodes_on_flux2(server):
    """LowBit Calibrate on the 16-bit [klein] model inside the stock graph (the result unchanged), LowBit Save
    Calibration (block linears' ranges and samples, first-block inputs with the raw vec of the global modulation),
    then LowBit Quantize Model with that file and block-wise refinement; the result samples near the 16-bit model."""
    from comfyui_harness import output_files
    from safetensors import safe_open

    from comfyui_lowbit import checkpoint

    te = "qwen3_bf16.safetensors"
    wf = _graph(_unet("flux2_klein_bf16.safetensors"), _te(te), "f2/calib")
    wf["20"] = {"class_type": "LowBitCalibrate", "inputs": {"model": ["1", 0], "tokens_per_layer": 64}}
    wf["9"]["inputs"]["model"] = ["20", 0]
    wf["21"] = {"class_type": "LowBitSaveCalibration", "inputs": {"model": ["20", 0], "samples": ["10", 0],
                                                                  "filename_prefix": "lowbit/flux2"}}
    entry = server.run(wf, timeout=900)
    ref = _sample(server, "klein", "flux2_klein_bf16.safetensors", te)
    f = output_files(entry, "11", "latents")[0]
    from safetensors.torch import load_file
    torch.testing.assert_close(load_file(str(server.output / f["subfolder"] / f["filename"]))["latent_tensor"], ref)
    rel_path = output_files(entry, "21", "text")[0]
    with safe_open(str(server.output / rel_path), "pt") as fh:
        keys = set(fh.keys())
        vec = fh.get_tensor("block_input.0.vec")
    assert vec.shape == (1, H)  # the raw vec, not the modulation outputs
    assert "double_blocks.0.img_mlp.2.input_sample" in keys and not any("modulation" in k for k in keys)
    quant = {"1": {"class_type": "LowBitQuantizeModel", "inputs": {
        "model_name": "diffusion_models/flux2_klein_bf16.safetensors", "format": "ternary", "rank": 32,
        "calibration": rel_path, "output_name": "flux2_klein_calibrated", "refine_steps": 10}}}
    entry = server.run(quant, timeout=900)
    assert "block-wise refinement (10 steps)" in " ".join(output_files(entry, "1", "text"))
    info = checkpoint.read_info(str(server.models / "diffusion_models" / "flux2_klein_calibrated.safetensors"))
    assert info.family.name == "flux2" and "lowbit.refine" in info.metadata
    err = _rel(_sample(server, "klein", "flux2_klein_calibrated.safetensors", te), ref)
    print(f"FLUX.2 klein ternary r32 calibrated in ComfyUI (one prompt, 4 steps) and refined: latent error {err:.3f}")
    assert err < LATENT_TOL["ternary"]
