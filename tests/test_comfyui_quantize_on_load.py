"""Quantize on load in ComfyUI (issue 29): 'Load Diffusion Model, Quantize on Load' on tiny FLUX.1 / FLUX.2 files
in bf16 and fp8, the text-encoder loaders' quantize_16bit, the cache in models/lowbit_cache (hit, miss, refusal and
rebuild, a full disk), a size budget; in process (the node classes called as ComfyUI calls them, its progress hook
set), then once in a headless server.

    COMFYUI_PATH=/work/comfyui /work/comfyui/venv/bin/python -m pytest -q tests/test_comfyui_quantize_on_load.py
"""
import errno
import json
import os
import sys

import pytest
import torch
from tiny_models import (TINY_MISTRAL_CONFIG, TINY_QWEN3_CONFIG, tiny_clip_l_state_dict, write_tiny_flux, write_tiny_flux2, write_tiny_llm,
                         write_tiny_t5)

COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY, reason="COMFYUI_PATH is not set (point it at a ComfyUI 0.29.0 checkout)")]

SMALL = dict(hidden_size=128, num_heads=1, depth=1, depth_single_blocks=1)  # head dim 128, one block of each kind
SOURCES = {"flux1_bf16": (write_tiny_flux, torch.bfloat16), "flux1_fp8": (write_tiny_flux, torch.float8_e4m3fn),
           "flux2_bf16": (write_tiny_flux2, torch.bfloat16), "flux2_fp8": (write_tiny_flux2, torch.float8_e4m3fn)}
NO_CALIB = "none (data-free)"


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LOWBIT_BACKEND", "reference")


@pytest.fixture(scope="module")
def models(comfy, tmp_path_factory):
    """ComfyUI's model folders pointed at a temporary models/ (diffusion_models, text_encoders, lowbit_cache)."""
    import folder_paths

    base = tmp_path_factory.mktemp("models")
    saved = {k: folder_paths.folder_names_and_paths.get(k) for k in ("diffusion_models", "text_encoders", "lowbit_cache")}
    for k in saved:
        (base / k).mkdir()
        folder_paths.folder_names_and_paths[k] = ([str(base / k)], {".safetensors"} if k != "lowbit_cache" else set())
    for name, (write, dtype) in SOURCES.items():
        write(base / "diffusion_models" / f"{name}.safetensors", dtype=dtype, **SMALL)
    yield base
    for k, v in saved.items():
        if v is None:
            folder_paths.folder_names_and_paths.pop(k, None)
        else:
            folder_paths.folder_names_and_paths[k] = v


