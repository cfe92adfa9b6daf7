"""Lowbit models under ComfyUI's ModelPatcherDynamic ("DynamicVRAM", the default on NVIDIA) and in
low-VRAM (partial) loading, compared with the plain ModelPatcher: loader + LoRA + real sampling.

ComfyUI builds ModelPatcherDynamic only for a GPU load device (its __new__ hands CPU models to
ModelPatcher), and main.py enables it after initialising comfy-aimdo. Here it is forced on the CPU:
aimdo's library is loaded (its host buffers work without a GPU), __new__ is bypassed and
CoreModelPatcher / aimdo_enabled are set as main.py sets them. What a CPU cannot show: the VBAR
(ComfyUI streams 16-bit weights through it on a GPU only; on a CPU no layer gets one, so LoRAs on
16-bit layers are not applied there and the test LoRAs target quantized layers only) and host->device
copies (on a CPU a "device copy" is the tensor itself; the reload test stands in distinct host copies).
scripts/gpu_comfyui_full.py checks both on a GPU.

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


def test_dynamic_patcher_samples_like_modelpatcher_with_lora_restrength_and_removal(comfy, dynamic, lowbit_file):
    plain, dyn = _load(lowbit_file, False), _load(lowbit_file, True)
    assert type(plain).__name__ == "LowBitModelPatcher" and not plain.is_dynamic()
    assert type(dyn).__name__ == "LowBitModelPatcherDynamic" and dyn.is_dynamic()
    q = _lowbit(dyn)
    packed = {p: (m.weight, m.wscales) for p, m in q.items()}
    branch0 = {p: m.branch() for p, m in q.items()}
    rank0 = {p: 0 if b[0] is None else b[0].shape[1] for p, b in branch0.items()}
    base = _sample(comfy, dyn)
    assert torch.equal(base, _sample(comfy, plain))
    lora = _block_lora(dyn)
    outs = {}
    for s in (1.0, 0.5):
        ld = _with_lora(comfy, dyn, lora, s)
        assert type(ld) is type(dyn)
        outs[s] = _sample(comfy, ld)
        assert torch.equal(outs[s], _sample(comfy, _with_lora(comfy, plain, lora, s))), f"strength {s}"
        for p, m in q.items():
            assert m.weight is packed[p][0] and m.wscales is packed[p][1]  # no reload, no copy of packed tensors
            assert m.branch()[0].shape[1] == _lora_rank(rank0[p])  # the LoRA is in the branch
            # not one of DynamicVRAM's castable layers: no LowVramPatch on the packed weight, no casting
            assert getattr(m, "weight_lowvram_function", None) is None and not m.comfy_cast_weights
    assert (outs[1.0] - base).norm() > 0.05 * base.norm() and not torch.equal(outs[0.5], outs[1.0])
    assert torch.equal(_sample(comfy, dyn), base)  # LoRA removed: bit-identical to before
    for p, m in q.items():
        assert m.branch()[0] is branch0[p][0] and m.branch()[1] is branch0[p][1]
    delegate = dyn.clone(disable_dynamic=True)  # ComfyUI's non-dynamic delegate reloads through our loader
    assert type(delegate).__name__ == "LowBitModelPatcher" and delegate.model is not dyn.model
    assert torch.equal(_sample(comfy, _with_lora(comfy, delegate, lora, 0.5)), outs[0.5])


def test_dynamic_reload_keeps_device_copies_and_freeing_puts_host_copies_back(comfy, dynamic, lowbit_file):
    """ModelPatcherDynamic re-casts every buffer from its host backup in each load; quantized layers keep
    their device tensors instead (no re-upload per prompt or LoRA change) and go back to the host copies
    when ComfyUI frees VRAM (restore_loaded_backups, which partially_unload calls)."""
    from comfyui_lowbit.quant_ops import originals

    dyn = _load(lowbit_file, True)
    q = _lowbit(dyn)
    base = _sample(comfy, dyn)
    resident = {p: m.weight for p, m in q.items()}
    host = {}
    for p, m in q.items():  # on a GPU the backups are host tensors, distinct from the device ones
        for name, _ in m.named_buffers(recurse=False):
            host[f"{p}.{name}"] = dyn.backup_buffers[f"{p}.{name}"] = dyn.backup_buffers[f"{p}.{name}"].clone()
    lora = _block_lora(dyn)
    ld = _with_lora(comfy, dyn, lora, 0.7)
    with_lora = _sample(comfy, ld)
    for p, m in q.items():
        assert m.weight is resident[p], f"{p}: packed weight re-uploaded from the host copy on reload"
        assert dyn.backup_buffers[f"{p}.weight"] is host[f"{p}.weight"]
    assert ld.model.model_loaded_weight_memory >= sum(m.weight.nbytes for m in q.values())
    freed = ld.restore_loaded_backups()
    assert freed > 0 and ld.model.model_loaded_weight_memory == 0
    for p, m in q.items():  # host copies back, original branch, no LoRA state left behind
        for name, t in m.named_buffers(recurse=False):
            assert t is host[f"{p}.{name}"], f"{p}.{name}"
        assert originals(m) is None and (m.fmt != "w4a16" or m.branch() == (None, None))
    assert torch.equal(_sample(comfy, ld), with_lora)  # reloaded: the LoRA goes back in
    assert torch.equal(_sample(comfy, dyn), base)


@pytest.mark.parametrize("dynamic_vram", [False, True], ids=["ModelPatcher", "ModelPatcherDynamic"])
def test_low_vram_sampling_matches_full_load(comfy, dynamic, lowbit_file, dynamic_vram):
    """ComfyUI gives the model a third of its size (what load_models_gpu does when the model does not fit,
    e.g. with --reserve-vram): ModelPatcher loads it partially (quantized layers offloaded, their LoRA
    branch still composed); ModelPatcherDynamic keeps quantized layers resident whatever the budget (their
    tensors are buffers, which it always casts to the device). Same latents as a full load either way."""
    import comfy.model_management as mm

    mp = _load(lowbit_file, dynamic_vram)
    rank0 = {p: 0 if m.branch()[0] is None else m.branch()[0].shape[1] for p, m in _lowbit(mp).items()}
    lora = _block_lora(mp, seed=5)
    strengths = (0.0, 0.8, -0.5)
    full = {s: _sample(comfy, _with_lora(comfy, mp, lora, s) if s else mp) for s in strengths}
    if not dynamic_vram:
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
            if dynamic_vram:
                assert lq.model.model_loaded_weight_memory >= sum(m.weight.nbytes for m in q.values())
            else:
                assert lq.model.model_lowvram and lq.model.model_loaded_weight_memory < mp.model_size()
                assert any(m.comfy_cast_weights for m in q.values()), "no quantized layer was offloaded"
            if s:
                assert all(m.branch()[0].shape[1] == _lora_rank(rank0[p]) for p, m in q.items())
            assert torch.equal(low, full[s]), f"strength {s}: low-VRAM latent differs from the full load"
    if not dynamic_vram:
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
