"""LoRA on a lowbit model in a real headless ComfyUI: LowBitDiffusionModelLoader -> LoraLoaderModelOnly ->
KSampler, compared with UNETLoader (16-bit) -> the same LoRA -> KSampler.

Metric: the LoRA's effect on the sampled latent, lowbit (with LoRA minus without) against 16-bit (with LoRA
minus without): cosine of the two deltas and their norm ratio.

Needs a ComfyUI checkout (0.29.0) in COMFYUI_PATH and its Python environment:
    COMFYUI_PATH=/work/comfyui /work/cvenv/bin/python -m pytest -q tests/test_comfyui_lora_server.py
"""
import os
import re
import sys

import pytest
import torch

COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY, reason="COMFYUI_PATH is not set (point it at a ComfyUI 0.29.0 checkout)")]

H = 256
COS_MIN = 0.8  # LoRA effect on the latent, lowbit vs 16-bit


def _pair(g, rows, cols, rank=4):
    return (0.1 * torch.randn(rows, rank, generator=g)).to(torch.bfloat16), (0.1 * torch.randn(rank, cols, generator=g)).to(torch.bfloat16)


def diffusers_lora(seed):
    """A PEFT/diffusers LoRA: split q/k/v and single-block projections (slices of fused layers), an MLP,
    a modulation, and the 16-bit embedder / final projection."""
    g = torch.Generator().manual_seed(seed)
    mods = [("transformer_blocks.0.attn.to_q", H, H), ("transformer_blocks.0.attn.to_k", H, H),
            ("transformer_blocks.0.attn.to_v", H, H), ("transformer_blocks.1.ff.net.0.proj", 4 * H, H),
            ("transformer_blocks.0.norm1.linear", 6 * H, H), ("single_transformer_blocks.0.attn.to_q", H, H),
            ("single_transformer_blocks.0.proj_mlp", 4 * H, H), ("single_transformer_blocks.1.proj_out", H, 5 * H),
            ("x_embedder", H, 64), ("proj_out", 64, H)]
    sd = {}
    for mod, rows, cols in mods:
        up, down = _pair(g, rows, cols)
        sd[f"transformer.{mod}.lora_A.weight"], sd[f"transformer.{mod}.lora_B.weight"] = down, up
    return sd


def kohya_lora(seed):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for layer, rows, cols in [("double_blocks_0_img_attn_qkv", 3 * H, H), ("double_blocks_1_txt_mlp_2", H, 4 * H),
                              ("single_blocks_1_linear1", 7 * H, H)]:
        up, down = _pair(g, rows, cols)
        sd[f"lora_unet_{layer}.lora_up.weight"], sd[f"lora_unet_{layer}.lora_down.weight"] = up, down
        sd[f"lora_unet_{layer}.alpha"] = torch.tensor(4.0)
    return sd


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from comfyui_harness import ComfyServer
    from safetensors.torch import save_file
    from tiny_models import write_tiny_flux, write_tiny_lowbit_flux

    base = tmp_path_factory.mktemp("comfyui_lora")
    srv = ComfyServer(COMFY, base, python=sys.executable)
    srv._layout()
    dm = srv.models / "diffusion_models"
    write_tiny_flux(dm / "tiny_bf16.safetensors", seed=0)
    write_tiny_lowbit_flux(dm / "tiny_w4a4.safetensors", fmt="svdq_w4a4", rank=16, seed=0)
    save_file(diffusers_lora(1), str(srv.models / "loras" / "style_diffusers.safetensors"))
    save_file(kohya_lora(2), str(srv.models / "loras" / "detail_kohya.safetensors"))
    with srv:
        yield srv


def _sampling(loader, prefix, loras=()):
    """API workflow: loader -> (LoraLoaderModelOnly per (name, strength)) -> KSampler -> SaveLatent."""
    from tiny_models import TINY_FLUX_CONFIG

    wf = {"1": loader,
          "2": {"class_type": "LowBitTestConditioning",
                "inputs": {"seed": 7, "tokens": 8, "context_dim": TINY_FLUX_CONFIG["context_in_dim"],
                           "pooled_dim": TINY_FLUX_CONFIG["vec_in_dim"]}},
          "3": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": 3.5}},
          "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}}}
    model = ["1", 0]
    for i, (name, strength) in enumerate(loras):
        wf[f"l{i}"] = {"class_type": "LoraLoaderModelOnly",
                       "inputs": {"model": model, "lora_name": name, "strength_model": strength}}
        model = [f"l{i}", 0]
    wf["5"] = {"class_type": "KSampler", "inputs": {"model": model, "seed": 0, "steps": 3, "cfg": 1.0,
                                                    "sampler_name": "euler", "scheduler": "simple", "positive": ["3", 0],
                                                    "negative": ["2", 0], "latent_image": ["4", 0], "denoise": 1.0}}
    wf["6"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}}
    return wf


