"""ComfyUI's model merge nodes on lowbit models (nodes/patcher.py): what a quantized layer can hold is merged
exactly, the rest is said in one line.

A merge adds the other model's weights to every key as patches. A quantized layer holds a weighted sum of its own
weight and LoRAs (its 16-bit branch), not of two different packed weights: merging a lowbit model with itself plus
LoRAs (e.g. ModelMergeSimple(model, model + LoRA, 0.5) = the LoRA at half strength) or at ratio 1 works; merging two
different models changes the 16-bit layers only, and one warning line says which quantized layers kept their
weights and why.

    COMFYUI_PATH=/work/comfyui /work/comfyui/venv/bin/python -m pytest -q tests/test_comfyui_merge.py
"""
import logging
import os

import pytest
import torch
from test_comfyui_lora import _lowbit, _run, load_lowbit_sd, make_lora, tiny_state_dicts

COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY, reason="COMFYUI_PATH is not set (point it at a ComfyUI 0.29.0 checkout)")]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LOWBIT_BACKEND", "reference")


@pytest.fixture(scope="module")
def models(comfy):
    """(lowbit, the same lowbit model loaded again, another lowbit model, the 16-bit model) for one tiny FLUX."""
    sd16, qsd, layers = tiny_state_dicts()
    other = {k: v * 1.25 if k.endswith((".wscales", "img_in.weight")) else v for k, v in qsd.items()}
    return (load_lowbit_sd(qsd, layers), load_lowbit_sd(qsd, layers), load_lowbit_sd(other, layers),
            comfy.sd.load_diffusion_model_state_dict(sd16))


def _merge(a, b, ratio):
    from comfy_extras.nodes_model_merging import ModelMergeSimple

    return ModelMergeSimple().merge(a, b, ratio)[0]


def _buffers(mp) -> dict:
    """{quantized layer: {tensor name: a copy}} as loaded (LoRAs composed into the branch)."""
    mp.patch_model()
    try:
        return {p: {k: v.clone() for k, v in m.named_buffers()} for p, m in _lowbit(mp).items()}
    finally:
        mp.unpatch_model()


def _lowbit_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "comfyui_lowbit" and r.levelno >= logging.WARNING]


def test_merge_with_itself_plus_a_lora_is_the_lora_at_the_ratio(comfy, models, caplog):
    """ModelMergeSimple(model, model + LoRA, 0.5) on a lowbit model (the second one loaded again from the same
    tensors): every quantized layer gets the LoRA at half strength in its branch, as the 16-bit model would; no
    warning. Ratio 1.0 (the first model only) changes nothing."""
    mpq, again, _, _ = models
    lora = make_lora("kohya", seed=2)
    with_lora, _ = comfy.sd.load_lora_for_models(again, None, lora, 1.0, 0)
    half, _ = comfy.sd.load_lora_for_models(mpq, None, lora, 0.5, 0)
    with caplog.at_level(logging.WARNING, logger="comfyui_lowbit"):
        m = _merge(mpq, with_lora, 0.5)
        got, merged = _buffers(m), _run(m)
        first_only = _run(_merge(mpq, with_lora, 1.0))
    assert not _lowbit_warnings(caplog)
    want, base = _run(half), _run(mpq)
    ref = _buffers(half)
    for p, bufs in ref.items():  # the very branch the LoRA at strength 0.5 gives, bit for bit
        assert all(torch.equal(got[p][k], t) for k, t in bufs.items()), p
    assert any(ref[p]["proj_down"].shape[1] > 16 for p in ref)
    # ComfyUI's merge of the 16-bit layers (0.5 W + 0.5 (W + L)) rounds differently from W + 0.5 L in the last bit,
    # which the int4 activation codes amplify: the outputs agree to about 1%
    rel = ((merged - want).norm() / want.norm()).item()
    assert (want - base).norm() > 0.05 * base.norm() and rel < 0.03, rel
    torch.testing.assert_close(first_only, base, rtol=0, atol=0)


@pytest.mark.parametrize("second", ["another lowbit model", "the 16-bit model"])
def test_merge_of_different_models_says_what_was_not_merged(comfy, models, caplog, second):
    """Two different models: the 16-bit layers are merged (ComfyUI's arithmetic), every quantized layer keeps the
    first model's weights, and one warning line (once, not at every load) names how many, an example and why."""
    mpq, _, other, mp16 = models
    b = other if second == "another lowbit model" else mp16
    m = _merge(mpq, b, 0.5)
    q = _lowbit(mpq)
    before = {p: mod.dequantize() for p, mod in q.items()}
    want = 0.5 * mpq.model.diffusion_model.img_in.weight.float() + 0.5 * b.model.diffusion_model.img_in.weight.float()
    with caplog.at_level(logging.WARNING, logger="comfyui_lowbit"):
        m.patch_model()  # patches the model it shares with mpq
        try:
            img_in = m.model.diffusion_model.img_in.weight.float()
            torch.testing.assert_close(img_in, want, rtol=1e-2, atol=1e-3)  # a 16-bit layer: merged
            assert all(torch.equal(mod.dequantize(), before[p]) for p, mod in q.items())
        finally:
            m.unpatch_model()
        _run(m)  # loaded again: no second warning
    lines = _lowbit_warnings(caplog)
    assert len(lines) == 1, lines
    assert f"{len(q)} quantized layers" in lines[0] and "not merged" in lines[0] and "diffusion_model." in lines[0]
    assert "16-bit layers" in lines[0] and "quantize" in lines[0]
