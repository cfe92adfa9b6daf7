"""Quantize on load (issue 29), timed in-process in ComfyUI: the 'Load Diffusion Model, Quantize on Load' node on a
16-bit FLUX file, first load (a cache miss: the whole quantization on ComfyUI's device, the target being <= 2
minutes for FLUX.1-dev on an H100, data-free), then alternately a cache hit through the node and a plain lowbit
load of the cached file (the function 'Load LowBit Diffusion Model' runs), each --repeats times: the hit must be no
slower. Started by gpu_comfyui_full.py (phase quantize_on_load) on the BF16 file it builds; on a CPU for the
README's figure:

    python scripts/gpu_quantize_on_load.py --comfyui $COMFYUI_PATH --comfy-args=--cpu --build 1024,4,8 \
        --source /tmp/mid.safetensors --cache /tmp/lowbit_cache --results /tmp/qol.jsonl

--build HIDDEN,DOUBLE,SINGLE writes a seeded FLUX.1-shaped BF16 source first (flux_model.random_flux).
"""
import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
GB = 1024 ** 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", required=True)
    p.add_argument("--comfy-args", default="")
    p.add_argument("--source", required=True, help="16-bit FLUX .safetensors (written first with --build)")
    p.add_argument("--build", default=None, metavar="HIDDEN,DOUBLE,SINGLE")
    p.add_argument("--formats", default="svdq_w4a4")
    p.add_argument("--cache", required=True, help="cache folder (emptied first)")
    p.add_argument("--results", required=True, help="JSON lines file to append to")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--deadline", type=float, default=0.0, help="epoch seconds; formats not started by then are skipped")
    return p.parse_args(argv)


def write(path, **row):
    row = {"phase": "quantize_on_load", "t": round(time.time(), 3), **row}
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    print(json.dumps(row, default=str), flush=True)


def peak_rss_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2 ** 20
    return 0.0


def build(path, spec):
    import torch
    from safetensors.torch import save_file

    from comfyui_lowbit.cli.benchmark import FLUX_DEV_CONFIG
    from comfyui_lowbit.flux_model import flux_state_dict, random_flux

    hidden, double, single = (int(v) for v in spec.split(","))
    config = dict(FLUX_DEV_CONFIG, hidden_size=hidden, num_heads=hidden // 128, depth=double,
                  depth_single_blocks=single)
    model = random_flux(config, seed=0, dtype=torch.bfloat16)
    tensors = {k: v.contiguous() for k, v in flux_state_dict(model)[0].items()}
    del model
    save_file(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)
    return config


def main(argv=None):
    a = parse_args(argv)
    t_start = time.time()
    from gpu_comfyui_worker import setup_comfyui

    info = setup_comfyui(a.comfyui, a.comfy_args, False)
    import torch

    import comfy.model_management as mm
    import folder_paths

    from comfyui_lowbit.checkpoint import cache
    from comfyui_lowbit.checkpoint.cache import source_key
    from comfyui_lowbit.nodes.loaders import load_lowbit_diffusion_model
    from comfyui_lowbit.nodes.quantize_on_load import LowBitQuantizeOnLoad

    config = build(a.source, a.build) if a.build else None
    src = os.path.abspath(a.source)
    folder_paths.folder_names_and_paths["diffusion_models"] = ([os.path.dirname(src)], {".safetensors"})
    folder_paths.folder_names_and_paths["lowbit_cache"] = ([a.cache], set())
    cuda = torch.cuda.is_available() and mm.get_torch_device().type == "cuda"
    write(a.results, event="qol_setup", source_bytes=os.path.getsize(src), built=config, threads=torch.get_num_threads(),
          setup_s=time.time() - t_start, **info)

    def timed(fn):
        gc.collect()
        t = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    for fmt in [f for f in a.formats.split(",") if f]:
        if a.deadline and time.time() > a.deadline:
            write(a.results, event="skip", format=fmt, skipped="no time left")
            continue
        shutil.rmtree(a.cache, ignore_errors=True)
        os.makedirs(a.cache)
        node = LowBitQuantizeOnLoad()
        load = lambda: node.load(os.path.basename(src), fmt, 0.0, "none (data-free)")[0]  # noqa: E731
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            key, key_s = timed(lambda: source_key(src))
            model, miss_s = timed(load)
            cached = [os.path.join(a.cache, p) for p in os.listdir(a.cache) if p.endswith(".safetensors")]
            row = dict(event="miss", format=fmt, miss_s=miss_s, key_s=key_s, cache_bytes=os.path.getsize(cached[0]),
                       host_rss_peak_gb=peak_rss_gb())
            if cuda:
                row["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / GB
            write(a.results, **row)
            del model
            hits, plain = [], []
            for _ in range(a.repeats):
                cache._KNOWN.clear()  # each hit reads the source's key as a fresh ComfyUI process does
                m, s = timed(load)
                hits.append(s)
                del m
                m, s = timed(lambda: load_lowbit_diffusion_model(cached[0]))
                plain.append(s)
                del m
            write(a.results, event="hit", format=fmt, hit_s=statistics.median(hits), lowbit_load_s=statistics.median(plain),
                  hit_all_s=hits, lowbit_load_all_s=plain, ratio=statistics.median(hits) / statistics.median(plain))
        except Exception as e:  # one format failing (e.g. out of memory) is a row; the next still runs
            write(a.results, event="error", format=fmt, error=f"{type(e).__name__}: {e}"[:800])
        finally:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    shutil.rmtree(a.cache, ignore_errors=True)


if __name__ == "__main__":
    main()