@pytest.fixture
def calls(monkeypatch):
    """Every quantize_file run (through the cache) and every progress update ComfyUI's bar hook receives."""
    import comfy.utils

    from comfyui_lowbit.checkpoint import convert

    seen = {"quantize": [], "progress": []}
    real = convert.quantize_file

    def counting(*args, **kwargs):
        seen["quantize"].append(os.path.basename(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(convert, "quantize_file", counting)
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda v, t, preview=None, node_id=None: seen["progress"].append((v, t)))
    yield seen
    comfy.utils.set_progress_bar_global_hook(old)


def _load(name, fmt="svdq_w4a4", max_size_gb=0.0, **kw):
    from comfyui_lowbit.nodes.quantize_on_load import LowBitQuantizeOnLoad

    return LowBitQuantizeOnLoad().load(name, fmt, max_size_gb, NO_CALIB, **kw)[0]


def _cache(models):
    return sorted(p for p in os.listdir(models / "lowbit_cache") if not p.startswith("."))


def _inputs(flux2):
    g = torch.Generator().manual_seed(1)
    if flux2:
        return dict(x=torch.randn(1, 128, 4, 4, generator=g), timestep=torch.tensor([0.7]),
                    context=torch.randn(1, 8, 384, generator=g), guidance=torch.tensor([3.5]))
    return dict(x=torch.randn(1, 16, 8, 8, generator=g), timestep=torch.tensor([0.7]),
                context=torch.randn(1, 8, 128, generator=g), y=torch.randn(1, 768, generator=g),
                guidance=torch.tensor([3.5]))


def _forward(mp, flux2):
    mp.patch_model()
    try:
        with torch.no_grad():
            return mp.model.diffusion_model(**_inputs(flux2)).float()
    finally:
        mp.unpatch_model()


@pytest.mark.parametrize("name", list(SOURCES))
def test_first_load_quantizes_and_caches_second_load_hits(models, calls, name):
    """First load: one quantization, ComfyUI's progress bar runs to the layer count, one file in lowbit_cache, the
    model ComfyUI's FLUX with quantized layers, close to the 16-bit file through ComfyUI's own loader. Second load:
    no quantization, the same file, the same output."""
    import comfy.sd

    from comfyui_lowbit import checkpoint
    from comfyui_lowbit.nodes.ops import lowbit_modules

    flux2 = name.startswith("flux2")
    before = set(_cache(models))
    mp = _load(f"{name}.safetensors")
    assert len(calls["quantize"]) == 1
    new = sorted(set(_cache(models)) - before)
    assert new == calls["quantize"] and new[0].startswith(f"{name}.svdq_w4a4.")
    info = checkpoint.read_info(str(models / "lowbit_cache" / new[0]))
    units = len({k.rpartition(".")[0] for k in checkpoint.flux.expected_shapes(info.config)})
    assert calls["progress"][-1] == (units, units) and len(calls["progress"]) >= 2
    q = lowbit_modules(mp.model.diffusion_model)
    assert len(q) == len(info.layers) and type(mp.model).__name__ == ("Flux2" if flux2 else "Flux")
    low = _forward(mp, flux2)
    ref = _forward(comfy.sd.load_diffusion_model(str(models / "diffusion_models" / f"{name}.safetensors")), flux2)
    rel = ((low - ref).norm() / ref.norm()).item()
    print(f"{name}: quantized on load vs ComfyUI's loader on the source: relative output distance {rel:.4f}")
    assert torch.isfinite(low).all() and rel < 0.3
    mtime = os.path.getmtime(models / "lowbit_cache" / new[0])
    os.utime(models / "lowbit_cache" / new[0], (mtime - 100, mtime - 100))
    again = _load(f"{name}.safetensors")
    assert len(calls["quantize"]) == 1 and set(_cache(models)) - before == set(new)  # no quantization ran
    assert os.path.getmtime(models / "lowbit_cache" / new[0]) > mtime - 50  # marked used (least recently used)
    torch.testing.assert_close(_forward(again, flux2), low, rtol=0, atol=0)


def test_changed_option_or_source_misses(models, calls):
    from comfyui_lowbit.checkpoint.cache import QuantCache

    _load("flux1_bf16.safetensors")
    n = len(calls["quantize"])
    _load("flux1_bf16.safetensors", "ternary")
    _load("flux1_bf16.safetensors", max_size_gb=0.002)
    assert len(calls["quantize"]) == n + 2
    src = models / "diffusion_models" / "flux1_changed.safetensors"
    write_tiny_flux(src, **SMALL)
    _load("flux1_changed.safetensors")
    assert len(calls["quantize"]) == n + 2  # same content under another name: a hit
    write_tiny_flux(src, seed=9, **SMALL)
    _load("flux1_changed.safetensors")
    assert len(calls["quantize"]) == n + 3  # other weights: a miss
    sizes = {e.source: e.size for e in QuantCache(str(models / "lowbit_cache")).entries()}
    assert "flux1_changed.safetensors" in sizes


@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_corrupt_cache_file_is_refused_and_rebuilt(models, calls, caplog, damage):
    """truncated: the header check refuses it; nan: the header passes, the loader's full validation refuses it.
    Either way the file is removed with one warning line, quantized again and loaded."""
    from safetensors import safe_open

    _load("flux2_bf16.safetensors")
    path = models / "lowbit_cache" / next(p for p in _cache(models) if p.startswith("flux2_bf16.svdq_w4a4."))
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        path.write_bytes(bytes(data[: len(data) - 1000]))
    else:
        with safe_open(str(path), "pt") as f:
            import json
            import struct

            n = struct.unpack("<Q", data[:8])[0]
            entry = json.loads(data[8:8 + n])["img_in.weight"]
            start = 8 + n + entry["data_offsets"][0]
            assert f.get_slice("img_in.weight").get_dtype() == "BF16"
        data[start:start + 2] = b"\xc0\x7f"  # a bf16 NaN
        path.write_bytes(bytes(data))
    n_before = len(calls["quantize"])
    mp = _load("flux2_bf16.safetensors")
    assert calls["quantize"][n_before:] == [path.name]
    assert "refused" in caplog.text and path.name in caplog.text
    assert torch.isfinite(_forward(mp, True)).all()


def test_full_disk_leaves_no_partial_cache_file(models, calls, monkeypatch):
    from comfyui_lowbit.checkpoint import lowbit_file

    def full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 65536)
        raise OSError(errno.ENOSPC, "No space left on device")

    before = set(os.listdir(models / "lowbit_cache"))
    real = lowbit_file.save_file
    monkeypatch.setattr(lowbit_file, "save_file", full)
    with pytest.raises(OSError, match="No space left|disk is full"):
        _load("flux1_fp8.safetensors", "ternary")
    assert set(os.listdir(models / "lowbit_cache")) == before  # temp file included
    monkeypatch.setattr(lowbit_file, "save_file", real)
    _load("flux1_fp8.safetensors", "ternary")
    assert len(set(os.listdir(models / "lowbit_cache")) - before) == 1


