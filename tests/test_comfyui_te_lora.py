"""LoraLoader's text-encoder LoRAs on a lowbit T5 go into the quantized layers' low-rank branch
(in-process ComfyUI; needs COMFYUI_PATH and ComfyUI's Python)."""
import os
import sys

import pytest
import torch

COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY, reason="COMFYUI_PATH is not set (point it at a ComfyUI 0.29.0 checkout)")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    if COMFY not in sys.path:
        sys.path.insert(0, COMFY)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    from tiny_models import _save, tiny_clip_l_state_dict, write_tiny_lowbit_t5, write_tiny_t5

    d = tmp_path_factory.mktemp("te")
    return (write_tiny_t5(d / "t5.safetensors"), write_tiny_lowbit_t5(d / "t5_lowbit.safetensors"),
            _save(tiny_clip_l_state_dict(vocab=49408), d / "clip_l.safetensors"))


def _t5_lora(t5_path, scale=0.05, rank=4) -> dict:
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    lora = {}
    with safe_open(str(t5_path), "pt") as f:
        for k in f.keys():
            if k.endswith(("SelfAttention.q.weight", "SelfAttention.o.weight", "DenseReluDense.wo.weight")):
                n, kk = f.get_slice(k).get_shape()
                key = "text_encoders.t5xxl.transformer." + k[: -len(".weight")]  # ComfyUI's generic TE key
                lora[key + ".lora_A.weight"] = torch.randn(rank, kk, generator=g) * scale
                lora[key + ".lora_B.weight"] = torch.randn(n, rank, generator=g) * scale
    return lora


def _encode(paths, lora, strength):
    import comfy.sd
    from comfyui_lowbit.nodes.loaders import load_lowbit_text_encoders

    clip = load_lowbit_text_encoders([str(p) for p in paths])
    if strength:
        _, clip = comfy.sd.load_lora_for_models(None, clip, lora, 0.0, strength)
    return clip.encode_from_tokens(clip.tokenize("a lighthouse on a cliff at dusk"))


def test_clip_lora_on_lowbit_t5_goes_into_the_branch(files):
    """Each LoRA'd quantized T5 layer computes dequant(W) + B A exactly (the float merge ComfyUI would do on a
    16-bit T5); the conditioning changes; removing the LoRA restores the base conditioning and packed weights."""
    import comfy.sd
    from comfyui_lowbit.nodes.loaders import load_lowbit_text_encoders
    from comfyui_lowbit.quant_ops import LowBitLinear

    t5, t5_lowbit, clip_l = files
    lora = _t5_lora(t5)
    prompt = "a lighthouse on a cliff at dusk"
    clip = load_lowbit_text_encoders([str(t5_lowbit), str(clip_l)])
    base = clip.encode_from_tokens(clip.tokenize(prompt))
    quantized = {n: m for n, m in clip.cond_stage_model.named_modules() if isinstance(m, LowBitLinear)}
    packed = {n: (m.weight.clone(), m.dequantize()) for n, m in quantized.items()}

    _, with_lora = comfy.sd.load_lora_for_models(None, clip, lora, 0.0, 1.0)
    moved = with_lora.encode_from_tokens(with_lora.tokenize(prompt))
    rel = ((moved - base).norm() / base.norm()).item()
    print(f"T5 LoRA moves the lowbit conditioning by {rel:.3f} (relative L2)")
    assert rel > 0.01
    g = torch.Generator().manual_seed(1)
    checked = 0
    for key in {k.rsplit(".lora_", 1)[0] for k in lora}:
        name = key[len("text_encoders."):]
        m = quantized[name]
        a, b = lora[key + ".lora_A.weight"], lora[key + ".lora_B.weight"]
        x = torch.randn(5, a.shape[1], generator=g)
        expected = x @ (packed[name][1] + b @ a).t()
        err = ((m(x).float() - expected).norm() / expected.norm()).item()
        assert err < 1e-2, f"{name}: lowbit + LoRA differs from the float merge by {err:.2e}"
        checked += 1
    assert checked == 2 * 3

    again = clip.encode_from_tokens(clip.tokenize(prompt))
    assert torch.equal(again, base)
    for n, m in quantized.items():
        assert torch.equal(m.weight, packed[n][0]), n
