"""Lowbit models under ComfyUI's ModelPatcherDynamic ("DynamicVRAM", the default on NVIDIA) and in
low-VRAM (partial) loading, compared with the plain ModelPatcher: loader + LoRA + real sampling.

ComfyUI builds ModelPatcherDynamic only for a GPU load device (its __new__ hands CPU models to
ModelPatcher), and main.py enables it after initialising comfy-aimdo. Here it is forced on the CPU:
aimdo's library is loaded (its host buffers work without a GPU), __new__ is bypassed and
CoreModelPatcher / aimdo_enabled are set as main.py sets them. Its VBAR (virtual VRAM through which
DynamicVRAM streams castable layers) exists on GPUs only; tests/comfyui_vbar.py emulates it in host memory
with a byte budget standing in for the card, so ComfyUI's own VBAR cast path runs (fault, upload into the
allocation or a temporary cast buffer, gathered views, release). What a CPU cannot show: real host->device
copies on side streams, pinned host memory and aimdo's own eviction policy (scripts/gpu_comfyui_full.py
--configs stream-flux1,stream-flux2 runs and times them on a GPU). Without the emulated VBAR, 16-bit layers get
no VBAR on a CPU and LoRAs on them are not applied, so the test LoRAs target quantized layers only.

Needs a ComfyUI checkout (0.29.0) in COMFYUI_PATH and its Python environment:
    COMFYUI_PATH=/work/comfyui /work/comfyui/venv/bin/python -m pytest -q tests/test_comfyui_dynamic.py
"""
import importlib
import os

import pytest
import torch

COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY, reason="COMFYUI_PATH is not set (point it at a ComfyUI 0.29.0 checkout)")]

LORA_RANK = 8


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LOWBIT_BACKEND", "reference")


@pytest.fixture(scope="module")
def lowbit_file(comfy, tmp_path_factory):
    from tiny_models import write_tiny_lowbit_flux

    return write_tiny_lowbit_flux(tmp_path_factory.mktemp("dyn") / "w4a4.safetensors", "svdq_w4a4", rank=16, vec_in_dim=64)


@pytest.fixture
def dynamic(comfy):
    """ModelPatcherDynamic as ComfyUI's CoreModelPatcher, on the CPU (see the module docstring)."""
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher as mpm
    import comfy_aimdo.control
    import comfy_aimdo.host_buffer

    if not comfy_aimdo.control.init():
        pytest.skip("comfy-aimdo's library does not load on this machine, so ModelPatcherDynamic cannot be built")
    if comfy_aimdo.host_buffer.lib is None:  # bound at import, before init() loaded the library
        importlib.reload(comfy_aimdo.host_buffer)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(mpm.ModelPatcherDynamic, "__new__", staticmethod(lambda cls, *a, **k: object.__new__(cls)))
        m.setattr(mpm, "CoreModelPatcher", mpm.ModelPatcherDynamic)
        m.setattr(comfy.memory_management, "aimdo_enabled", True)
        yield
    # ModelPatcherDynamic cannot unload from a CPU load device (it asserts): forget the ones loaded here
    mm.current_loaded_models[:] = [lm for lm in mm.current_loaded_models if lm.model is not None and not lm.model.is_dynamic()]


def _load(path, dynamic_vram: bool):
    from comfyui_lowbit.nodes.loaders import load_lowbit_diffusion_model

    return load_lowbit_diffusion_model(path, None, "auto", disable_dynamic=not dynamic_vram)


def _sample(comfy, mp, steps=2):
    import comfy.sample

    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 8, 128, generator=g), {"pooled_output": torch.randn(1, 64, generator=g), "guidance": 3.5}]]
    latent = torch.zeros(1, 16, 4, 4)
    noise = torch.randn(latent.shape, generator=g)
    return comfy.sample.sample(mp, noise, steps, 1.0, "euler", "simple", cond, cond, latent, disable_pbar=True, seed=0)