def test_budget_through_the_node(models, calls):
    """max_size_gb: the cached file fits it, mixes formats per layer and loads through ComfyUI."""
    from comfyui_lowbit import checkpoint
    from comfyui_lowbit.nodes.ops import lowbit_modules

    budget_gb = 0.0017
    mp = _load("flux2_fp8.safetensors", max_size_gb=budget_gb)
    path = models / "lowbit_cache" / calls["quantize"][-1]
    info = checkpoint.read_info(str(path))
    assert os.path.getsize(path) <= budget_gb * 1e9 and ".max0.0017GB." in path.name and "lowbit.plan" in info.metadata
    plan = json.loads(info.metadata["lowbit.plan"])
    chosen = {layer: fmt for layer, (fmt, _) in plan["layers"].items()}
    assert len(set(chosen.values())) > 1  # a mix: each layer loads in its own format (16-bit ones as ComfyUI's)
    assert {n: c["format"] for n, c in info.layers.items()} == {n: f for n, f in chosen.items() if f != "16-bit"}
    assert len(lowbit_modules(mp.model.diffusion_model)) == len(info.layers)
    assert torch.isfinite(_forward(mp, True)).all()


def test_bad_input_is_named_before_work(models, calls):
    from comfyui_lowbit.checkpoint.cache import QuantCache

    _load("flux1_bf16.safetensors")
    cached = QuantCache(str(models / "lowbit_cache")).entries()[0].path
    os.link(cached, models / "diffusion_models" / "already_lowbit.safetensors")
    before, calls["progress"] = _cache(models), []
    with pytest.raises(ValueError, match=r"already_lowbit\.safetensors is already a lowbit 'flux' checkpoint; load it "
                                         r"with 'Load LowBit Diffusion Model'"):
        _load("already_lowbit.safetensors")
    with pytest.raises(ValueError, match="size budget 0.000 GB is below the smallest checkpoint"):
        _load("flux1_bf16.safetensors", max_size_gb=0.0001)
    with pytest.raises(ValueError, match="more than the cache's size limit"):
        _load("flux2_bf16.safetensors", "ternary", cache_limit_gb=0.0001)
    with pytest.raises(ValueError, match="activations must be one of"):
        _load("flux2_bf16.safetensors", "ternary", activations="int2")
    assert _cache(models) == before and not calls["progress"]  # no layer was quantized