LOWBIT = {"class_type": "LowBitDiffusionModelLoader",
          "inputs": {"model_name": "tiny_w4a4.safetensors", "backend": "auto", "compute_dtype": "auto"}}
BF16 = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_bf16.safetensors", "weight_dtype": "default"}}


def _latent(server, wf):
    from comfyui_harness import output_files
    from safetensors.torch import load_file

    entry = server.run(wf)
    files = output_files(entry, "6", "latents")
    assert len(files) == 1, entry.get("outputs")
    f = files[0]
    return load_file(str(server.output / f["subfolder"] / f["filename"]))["latent_tensor"].float()


def _compare(server, loras, tag):
    """(cosine, norm ratio, relative size of the 16-bit LoRA effect) of the LoRA's latent deltas."""
    q1 = _latent(server, _sampling(LOWBIT, f"{tag}/q1", loras))  # with the LoRAs first: q0 then samples after removal
    q0 = _latent(server, _sampling(LOWBIT, f"{tag}/q0"))
    b0, b1 = _latent(server, _sampling(BF16, f"{tag}/b0")), _latent(server, _sampling(BF16, f"{tag}/b1", loras))
    dq, db = (q1 - q0).flatten(), (b1 - b0).flatten()
    cos = torch.nn.functional.cosine_similarity(dq, db, dim=0).item()
    return cos, (dq.norm() / db.norm()).item(), (db.norm() / b0.norm()).item(), q0, q1


def test_lora_loader_model_only_moves_latent_like_16bit(server):
    cos, ratio, effect, q0, _ = _compare(server, [("style_diffusers.safetensors", 1.0)], "one")
    print(f"diffusers LoRA, strength 1: effect {effect:.3f} of the 16-bit latent; lowbit vs 16-bit delta cosine "
          f"{cos:.3f}, norm ratio {ratio:.3f}")
    assert effect > 0.02 and cos > COS_MIN and 0.6 < ratio < 1.6
    # nothing skipped on quantized layers (the patcher's warnings start "lowbit: "; the loader's info line about
    # the activation mode starts "comfyui-lowbit: ")
    assert not re.search(r"(?<![\w-])lowbit: ", server.log_tail(400))

    # two stacked LoRAs (diffusers + kohya), the second at negative strength
    loras = [("style_diffusers.safetensors", 0.7), ("detail_kohya.safetensors", -0.8)]
    cos2, ratio2, effect2, _, q2 = _compare(server, loras, "two")
    print(f"two stacked LoRAs (0.7, -0.8): effect {effect2:.3f}; delta cosine {cos2:.3f}, norm ratio {ratio2:.3f}")
    assert effect2 > 0.02 and cos2 > COS_MIN and 0.6 < ratio2 < 1.6

    # LowBitLoraStack: the same two LoRAs in one node give exactly the chained loaders' latent
    wf = _sampling(LOWBIT, "stack")
    wf["s"] = {"class_type": "LowBitLoraStack",
               "inputs": {"model": ["1", 0], "lora_1": loras[0][0], "strength_1": loras[0][1],
                          "lora_2": loras[1][0], "strength_2": loras[1][1], "lora_3": "None", "strength_3": 1.0}}
    wf["5"]["inputs"]["model"] = ["s", 0]
    assert torch.equal(_latent(server, wf), q2)

    # q0 was sampled on the loaded model right after a LoRA run; a fresh load (another loader input, so
    # ComfyUI loads the file again) that never saw a LoRA samples exactly the same latent
    fresh = {**LOWBIT, "inputs": {**LOWBIT["inputs"], "backend": "reference"}}
    assert torch.equal(_latent(server, _sampling(fresh, "fresh")), q0)
