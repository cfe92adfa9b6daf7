"""The loader nodes in a real headless ComfyUI on malformed files (tests/malformed.py): one readable error
naming the file and the damage, reported as comfyui_lowbit.CheckpointError (not a file path), and a valid
prompt still runs after each failed one. Also the node help pages (web/docs) as the server serves them.

    COMFYUI_PATH=/work/comfyui /work/comfyui/venv/bin/python -m pytest -q tests/test_comfyui_validation.py
"""
import os
import sys

import malformed
import pytest
import torch

COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY, reason="COMFYUI_PATH is not set (point it at a ComfyUI 0.29.0 checkout)")]

VEC = 64  # the tiny FLUX's pooled width, fed by the seeded test conditioning node
VALID = "valid_w4a4.safetensors"
SERVER_CASES = malformed.ALL  # every class of damage, as through the CLI (tests/test_validation.py)
T5_CASES = sorted(malformed.T5_CASES)
FLUX2_CASES = sorted(malformed.FLUX2_CASES)
TE_CASES = sorted(malformed.TE_CASES)


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    from comfyui_harness import ComfyServer
    from tiny_models import (TINY_MISTRAL_CONFIG, write_tiny_flux, write_tiny_flux2, write_tiny_lowbit_llm,
                             write_tiny_lowbit_t5)

    from comfyui_lowbit import checkpoint

    base = tmp_path_factory.mktemp("comfyui")
    srv = ComfyServer(COMFY, base, python=sys.executable)  # ComfyUI's default (RAM-pressure) cache
    srv._layout()
    dm, te = srv.models / "diffusion_models", srv.models / "text_encoders"
    src = write_tiny_flux(base / "tiny_flux_bf16.safetensors", vec_in_dim=VEC)
    valid = checkpoint.quantize_file(src, dm / VALID, "svdq_w4a4", rank=16, options={"iters": 1})["dst"]
    srv.expected = {}
    for case in SERVER_CASES:
        srv.expected[case] = malformed.write_case(case, valid, dm / f"{case}.safetensors")
    t5 = write_tiny_lowbit_t5(te / "valid_t5.safetensors")
    for case in T5_CASES:
        srv.expected[case] = malformed.write_case(case, t5, te / f"{case}.safetensors")
    flux2 = checkpoint.quantize_file(write_tiny_flux2(base / "tiny_flux2_bf16.safetensors"), base / "flux2.safetensors",
                                     "svdq_w4a4", rank=16, options={"iters": 1})["dst"]
    for case in FLUX2_CASES:
        srv.expected[case] = malformed.write_case(case, flux2, dm / f"{case}.safetensors")
    llm = write_tiny_lowbit_llm(base / "te.safetensors", {**TINY_MISTRAL_CONFIG, "num_hidden_layers": 2})
    for case in TE_CASES:
        srv.expected[case] = malformed.write_case(case, llm, te / f"{case}.safetensors")
    with srv:
        yield srv


def _sampling(model_name, seed):
    return {
        "1": {"class_type": "LowBitDiffusionModelLoader",
              "inputs": {"model_name": model_name, "backend": "auto", "compute_dtype": "auto"}},
        "2": {"class_type": "LowBitTestConditioning", "inputs": {"seed": 7, "tokens": 8, "context_dim": 128,
                                                                 "pooled_dim": VEC}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0],
                                                   "negative": ["2", 0], "latent_image": ["3", 0], "denoise": 1.0}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": f"v/{seed}"}},
    }


def _valid_prompt_runs(server, seed):
    from comfyui_harness import output_files
    from safetensors.torch import load_file

    entry = server.run(_sampling(VALID, seed))
    f = output_files(entry, "5", "latents")[0]
    lat = load_file(str(server.output / f["subfolder"] / f["filename"]))["latent_tensor"]
    assert lat.shape == (1, 16, 4, 4) and torch.isfinite(lat).all()


def _check_error(server, err, name, case):
    assert err["exception_type"] == "comfyui_lowbit.CheckpointError", err["exception_type"]
    msg = err["exception_message"].strip()
    assert len(msg.splitlines()) == 1, msg
    for e in [name] + server.expected[case]:
        assert e in msg, (e, msg)


def test_valid_file_samples(server):
    _valid_prompt_runs(server, 0)


@pytest.mark.parametrize("case", SERVER_CASES + FLUX2_CASES)
def test_loader_refuses_malformed_file_in_one_line(server, case):
    name = f"{case}.safetensors"
    wf = _sampling(name, 1)
    err = server.error_of(wf)
    assert err["node_type"] == "LowBitDiffusionModelLoader"
    _check_error(server, err, name, case)
    _valid_prompt_runs(server, 100 + (SERVER_CASES + FLUX2_CASES).index(case))


@pytest.mark.parametrize("case", T5_CASES)
def test_text_encoder_loader_refuses_malformed_t5(server, case):
    """The damaged file is the first encoder, so the loader stops there (the second is never read)."""
    name = f"{case}.safetensors"
    wf = _sampling(VALID, 2)
    wf["2"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["6", 0], "text": "a lighthouse"}}
    wf["6"] = {"class_type": "LowBitTextEncoderLoader",
               "inputs": {"clip_name1": name, "clip_name2": "valid_t5.safetensors", "compute_dtype": "auto"}}
    err = server.error_of(wf)
    assert err["node_type"] == "LowBitTextEncoderLoader"
    _check_error(server, err, name, case)
    _valid_prompt_runs(server, 200 + T5_CASES.index(case))


@pytest.mark.parametrize("case", TE_CASES)
def test_flux2_text_encoder_loader_refuses_malformed_file(server, case):
    name = f"{case}.safetensors"
    wf = _sampling(VALID, 3)
    wf["2"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["6", 0], "text": "a lighthouse"}}
    wf["6"] = {"class_type": "LowBitFlux2TextEncoderLoader", "inputs": {"clip_name": name, "compute_dtype": "auto"}}
    err = server.error_of(wf)
    assert err["node_type"] == "LowBitFlux2TextEncoderLoader"
    _check_error(server, err, name, case)
    _valid_prompt_runs(server, 300 + TE_CASES.index(case))


def test_node_help_pages_are_served(server):
    """ComfyUI's frontend asks /extensions/<pack folder>/docs/<NodeClass>.md for a custom node's help; every
    node has one, and it mentions each of the node's inputs."""
    from comfyui_lowbit.nodes import NODE_CLASS_MAPPINGS

    folder = "comfyui_lowbit"  # the harness links the pack under this name
    for name in NODE_CLASS_MAPPINGS:
        status, text = server.get_text(f"/extensions/{folder}/docs/{name}.md")
        assert status == 200 and text.startswith("# "), (name, status, text[:200])
        info = server.object_info(name)
        assert info["python_module"] == f"custom_nodes.{folder}"  # what the frontend derives the URL from
        for section in ("required", "optional"):
            for inp in info["input"].get(section, {}):
                slot = inp[:-1] + "1" if inp[-1].isdigit() else inp  # lora_3 is documented as lora_1 ... lora_4
                assert f"**{inp}**" in text or f"**{slot}**" in text, f"{name}.md does not describe {inp}"


def test_quantize_node_rank_default_is_the_commands(server):
    from comfyui_lowbit.checkpoint import DEFAULT_RANK

    rank = server.object_info("LowBitQuantizeModel")["input"]["required"]["rank"][1]
    assert rank["default"] == -1
    for fmt in ("svdq_w4a4", "ternary"):
        assert f"{DEFAULT_RANK[fmt]} for {fmt}" in rank["tooltip"]
