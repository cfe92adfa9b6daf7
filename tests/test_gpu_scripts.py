"""The GPU run's helpers that need no GPU: the trimmed ComfyUI copy it carries imports what an in-process run
needs and fits the device tool's 64 MiB, and the summary renders real result rows. The whole script is dry-run
by hand on a CPU (a few minutes; see scripts/gpu_comfyui_full.py):
    python scripts/gpu_comfyui_full.py --out /tmp/dry --small --device cpu --comfyui $COMFYUI_PATH --quant-options '{"iters": 1}'
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
COMFY = os.environ.get("COMFYUI_PATH")
CARRY_LIMIT = 64 * 2 ** 20
KITCHEN_WHEEL = 40 * 2 ** 20  # comfy-kitchen 0.2.24 cp312 wheel (CUDA backend included): 39.8 MB


@pytest.mark.comfyui
@pytest.mark.skipif(not COMFY, reason="COMFYUI_PATH is not set (point it at a ComfyUI 0.29.0 checkout)")
def test_trimmed_comfyui_copy_imports_and_fits_the_carry(tmp_path):
    import gpu_carry

    size = gpu_carry.copy_source(Path(COMFY), tmp_path / "ComfyUI")
    assert size + KITCHEN_WHEEL + 2 * 2 ** 20 < CARRY_LIMIT, f"ComfyUI copy {size / 2 ** 20:.1f} MiB leaves no room"
    assert not [p for p in (tmp_path / "ComfyUI").rglob("*") if "tokenizer" in str(p) and p.suffix not in ("", ".py")]
    versions = gpu_carry.pinned_versions(Path(COMFY))
    assert set(versions) == set(gpu_carry.WHEELS) and all(versions.values())
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import comfy.options, comfy.cli_args; "
            "comfy.cli_args.args.cpu = True; import comfy.sd, comfy.sample, comfy.model_patcher, comfy.lora, folder_paths; "
            "import comfy.ldm.flux.model; print(comfy.model_patcher.ModelPatcherDynamic.__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ComfyUI")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ModelPatcherDynamic" in out.stdout


def _summary(tmp_path, rows) -> str:
    """The Markdown summary gpu_comfyui_summary.py writes for these result rows."""
    from gpu_comfyui_summary import write_summary

    res = tmp_path / "results.jsonl"
    res.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_summary(res, tmp_path / "summary.md")
    return (tmp_path / "summary.md").read_text()


def test_summary_renders_result_rows(tmp_path):
    rows = [
        {"phase": "env", "gpu": "NVIDIA H100 80GB HBM3", "gpu_mem_gb": 79.2, "torch": "2.11.0+cu130", "cuda": "13.0",
         "triton": "3.6.0", "python": "3.12.3", "comfyui": "0.29.0", "small": False, "budget_s": 480},
        {"phase": "build", "ok": True, "what": "svdq_w4a4", "bytes": 6.65e9, "build_s": 31.0, "save_s": 4.0,
         "host_rss_peak_gb": 9.1, "est_full_quantize_s": 140.0, "per_shape_s": {"svdq_w4a4 9216x3072": 0.4},
         "per_shape_host_s": {"svdq_w4a4 9216x3072": 0.05}},
        {"config": "dynamic", "event": "setup", "dynamic_vram": True, "comfy_args": "", "import_s": 7.0},
        {"config": "dynamic", "model": "w4a4", "event": "load", "patcher": "LowBitModelPatcherDynamic",
         "model_size_gb": 6.2, "file_s": 3.1, "to_device_s": 0.9, "lowvram": False},
        {"config": "dynamic", "model": "w4a4", "event": "warmup", "first_step_s": 95.0},
        {"config": "dynamic", "model": "w4a4", "event": "sample", "step_s": 0.61, "transformer_vram_gb": 7.4,
         "torch_peak_gb": 7.9, "lowvram": False},
        {"config": "dynamic", "model": "w4a4", "event": "lora", "rank": 32, "remove_load_s": 0.05,
         "apply": {"map_s": 1.2, "load_s": 0.3, "step_s": 0.7}, "strength": {"map_s": 1.1, "load_s": 0.2},
         "removal_bit_identical": True, "packed_weights_unmoved": True, "lora_effect_rel": 0.2},
        {"phase": "compare", "a": "static", "b": "dynamic", "model": "w4a4", "kind": "base", "identical": True,
         "max_abs": 0.0, "rel_l2": 0.0},
        {"phase": "cli_quantize", "format": "svdq_w4a4", "finished": False, "seconds": 45.0, "done": 60, "total": 437,
         "projected_total_s": 327.75, "host_rss_peak_gb": 8.2},
        {"config": "static", "model": "bf16", "event": "error", "error": "OutOfMemoryError: CUDA out of memory"},
    ]
    md = _summary(tmp_path, rows)
    assert "NVIDIA H100 80GB HBM3" in md and "| svdq_w4a4 | 6.65 | 31.00 |" in md
    assert "| dynamic | w4a4 | LowBitModelPatcherDynamic | 6.20 | 3.10 | 0.90 | 95.00 | 0.61 | 7.40 |" in md
    assert "| dynamic | w4a4 | 1.20 | 0.30 | 0.70 | 1.30 | 0.05 | yes | yes | 0.20 |" in md
    assert "| svdq_w4a4 | NO | 45.00 | 60/437 | 327.75 | 8.20 |" in md
    assert "OutOfMemoryError" in md and "## Approximated" in md


def test_quantize_progress_is_read_from_the_log(tmp_path):
    from gpu_comfyui_full import progress_from_log

    log = tmp_path / "log.txt"
    log.write_text("=== build\n3/9 [00:01<00:02]\n=== lowbit quantize svdq_w4a4: ...\nLOWBIT_PEAK_RSS_GB=1.500\n"
                   "x.safetensors:   5%|5         | 21/437 [00:10<03:20,  2.1layer/s]\rx.safetensors:  "
                   "10%|#         | 44/437 [00:20<03:00]\nLOWBIT_PEAK_RSS_GB=2.250\n")
    assert progress_from_log(log) == {"done": 44, "total": 437, "host_rss_peak_gb": 2.25}


def test_stream_summary_renders_rows(tmp_path):
    """The DynamicVRAM streaming rows (issue 27) become one table line per model and card, with the target checked
    only where at least half the quantized bytes streamed."""
    base = {"config": "stream-flux1", "model": "w4a4", "event": "stream", "quantized_gb": 6.2}
    rows = [
        {"config": "stream-flux1", "model": "w4a4", "event": "stream_load", "patcher": "LowBitModelPatcherDynamic",
         "quantized_gb": 6.2, "model_size_gb": 6.6, "t5_quantized_gb": 2.4, "build_s": 3.0},
        {**base, "card_gb": None, "te_encode_s": 0.4, "first_step_s": 80.0, "step_s": 0.60, "quant_streamed_fraction": 0.0},
        {**base, "card_gb": 12.0, "step_s": 0.62, "slowdown": 1.03, "quant_streamed_fraction": 0.1, "latent_identical": True},
        {**base, "card_gb": 8.0, "step_s": 0.72, "slowdown": 1.2, "quant_streamed_gb_per_step": 3.4,
         "quant_streamed_fraction": 0.55, "device_used_peak_gb": 7.6, "latent_identical": True},
        {**base, "config": "stream-flux2", "model": "flux2", "card_gb": 16.0, "step_s": 3.0, "slowdown": 1.6,
         "quant_streamed_fraction": 0.6, "latent_identical": True},
    ]
    md = _summary(tmp_path, rows)
    assert "## DynamicVRAM streaming (issue 27)" in md and "quantized 6.20 GB of 6.60 GB, lowbit T5 2.40 GB" in md
    assert "| stream-flux1 | w4a4 | whole GPU | 0.40 | 80.00 | 0.60 | - |" in md
    assert "| stream-flux1 | w4a4 | 12 | - | - | 0.62 | 1.03 | - | 0.10 | - | - | - | yes | - |" in md
    assert "| stream-flux1 | w4a4 | 8 | - | - | 0.72 | 1.20 | 3.40 | 0.55 | - | - | 7.60 | yes | met |" in md
    assert "| stream-flux2 | flux2 | 16 | - | - | 3.00 | 1.60 | - | 0.60 | - | - | - | yes | MISSED |" in md


@pytest.mark.comfyui
@pytest.mark.skipif(not COMFY, reason="COMFYUI_PATH is not set (point it at a ComfyUI 0.29.0 checkout)")
def test_stream_step_dry_run_on_cpu(tmp_path):
    """The streaming step of the GPU run (gpu_comfyui_worker.py --stream-cards) end to end on a CPU, reduced: a lowbit
    FLUX.1 with FLUX.1's text encoders (lowbit T5, tokens fixed as where ComfyUI's vocabularies are not carried) and
    the FLUX.2-shaped model built in memory through ComfyUI's flux2 detection, each on the whole device and one card.
    ModelPatcherDynamic is forced as tests/test_comfyui_dynamic.py does; a CPU has no VBAR, so nothing streams and
    no card is emulated here (what the step measures needs the GPU)."""
    from tiny_models import write_tiny_lowbit_flux

    flux1 = write_tiny_lowbit_flux(tmp_path / "w4a4.safetensors", "svdq_w4a4", rank=16)
    res = tmp_path / "results.jsonl"
    cmd = [sys.executable, str(SCRIPTS / "gpu_comfyui_worker.py"), "--comfyui", COMFY, "--comfy-args=--cpu",
           "--config", "stream", "--models", f"w4a4={flux1},flux2=memory", "--results", str(res),
           "--latents", str(tmp_path / "latents"), "--res", "32", "--steps", "2", "--tokens", "8", "--force-dynamic-cpu",
           "--stream-cards", "8", "--stream-te", "--small"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "LOWBIT_BACKEND": "reference"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in res.read_text().splitlines()]
    assert not [r for r in rows if r.get("event") == "error"], rows
    loads = {r["model"]: r for r in rows if r.get("event") == "stream_load"}
    assert set(loads) == {"w4a4", "flux2"} and all(r["patcher"] == "LowBitModelPatcherDynamic" for r in loads.values())
    assert loads["w4a4"]["t5_layers"] == 14 and loads["w4a4"]["fixed_tokens"] is False and loads["flux2"]["layers"] == 15
    runs = [(r["model"], r["card_gb"]) for r in rows if r.get("event") == "stream"]
    assert runs == [("w4a4", None), ("w4a4", 8.0), ("flux2", None), ("flux2", 8.0)]
    assert all(r["latent_identical"] and r["step_s"] > 0 for r in rows if r.get("event") == "stream" and r["card_gb"])


@pytest.mark.comfyui
def test_fixed_tokens_stand_in_for_flux_tokenizer(comfy):
    """Where the carried ComfyUI copy has no vocabularies, the streaming step's text encoders still build and encode:
    FLUX's CLIP-L + T5 token lists of fixed tokens (77 and 512), the lowbit T5's layers quantized and wrapped."""
    import gpu_stream_models

    clip, info = gpu_stream_models.load_flux1_text_encoders(small=True, fixed_tokens=True, d_model=128)
    cond, pooled = clip.encode_from_tokens(clip.tokenize("any text"), return_pooled=True)
    assert info["fixed_tokens"] and info["t5_layers"] == 14 and type(clip.patcher).__name__.startswith("LowBit")
    assert cond.shape == (1, 512, 128) and pooled.shape == (1, 768) and torch.isfinite(cond).all()


def test_quantize_on_load_summary_renders_rows(tmp_path):
    """The quantize-on-load step's rows (issue 29) become one line per format with both targets judged."""
    rows = [{"phase": "quantize_on_load", "event": "miss", "format": "svdq_w4a4", "miss_s": 95.5, "key_s": 0.02,
             "cache_bytes": 6.65e9, "gpu_peak_gb": 9.5, "host_rss_peak_gb": 14.0},
            {"phase": "quantize_on_load", "event": "hit", "format": "svdq_w4a4", "hit_s": 3.1, "lowbit_load_s": 3.0,
             "ratio": 1.0333},
            {"phase": "quantize_on_load", "event": "miss", "format": "ternary", "miss_s": 150.0, "cache_bytes": 4.45e9},
            {"phase": "quantize_on_load", "event": "error", "format": "ternary", "error": "OutOfMemoryError: x"}]
    md = _summary(tmp_path, rows)
    assert "## Quantize on load (issue 29)" in md
    assert "| svdq_w4a4 | 95.50 | met | 6.65 | 0.02 | 9.50 | 14.00 | 3.10 | 3.00 | 1.03 | met |" in md
    assert "| ternary | 150.00 | MISSED | 4.45 | - | - | - | - | - | - | - |" in md
    assert "OutOfMemoryError" in md