def test_text_encoders_quantize_on_load(models, calls):
    """FLUX.1's loader: a 16-bit T5 and CLIP-L quantized to W4A16 (one run each), then hits; FLUX.2's loader: a
    16-bit Qwen3 and a Mistral 3 likewise; the CLIPs encode. Without quantize_16bit the 16-bit files load as
    before."""
    from comfyui_harness import apply_compat
    from safetensors.torch import save_file

    from comfyui_lowbit.nodes.loaders import LowBitFlux2TextEncoderLoader, LowBitTextEncoderLoader
    from comfyui_lowbit.nodes.ops import lowbit_modules

    apply_compat()  # the Mistral 3 tokenizer under transformers 5 (tests/comfyui_harness.py)
    te = models / "text_encoders"
    write_tiny_t5(te / "t5_bf16.safetensors")
    sd = tiny_clip_l_state_dict(hidden=64, vocab=49408)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(te / "clip_l_fp16.safetensors"))
    write_tiny_llm(te / "qwen3_bf16.safetensors", {**TINY_QWEN3_CONFIG})
    for i in range(2):
        clip = LowBitTextEncoderLoader().load("clip_l_fp16.safetensors", "t5_bf16.safetensors", quantize_16bit=True)[0]
        assert len(calls["quantize"]) == 2
        assert len(lowbit_modules(clip.cond_stage_model)) == 2 * 7 + 2 * 6
        cond = clip.encode_from_tokens(clip.tokenize("a lighthouse"))
        assert torch.isfinite(cond).all()
    plain = LowBitTextEncoderLoader().load("clip_l_fp16.safetensors", "t5_bf16.safetensors")[0]
    assert not lowbit_modules(plain.cond_stage_model)
    write_tiny_llm(te / "mistral3_bf16.safetensors", {**TINY_MISTRAL_CONFIG})
    for name, layers, n in (("qwen3_bf16", 28, 3), ("mistral3_bf16", 40, 4)):
        for i in range(2):
            clip = LowBitFlux2TextEncoderLoader().load(f"{name}.safetensors", quantize_16bit=True)[0]
            assert len(calls["quantize"]) == n and len(lowbit_modules(clip.cond_stage_model)) == layers * 7
            assert torch.isfinite(clip.encode_from_tokens(clip.tokenize("a lighthouse"))).all()


# ---- headless ComfyUI -------------------------------------------------------------------------------------------

def test_server_quantize_on_load_then_cache_hit(comfy, tmp_path):
    """A real ComfyUI: the node in a KSampler graph quantizes the bf16 file into models/lowbit_cache (progress
    bar), a second prompt (backend changed, so the loader runs again; same cache key) loads the cached file: the
    server log says miss, then hit; one cache file, the same latent."""
    from comfyui_harness import ComfyServer, output_files
    from safetensors.torch import load_file

    srv = ComfyServer(COMFY, tmp_path, python=sys.executable, extra_args=["--cache-classic"],
                      env={"TRITON_INTERPRET": None, "LOWBIT_BACKEND": None})
    srv._layout()
    write_tiny_flux(srv.models / "diffusion_models" / "flux1_bf16.safetensors", **SMALL)

    def graph(backend, prefix):
        return {
            "1": {"class_type": "LowBitQuantizeOnLoad", "inputs": {
                "model_name": "flux1_bf16.safetensors", "format": "svdq_w4a4", "max_size_gb": 0.0,
                "calibration": NO_CALIB, "backend": backend, "compute_dtype": "auto"}},
            "2": {"class_type": "LowBitTestConditioning", "inputs": {"seed": 7, "tokens": 8, "context_dim": 128,
                                                                     "pooled_dim": 768}},
            "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
            "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 0, "steps": 2, "cfg": 1.0,
                                                       "sampler_name": "euler", "scheduler": "simple",
                                                       "positive": ["2", 0], "negative": ["2", 0],
                                                       "latent_image": ["3", 0], "denoise": 1.0}},
            "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": prefix}},
        }

    def latent(entry):
        f = output_files(entry, "5", "latents")[0]
        return load_file(str(srv.output / f["subfolder"] / f["filename"]))["latent_tensor"]

    with srv:
        info = srv.object_info("LowBitQuantizeOnLoad")["input"]
        assert "flux1_bf16.safetensors" in info["required"]["model_name"][0]
        first = latent(srv.run(graph("auto", "q/first")))
        cached = [p for p in os.listdir(srv.models / "lowbit_cache") if p.endswith(".safetensors")]
        assert len(cached) == 1 and cached[0].startswith("flux1_bf16.svdq_w4a4.")
        inode = os.stat(srv.models / "lowbit_cache" / cached[0]).st_ino
        second = latent(srv.run(graph("reference", "q/second")))
        log = srv.log_path.read_text()
    assert log.count("cache miss for") == 1 and log.count("cache hit for") == 1, log[-3000:]
    assert os.listdir(srv.models / "lowbit_cache") == cached
    assert os.stat(srv.models / "lowbit_cache" / cached[0]).st_ino == inode
    assert torch.isfinite(first).all()
    torch.testing.assert_close(second, first, rtol=0, atol=0)
