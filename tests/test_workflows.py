"""Every shipped UI workflow (workflows/*.json), converted to API format through ComfyUI's /object_info
and run headless on tiny stand-in models saved under the file names the workflow expects.

    COMFYUI_PATH=/work/comfyui /work/cvenv/bin/python -m pytest -q tests/test_workflows.py
"""
import json
import os
import struct
import sys
from pathlib import Path

import pytest

COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY, reason="COMFYUI_PATH is not set (point it at a ComfyUI 0.29.0 checkout)")]

WORKFLOW_DIR = Path(__file__).resolve().parent.parent / "workflows"
WORKFLOWS = sorted(p.name for p in WORKFLOW_DIR.glob("*.json"))
FILE_WIDGETS = {"LowBitDiffusionModelLoader": ("diffusion_models", [0]), "UNETLoader": ("diffusion_models", [0]),
                "LowBitTextEncoderLoader": ("text_encoders", [0, 1]), "VAELoader": ("vae", [0]),
                "LoraLoaderModelOnly": ("loras", [0]), "LowBitFlux2TextEncoderLoader": ("text_encoders", [0]),
                "LoadImage": ("input", [0])}
# tiny stand-ins run at 64x64 and 2 steps; everything else is as shipped
FAST = {"iters": 2}  # stand-ins need working checkpoints, not the best ones
SHRINK = {"EmptySD3LatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2},
          "EmptyFlux2LatentImage": {"width": 64, "height": 64}, "Flux2Scheduler": {"steps": 2, "width": 64, "height": 64},
          "ImageScaleToTotalPixels": {"megapixels": 0.01}}  # the 64x64 stand-in input -> 96x96 (sides of 16)
INPUT_SIZE = 64


def _load(name: str) -> dict:
    with open(WORKFLOW_DIR / name) as f:
        return json.load(f)


def _expected_files(wf: dict) -> set:
    return {(FILE_WIDGETS[n["type"]][0], n["widgets_values"][i]) for n in wf["nodes"] if n["type"] in FILE_WIDGETS
            for i in FILE_WIDGETS[n["type"]][1]}