@pytest.mark.comfyui
@pytest.mark.skipif(not COMFY, reason="COMFYUI_PATH is not set (point it at a ComfyUI 0.29.0 checkout)")
def test_quantize_on_load_step_dry_run_on_cpu(tmp_path):
    """gpu_quantize_on_load.py end to end on a CPU on a small built source: one miss (the node quantizes into the
    cache), then hits and plain lowbit loads of the cached file, all timed; the cache folder is removed at the end."""
    res = tmp_path / "results.jsonl"
    cmd = [sys.executable, str(SCRIPTS / "gpu_quantize_on_load.py"), "--comfyui", COMFY, "--comfy-args=--cpu",
           "--build", "128,1,1", "--source", str(tmp_path / "src.safetensors"), "--cache", str(tmp_path / "cache"),
           "--results", str(res), "--repeats", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "LOWBIT_BACKEND": "reference", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in res.read_text().splitlines()]
    assert not [r for r in rows if r.get("event") == "error"], rows
    miss = next(r for r in rows if r.get("event") == "miss")
    hit = next(r for r in rows if r.get("event") == "hit")
    setup = next(r for r in rows if r.get("event") == "qol_setup")
    assert miss["format"] == "svdq_w4a4" and miss["miss_s"] > 0 and 0 < miss["cache_bytes"] < setup["source_bytes"]
    assert len(hit["hit_all_s"]) == len(hit["lowbit_load_all_s"]) == 2 and hit["ratio"] > 0
    assert not (tmp_path / "cache").exists()