def _lowbit(mp) -> dict:
    from comfyui_lowbit.nodes.patcher import lowbit_layers

    return lowbit_layers(mp.model)


def _block_lora(mp, seed=3) -> dict:
    """A kohya LoRA of rank LORA_RANK on every quantized layer (block linears and modulation)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, m in _lowbit(mp).items():
        name = "lora_unet_" + path[len("diffusion_model."):].replace(".", "_")
        sd[f"{name}.lora_up.weight"] = (0.1 * torch.randn(m.out_features, LORA_RANK, generator=g)).to(torch.bfloat16)
        sd[f"{name}.lora_down.weight"] = (0.1 * torch.randn(LORA_RANK, m.in_features, generator=g)).to(torch.bfloat16)
        sd[f"{name}.alpha"] = torch.tensor(float(LORA_RANK))
    return sd


def _lora_rank(before: int) -> int:
    """Branch rank of a quantized layer with one LORA_RANK LoRA on top of its own rank `before` (padded to 16)."""
    return -(-(before + LORA_RANK) // 16) * 16


def _with_lora(comfy, mp, lora, strength):
    out, _ = comfy.sd.load_lora_for_models(mp, None, lora, strength, 0)
    return out


def _companions(mp) -> dict:
    from comfyui_lowbit.nodes import stream

    return {p: stream.streamed(m) for p, m in _lowbit(mp).items()}


def _quantized_bytes(mp) -> int:
    """Bytes of the quantized layers as DynamicVRAM streams them (packed codes, scales, branch, bias)."""
    import comfy.memory_management

    total = 0
    for m in _lowbit(mp).values():
        t = [b for b in m._buffers.values() if b is not None]
        total += comfy.memory_management.vram_aligned_size(t)
    return total


@pytest.fixture(scope="module")
def ternary_file(comfy, tmp_path_factory):
    from tiny_models import write_tiny_lowbit_flux

    return write_tiny_lowbit_flux(tmp_path_factory.mktemp("dyn_t") / "ternary.safetensors", "ternary", rank=16, vec_in_dim=64)


def test_streamed_weight_round_trips_through_core_memory_management(comfy, lowbit_file, ternary_file):
    """Every format's companion weight is a core QuantizedTensor of the layer's logical shape whose dequantize() (core's
    fallback) is the layer's; gathered into one byte buffer and rebuilt as DynamicVRAM does (vram_aligned_size,
    cast_to_gathered, interpret_gathered_like), it computes exactly what the layer computes, LoRA columns included."""
    import comfy.memory_management as cmm
    import comfy.model_management
    import comfy.quant_ops
    from comfyui_lowbit.nodes import stream
    from comfyui_lowbit.quant_ops import LoraFactor, apply_lora, remove_lora

    formats = set()
    g = torch.Generator().manual_seed(0)
    for path in (lowbit_file, ternary_file):
        for name, m in _lowbit(_load(path, False)).items():
            formats.add(m.fmt)
            s = stream.Streamed(m)
            w = s.weight
            assert isinstance(w, comfy.quant_ops.QuantizedTensor) and tuple(w.shape) == (m.out_features, m.in_features)
            assert torch.equal(w.dequantize(), m.dequantize().to(w.dtype)), name
            buf = torch.empty(cmm.vram_aligned_size([w, s.bias]), dtype=torch.uint8)
            comfy.model_management.cast_to_gathered([w, s.bias], buf)
            w2, b2 = cmm.interpret_gathered_like([w, s.bias], buf)
            assert w2._qdata.data_ptr() == buf.data_ptr() and w2._qdata is not m.weight
            x = torch.randn(3, m.in_features, generator=g)
            assert torch.equal(m.forward_with(x, s.tensors(w2, b2)), m(x)), name
            f = LoraFactor.from_alpha(0.1 * torch.randn(m.out_features, 4, generator=g),
                                      0.1 * torch.randn(4, m.in_features, generator=g), 4.0, 0.7)
            stream.set_lora(m, [f], None, "cpu", layer=name)  # the companion made at first use is s's twin
            t = stream.streamed(m).tensors(w2, b2)
            apply_lora(m, [f], None, layer=name)
            assert torch.equal(m.forward_with(x, t), m(x)), f"{name} with a LoRA"
            remove_lora(m)
    assert formats == {"svdq_w4a4", "w4a16", "ternary"}


def test_dynamic_patcher_samples_like_modelpatcher_with_lora_restrength_and_removal(comfy, dynamic, lowbit_file):
    """No VBAR (a CPU load device, as ComfyUI itself would have it): the quantized layers' companions are castable
    layers and run through cast_bias_weight; LoRAs are branch columns on the companion, the module untouched."""
    plain, dyn = _load(lowbit_file, False), _load(lowbit_file, True)
    assert type(plain).__name__ == "LowBitModelPatcher" and not plain.is_dynamic()
    assert type(dyn).__name__ == "LowBitModelPatcherDynamic" and dyn.is_dynamic()
    q = _lowbit(dyn)
    own = {p: dict(m._buffers) for p, m in q.items()}
    rank0 = {p: 0 if m.branch()[0] is None else m.branch()[0].shape[1] for p, m in q.items()}
    base = _sample(comfy, dyn)
    assert torch.equal(base, _sample(comfy, plain))
    streamed = _companions(dyn)
    assert all(s is not None and s.comfy_cast_weights for s in streamed.values())
    lora = _block_lora(dyn)
    outs = {}
    for st in (1.0, 0.5):
        ld = _with_lora(comfy, dyn, lora, st)
        assert type(ld) is type(dyn)
        outs[st] = _sample(comfy, ld)
        assert torch.equal(outs[st], _sample(comfy, _with_lora(comfy, plain, lora, st))), f"strength {st}"
        for p, m in q.items():
            assert all(m._buffers[k] is t for k, t in own[p].items()), f"{p}: a module tensor was replaced"
            s = _companions(ld)[p]
            assert s is streamed[p] and s.weight._qdata is own[p]["weight"]  # no reload, no copy of packed tensors
            assert rank0[p] + s.lora["proj_down"].shape[1] == _lora_rank(rank0[p])  # the LoRA: branch columns
            # a castable layer of ComfyUI's, but no LowVramPatch: nothing merges into the packed weight
            assert s.weight_lowvram_function is None and not s.weight_function and not m.comfy_cast_weights
    assert (outs[1.0] - base).norm() > 0.05 * base.norm() and not torch.equal(outs[0.5], outs[1.0])
    assert torch.equal(_sample(comfy, dyn), base)  # LoRA removed: bit-identical to before
    assert all(s.lora is None for s in streamed.values())
    delegate = dyn.clone(disable_dynamic=True)  # ComfyUI's non-dynamic delegate reloads through our loader
    assert type(delegate).__name__ == "LowBitModelPatcher" and delegate.model is not dyn.model
    assert torch.equal(_sample(comfy, _with_lora(comfy, delegate, lora, 0.5)), outs[0.5])


def test_quantized_layers_stream_through_a_vbar_smaller_than_the_model(comfy, dynamic, lowbit_file, monkeypatch):
    """DynamicVRAM with its VBAR (emulated, tests/comfyui_vbar.py): with room for everything each quantized layer is
    uploaded once and stays resident across prompts and LoRA changes; with room for half the quantized bytes they
    are evicted and uploaded again as the layers run; with less room than one layer they go through ComfyUI's
    temporary cast buffer. Every latent equals the plain ModelPatcher's fully resident one, with and without a
    LoRA, whose changes never reload or copy a quantized layer's tensors."""
    import comfyui_vbar

    vram = comfyui_vbar.install(monkeypatch, budget=2 ** 40)
    plain, dyn = _load(lowbit_file, False), _load(lowbit_file, True)
    lora = _block_lora(dyn, seed=11)
    ref = {st: _sample(comfy, _with_lora(comfy, plain, lora, st) if st else plain) for st in (0.0, 1.0, -0.6)}
    q = _lowbit(dyn)
    own = {p: dict(m._buffers) for p, m in q.items()}
    quantized = _quantized_bytes(dyn)

    assert torch.equal(_sample(comfy, dyn), ref[0.0])
    vbar = vram.vbar(dyn)
    streamed = _companions(dyn)
    at = {p: s._v[1] for p, s in streamed.items()}  # each companion's VBAR allocation
    assert sum(s._v[2] for s in streamed.values()) >= quantized  # all of it is VBAR-managed, nothing else resident
    assert all(vbar.uploads[a] == 1 for a in at.values())
    assert torch.equal(_sample(comfy, _with_lora(comfy, dyn, lora, 1.0)), ref[1.0])
    assert torch.equal(_sample(comfy, dyn), ref[0.0])
    assert all(vbar.uploads[a] == 1 for a in at.values()), "a LoRA change re-uploaded quantized layers"

    vram.set_budget(quantized // 2)
    before = sum(vbar.uploads[a] for a in at.values())
    for st in (0.0, 1.0, -0.6, 0.0):
        assert torch.equal(_sample(comfy, _with_lora(comfy, dyn, lora, st) if st else dyn), ref[st]), f"strength {st}"
        assert not vbar.pinned, "layers left pinned in the VBAR after sampling"
    streamed_uploads = sum(vbar.uploads[a] for a in at.values()) - before
    assert streamed_uploads > 4 * len(at), f"only {streamed_uploads} uploads for {len(at)} layers: not streamed"
    assert vbar.peak <= vram.budget < quantized and vbar.loaded_size() <= vram.budget

    largest = max(s._v[2] for s in streamed.values())
    vram.set_budget(largest // 2)
    misses = sum(vbar.misses[a] for a in at.values())
    assert torch.equal(_sample(comfy, _with_lora(comfy, dyn, lora, 1.0)), ref[1.0])
    assert sum(vbar.misses[a] for a in at.values()) > misses  # the layers that fit nowhere: ComfyUI's cast buffer

    for p, m in q.items():  # nothing of a quantized layer was reloaded, copied or moved: the host tensors as loaded
        assert all(m._buffers[k] is t for k, t in own[p].items()) and m.weight.device.type == "cpu", p
        assert _companions(dyn)[p] is streamed[p] and streamed[p].weight._qdata is own[p]["weight"]


def test_fp8_activations_stream_like_resident(comfy, dynamic, lowbit_file, monkeypatch):
    """fp8 activations on streamed layers (act_unsigned layers get their shift-compensated bias from the streamed
    tensors, once per device) give the resident layers' result."""
    import comfyui_vbar
    from comfyui_lowbit.nodes.loaders import load_lowbit_diffusion_model

    vram = comfyui_vbar.install(monkeypatch, budget=2 ** 40)
    plain = load_lowbit_diffusion_model(lowbit_file, None, "auto", "fp8", disable_dynamic=True)
    dyn = load_lowbit_diffusion_model(lowbit_file, None, "auto", "fp8")
    assert any(m._options.get("act_unsigned") for m in _lowbit(dyn).values())
    vram.set_budget(_quantized_bytes(dyn) // 2)
    assert torch.equal(_sample(comfy, dyn), _sample(comfy, plain))
    assert all(m.activations == "fp8" for m in _lowbit(dyn).values())


def test_freeing_vram_keeps_host_tensors_and_the_next_load_puts_loras_back(comfy, dynamic, lowbit_file, monkeypatch):
    """When ComfyUI frees VRAM from a dynamic model (its VBAR and then restore_loaded_backups) the quantized layers
    lose their VBAR copies and LoRA columns, never their host tensors; the next load brings the LoRA back."""
    import comfyui_vbar

    vram = comfyui_vbar.install(monkeypatch, budget=2 ** 40)
    dyn = _load(lowbit_file, True)
    q = _lowbit(dyn)
    own = {p: dict(m._buffers) for p, m in q.items()}
    base = _sample(comfy, dyn)
    ld = _with_lora(comfy, dyn, _block_lora(dyn), 0.7)
    with_lora = _sample(comfy, ld)
    assert all(s.lora is not None for s in _companions(ld).values())
    vbar = vram.vbar(ld)
    assert vbar.free_memory(2 ** 40) > 0 and vbar.loaded_size() == 0
    ld.restore_loaded_backups()
    assert ld.model.model_loaded_weight_memory == 0
    assert all(s.lora is None for s in _companions(ld).values())
    for p, m in q.items():
        assert all(m._buffers[k] is t for k, t in own[p].items()), p
    assert torch.equal(_sample(comfy, ld), with_lora)  # reloaded and re-uploaded: the LoRA goes back in
    assert torch.equal(_sample(comfy, dyn), base)


def test_without_quantized_tensor_quantized_layers_stay_resident(comfy, dynamic, lowbit_file, monkeypatch):
    """Where comfy-kitchen's QuantizedTensor is missing (ComfyUI logs that it failed to import) quantized layers are
    not castable under DynamicVRAM: resident, cast in every load as before streaming existed; same result."""
    from comfyui_lowbit.nodes import stream

    monkeypatch.setattr(stream, "AVAILABLE", False)
    plain, dyn = _load(lowbit_file, False), _load(lowbit_file, True)
    lora = _block_lora(dyn, seed=4)
    assert torch.equal(_sample(comfy, _with_lora(comfy, dyn, lora, 0.5)), _sample(comfy, _with_lora(comfy, plain, lora, 0.5)))
    assert all(stream.streamed(m) is None for m in _lowbit(dyn).values())
    assert torch.equal(_sample(comfy, dyn), _sample(comfy, plain))


def test_low_vram_sampling_matches_full_load(comfy, lowbit_file):
    """Legacy ModelPatcher (--disable-dynamic-vram, AMD, Intel) given a quarter of the model (what load_models_gpu
    does when the model does not fit, e.g. with --reserve-vram): quantized layers are offloaded, copied to the
    device per call, their LoRA branch still composed. Same latents as a full load."""
    import comfy.model_management as mm

    mp = _load(lowbit_file, False)
    rank0 = {p: 0 if m.branch()[0] is None else m.branch()[0].shape[1] for p, m in _lowbit(mp).items()}
    lora = _block_lora(mp, seed=5)
    strengths = (0.0, 0.8, -0.5)
    full = {s: _sample(comfy, _with_lora(comfy, mp, lora, s) if s else mp) for s in strengths}
    mm.unload_all_models()  # else the loaded model is kept as it is
    budget = mp.model_size() // 4  # a reload after a LoRA change adds what was loaded before: stays < size
    real = mm.LoadedModel.model_use_more_vram
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mm.LoadedModel, "model_use_more_vram",
                      lambda self, extra, force_patch_weights=False: real(self, min(extra, budget), force_patch_weights))
        for s in strengths:
            lq = _with_lora(comfy, mp, lora, s) if s else mp
            low = _sample(comfy, lq)
            q = _lowbit(lq)
            assert lq.model.model_lowvram and lq.model.model_loaded_weight_memory < mp.model_size()
            assert any(m.comfy_cast_weights for m in q.values()), "no quantized layer was offloaded"
            if s:
                assert all(m.branch()[0].shape[1] == _lora_rank(rank0[p]) for p, m in q.items())
            assert torch.equal(low, full[s]), f"strength {s}: low-VRAM latent differs from the full load"
    mm.unload_all_models()


def test_modelpatcher_lora_change_leaves_quantized_layers_in_place(comfy, lowbit_file):
    """Legacy ModelPatcher (--disable-dynamic-vram, AMD, Intel): a LoRA added, re-weighted or removed makes
    ComfyUI unpatch the model to its offload device and load it again. Quantized layers are left out of that
    move (only their branch changes), so their packed tensors are not copied to the host and back; a real
    unload still moves them."""
    import comfy.model_management as mm
    import comfy.model_patcher

    mp = _load(lowbit_file, False)
    q = _lowbit(mp)
    packed = {id(t) for m in q.values() for t in (m.weight, m.wscales)}
    lora = _block_lora(mp, seed=7)
    base = _sample(comfy, mp)
    moved, unpatching = [], []
    real_apply, real_unpatch = torch.nn.Module._apply, comfy.model_patcher.ModelPatcher.unpatch_model

    def apply(module, fn, recurse=True):  # Module.to / .cuda / .cpu go through _apply (a no-op copy on a CPU)
        if unpatching:
            moved.extend(id(t) for t in module._buffers.values() if t is not None and id(t) in packed)
        return real_apply(module, fn, recurse)

    def unpatch(self, device_to=None, unpatch_weights=True):  # where ComfyUI moves the model to the offload device
        unpatching.append(device_to)
        try:
            return real_unpatch(self, device_to, unpatch_weights)
        finally:
            unpatching.pop()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.Module, "_apply", apply)
        patch.setattr(comfy.model_patcher.ModelPatcher, "unpatch_model", unpatch)
        outs = [_sample(comfy, _with_lora(comfy, mp, lora, s)) for s in (1.0, 0.4)]
        again = _sample(comfy, mp)
        assert not moved, f"{len(moved)} packed tensors were moved to the offload device by a LoRA change"
        mm.unload_all_models()
        assert moved, "a real unload no longer moves the quantized layers to the offload device"
    assert torch.equal(again, base) and not torch.equal(outs[0], outs[1])


@pytest.fixture(scope="module", params=[256, 128], ids=["streamed", "small-layers"])
def te_files(comfy, tmp_path_factory, request):
    """A lowbit T5 of width 256 (layers over 16 KB: ComfyUI streams them) or the tiny one's 128 (layers ComfyUI
    loads whole instead of giving them a VBAR allocation, its rule for modules under 16 KB)."""
    from comfyui_lowbit import checkpoint
    from tiny_models import _save, tiny_clip_l_state_dict, tiny_t5_state_dict

    d = tmp_path_factory.mktemp("dyn_te")
    width = request.param
    src = _save(tiny_t5_state_dict(config={"d_model": width, "d_ff": 2 * width, "num_heads": 2 * width // 128}),
                d / "t5.safetensors")
    checkpoint.quantize_file(src, str(d / "t5_lowbit.safetensors"), "w4a16", force=True, group_size=64)
    return str(d / "t5_lowbit.safetensors"), _save(tiny_clip_l_state_dict(vocab=49408), d / "clip_l.safetensors"), width


def _te_lora(clip, rank=4, scale=0.05) -> dict:
    """A PEFT-style LoRA on every quantized T5 layer (ComfyUI's generic text-encoder keys)."""
    from comfyui_lowbit.nodes.patcher import lowbit_layers

    g = torch.Generator().manual_seed(0)
    lora = {}
    for path, m in lowbit_layers(clip.cond_stage_model).items():
        lora[f"text_encoders.{path}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * scale
        lora[f"text_encoders.{path}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * scale
    return lora


def test_lowbit_text_encoder_streams_under_dynamic_vram(comfy, dynamic, te_files, monkeypatch):
    """A lowbit T5 given half its quantized bytes (the 14 GB Mistral on a 12 GB card, in small): CLIP's patcher is
    ModelPatcherDynamic, the T5's quantized layers stream through the VBAR (or, under 16 KB, are loaded whole as
    ComfyUI does with small layers), and the conditioning equals the legacy patcher's fully resident one, with a
    LoRA, a new strength and without it again."""
    *te_files, width = te_files
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher as mpm
    import comfy.sd
    import comfyui_vbar
    from comfyui_lowbit.nodes import stream
    from comfyui_lowbit.nodes.loaders import load_lowbit_text_encoders
    from comfyui_lowbit.nodes.patcher import lowbit_layers

    prompt = "a lighthouse on a cliff at dusk"

    def encode(clip, lora=None, strength=0.0):
        if strength:
            _, clip = comfy.sd.load_lora_for_models(None, clip, lora, 0.0, strength)
        return clip, clip.encode_from_tokens(clip.tokenize(prompt))

    # the 16-bit CLIP-L file is read without aimdo's mmap (aimdo_enabled), whose handles would outlive the test
    monkeypatch.setattr(comfy.memory_management, "aimdo_enabled", False)
    with pytest.MonkeyPatch.context() as legacy:
        legacy.setattr(mpm, "CoreModelPatcher", mpm.ModelPatcher)
        plain = load_lowbit_text_encoders(list(te_files))
    assert not plain.patcher.is_dynamic()
    lora = _te_lora(plain)
    ref = {s: encode(plain, lora, s)[1] for s in (0.0, 1.0, 0.3)}

    vram = comfyui_vbar.install(monkeypatch, budget=2 ** 40)
    with pytest.MonkeyPatch.context() as gpu_like:
        # with DynamicVRAM on a GPU, CLIP is built on its offload device and first loaded when it encodes
        # (text_encoder_initial_device); on a CPU load and offload device are one, and CLIP would load it at once
        gpu_like.setattr(comfy.model_management, "load_models_gpu", lambda *a, **k: None)
        clip = load_lowbit_text_encoders(list(te_files))
    assert type(clip.patcher).__name__ == "LowBitModelPatcherDynamic"
    q = lowbit_layers(clip.cond_stage_model)
    quantized = sum(stream.Streamed(m).nbytes for m in q.values())
    vram.set_budget(quantized // 2)
    for s in (0.0, 1.0, 0.3, 0.0):
        with_lora, cond = encode(clip, lora, s)
        assert torch.equal(cond, ref[s]), f"strength {s}"
        if s:
            assert all(stream.streamed(m).lora is not None for m in lowbit_layers(with_lora.cond_stage_model).values())
    assert all(stream.active(m) for m in q.values())
    if width == 128:  # ComfyUI's force load: the companion's weight is cast whole to the load device, put back after
        small = [m for m in q.values() if not hasattr(stream.streamed(m), "_v")]
        assert small and len(clip.patcher.backup) >= len(small)
        clip.patcher.restore_loaded_backups()
        assert all(stream.streamed(m).weight._qdata.data_ptr() == m.weight.data_ptr() for m in small)
        return
    vbar = vram.vbar(clip.patcher)
    at = [stream.streamed(m)._v[1] for m in q.values()]
    assert sum(vbar.uploads[a] for a in at) > 2 * len(at) and vbar.peak <= vram.budget < quantized


def test_torch_compile_node_on_dynamic_and_partly_loaded_models(comfy, dynamic, lowbit_file, monkeypatch):
    """ComfyUI's TorchCompileModel: on a DynamicVRAM model it compiles the non-dynamic delegate (the node clones with
    disable_dynamic, so the streaming path is never traced); on a partly loaded ModelPatcher the offloaded quantized
    layers' per-call device copies are traced with the rest. Each sampling is one graph with no graph break (the
    kernel ops are custom operators; PyTorch attention as on a GPU: ComfyUI's CPU attention queries free memory,
    which breaks graphs) and gives the eager latent bitwise (the cudagraphs backend runs the traced ops on a CPU)."""
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention
    import comfy.model_management as mm
    import comfyui_vbar
    from comfy_extras.nodes_torch_compile import TorchCompileModel
    from torch._dynamo.utils import counters

    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)

    def compiled(mp):
        torch._dynamo.reset()
        counters.clear()
        out = TorchCompileModel.execute(mp, "cudagraphs")
        latent = _sample(comfy, out.result[0])
        return latent, int(counters["stats"]["unique_graphs"]), sum(counters["graph_break"].values())

    vram = comfyui_vbar.install(monkeypatch, budget=2 ** 40)
    plain, dyn = _load(lowbit_file, False), _load(lowbit_file, True)
    vram.set_budget(_quantized_bytes(dyn) // 2)
    ref = _sample(comfy, plain)
    latent, graphs, breaks = compiled(dyn)
    assert torch.equal(latent, ref) and (graphs, breaks) == (1, 0), ("DynamicVRAM", graphs, breaks)
    mm.unload_all_models()
    budget = plain.model_size() // 4
    real = mm.LoadedModel.model_use_more_vram
    monkeypatch.setattr(mm.LoadedModel, "model_use_more_vram",
                        lambda self, extra, force_patch_weights=False: real(self, min(extra, budget), force_patch_weights))
    latent, graphs, breaks = compiled(plain)
    assert any(m.comfy_cast_weights for m in _lowbit(plain).values()), "no quantized layer was offloaded"
    assert torch.equal(latent, ref) and (graphs, breaks) == (1, 0), ("partly loaded", graphs, breaks)
    mm.unload_all_models()
    torch._dynamo.reset()


@pytest.mark.parametrize("mode,progressive", [("fp8", False), ("int8", True)])
def test_torch_compile_node_traces_once_with_derived_tensors(comfy, lowbit_file, monkeypatch, mode, progressive):
    """fp8 / int8 activations derive tensors from the weights (the unsigned layers' shift share, progressive int8's
    integer group scales): the patcher's load computes them before the first forward, so TorchCompileModel traces
    the model once (one graph over both steps, no break) and the latent is the eager one bitwise."""
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention
    import comfy.model_management as mm
    from comfy_extras.nodes_torch_compile import TorchCompileModel
    from torch._dynamo.utils import counters

    from comfyui_lowbit.quant_ops import set_activations

    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)
    mp = _load(lowbit_file, False)
    assert set_activations(mp.model.diffusion_model, mode, "cpu", progressive) == mode
    try:
        ref = _sample(comfy, mp)
        mm.unload_all_models()
        fresh = _load(lowbit_file, False)
        set_activations(fresh.model.diffusion_model, mode, "cpu", progressive)
        assert not any(dict(m.named_buffers()).keys() & {"shift_comp", "int8_s1"} for m in _lowbit(fresh).values())
        torch._dynamo.reset()
        counters.clear()
        latent = _sample(comfy, TorchCompileModel.execute(fresh, "cudagraphs").result[0])
        graphs, breaks = int(counters["stats"]["unique_graphs"]), sum(counters["graph_break"].values())
        assert torch.equal(latent, ref) and (graphs, breaks) == (1, 0), (graphs, breaks)
    finally:
        mm.unload_all_models()
        torch._dynamo.reset()


def test_blocks_compiled_directly_on_a_streaming_model(comfy, dynamic, lowbit_file, monkeypatch):
    """Packs that torch.compile the FLUX blocks themselves (not through TorchCompileModel, whose delegate is not
    dynamic) compile our streaming forward too: dynamo breaks the graph and recompiles in ComfyUI's own cast code
    (comfy/ops.py pins and unpins the VBAR per layer, as for core's streamed layers), and the latent is the eager
    one bitwise."""
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention
    import comfyui_vbar

    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)
    vram = comfyui_vbar.install(monkeypatch, budget=2 ** 40)
    plain, dyn = _load(lowbit_file, False), _load(lowbit_file, True)
    vram.set_budget(_quantized_bytes(dyn) // 2)
    ref = _sample(comfy, plain)
    torch._dynamo.reset()
    dm = dyn.model.diffusion_model
    for blocks in (dm.double_blocks, dm.single_blocks):
        for i, block in enumerate(blocks):
            blocks[i] = torch.compile(block, backend="eager")
    try:
        assert torch.equal(_sample(comfy, dyn), ref)
    finally:
        torch._dynamo.reset()