def _write_standins(models: Path):
    import comfyui_standins as st
    from tiny_models import (TINY_MISTRAL_CONFIG, TINY_QWEN3_CONFIG, tiny_flux_state_dict, write_tiny_flux,
                             write_tiny_lowbit_flux, write_tiny_lowbit_flux2, write_tiny_lowbit_llm, write_tiny_lowbit_t5)

    dm, te = models / "diffusion_models", models / "text_encoders"
    write_tiny_flux(dm / "flux1-dev.safetensors", seed=0)
    write_tiny_lowbit_flux(dm / "flux1-dev-svdq-w4a4.safetensors", "svdq_w4a4", rank=16, options=FAST)
    write_tiny_lowbit_flux(dm / "flux1-schnell-svdq-w4a4.safetensors", "svdq_w4a4", rank=16, options=FAST,
                           guidance_embed=False)
    write_tiny_lowbit_flux(dm / "flux1-dev-ternary-r64.safetensors", "ternary", rank=64, options=FAST)
    # FLUX.1 Kontext has dev's shapes; Fill reads the latent, the masked image's latent and the mask (img_in 384 wide)
    write_tiny_lowbit_flux(dm / "flux1-kontext-dev-svdq-w4a4.safetensors", "svdq_w4a4", rank=16, options=FAST, seed=1)
    write_tiny_lowbit_flux(dm / "flux1-fill-dev-svdq-w4a4.safetensors", "svdq_w4a4", rank=16, options=FAST,
                           in_channels=384, out_channels=64)
    st.save_image(models.parent / "input" / "kontext_input.png", INPUT_SIZE, seed=1)
    st.save_image(models.parent / "input" / "inpaint_input.png", INPUT_SIZE, seed=2, transparent_left=True)
    write_tiny_lowbit_t5(te / "t5xxl-lowbit-w4a16.safetensors")
    st.save(st.clip_l_state_dict(), te / "clip_l.safetensors")
    st.save(st.vae_state_dict(), models / "vae" / "ae.safetensors")
    dev_sd = tiny_flux_state_dict(seed=0)
    st.save(st.lora_state_dict(dev_sd, seed=10), models / "loras" / "style-lora.safetensors")
    st.save(st.lora_state_dict(dev_sd, seed=11), models / "loras" / "detail-lora.safetensors")
    # FLUX.2: [dev] (guidance) and [klein] (none) shapes, their W4A16 text encoders, the FLUX.2 VAE, a reference image
    write_tiny_lowbit_flux2(dm / "flux2-dev-svdq-w4a4.safetensors", "svdq_w4a4", rank=16, options=FAST, guidance_embed=True)
    write_tiny_lowbit_flux2(dm / "flux2-klein-9b-svdq-w4a4.safetensors", "svdq_w4a4", rank=16, options=FAST)
    write_tiny_lowbit_llm(te / "mistral-3-small-flux2-w4a16.safetensors", TINY_MISTRAL_CONFIG)
    write_tiny_lowbit_llm(te / "qwen3-8b-w4a16.safetensors", TINY_QWEN3_CONFIG)
    st.save(st.flux2_vae_state_dict(), models / "vae" / "flux2-vae.safetensors")
    st.save_image(models.parent / "input" / "reference.png", 96, seed=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if COMFY not in sys.path:
        sys.path.insert(0, COMFY)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    from comfyui_harness import ComfyServer

    base = tmp_path_factory.mktemp("comfyui")
    srv = ComfyServer(COMFY, base, python=sys.executable, extra_args=["--cache-classic"])
    srv._layout()
    (srv.models / "vae").mkdir(parents=True, exist_ok=True)
    _write_standins(srv.models)
    with srv:
        srv.object_info_all = srv.get("/object_info", timeout=60)
        yield srv


def _api(server, wf: dict) -> dict:
    from ui_workflow import ui_to_api

    prompt = ui_to_api(wf, server.object_info_all)
    for node in prompt.values():
        node["inputs"].update(SHRINK.get(node["class_type"], {}))
    return prompt


def _png_size(path: Path) -> tuple:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _path(server, folder: str, filename: str) -> Path:
    return server.base / "input" / filename if folder == "input" else server.models / folder / filename


def _check_images(server, entry: dict, wf: dict):
    saves = [str(n["id"]) for n in wf["nodes"] if n["type"] == "SaveImage" and n.get("mode", 0) == 0]
    assert saves, "workflow has no SaveImage"
    for nid in saves:
        images = entry["outputs"].get(nid, {}).get("images", [])
        assert len(images) == 1, f"SaveImage {nid} produced {images}"
        img = images[0]
        path = server.output / img["subfolder"] / img["filename"]
        # an image-to-image graph samples at the scaled input's size, a text-to-image one (references or not) at its
        # empty latent's
        scaled = (any(n["type"] == "ImageScaleToTotalPixels" for n in wf["nodes"])
                  and not any(n["type"].startswith("Empty") and n["type"].endswith("LatentImage") for n in wf["nodes"]))
        assert _png_size(path) == ((96, 96) if scaled else (64, 64))


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_is_documented(name):
    wf = _load(name)
    notes = " ".join(n["widgets_values"][0] for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote"))
    assert notes, f"{name} has no Note node"
    for folder, filename in _expected_files(wf):
        assert f"models/{folder}/{filename}" in notes or filename in notes, \
            f"{name}: the Note does not say where {filename} ({folder}) goes"


def test_shipped_set():
    assert set(WORKFLOWS) == {"flux1-dev-lowbit-w4a4.json", "flux1-schnell-lowbit-w4a4.json",
                              "flux1-dev-lowbit-lora.json", "flux1-dev-lowbit-ternary.json",
                              "flux1-dev-lowbit-quantize-your-own.json", "flux1-kontext-dev-lowbit-w4a4.json",
                              "flux1-fill-dev-lowbit-w4a4.json", "flux2-dev-lowbit-w4a4.json",
                              "flux2-klein-lowbit-w4a4.json", "flux2-dev-lowbit-reference.json"}


@pytest.mark.parametrize("name", [n for n in WORKFLOWS if "quantize" not in n])
def test_workflow_runs(server, name):
    wf = _load(name)
    for folder, filename in _expected_files(wf):
        assert _path(server, folder, filename).is_file(), f"stand-in {folder}/{filename} missing"
    entry = server.run(_api(server, wf), timeout=600)
    _check_images(server, entry, wf)


def test_quantize_your_own_two_runs(server):
    from comfyui_lowbit import checkpoint

    wf = _load("flux1-dev-lowbit-quantize-your-own.json")
    entry = server.run(_api(server, wf), timeout=600)  # run 1: calibrate (the quantize node ships bypassed)
    _check_images(server, entry, wf)
    save_id = next(str(n["id"]) for n in wf["nodes"] if n["type"] == "LowBitSaveCalibration")
    calib = entry["outputs"][save_id]["text"][0]
    assert (server.output / calib).is_file()

    quant = next(n for n in wf["nodes"] if n["type"] == "LowBitQuantizeModel")
    for n in wf["nodes"]:  # run 2, as the Note says: pick the file, un-bypass the quantize node
        n["mode"] = 0 if n is quant else 2
    quant["widgets_values"][3] = calib
    server.run(_api(server, wf), timeout=600)
    out = server.models / "diffusion_models" / quant["widgets_values"][4]
    info = checkpoint.read_info(str(out))
    assert info.model == "flux" and info.format_counts() == {"svdq_w4a4": 2 * 8 + 2 * 2, "w4a16": 2 * 2 + 2}
    with pytest.raises(Exception, match="exists"):  # queued again: never overwrites
        server.run(_api(server, wf), timeout=120)
