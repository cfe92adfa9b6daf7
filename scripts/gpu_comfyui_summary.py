"""summary.md from the results.jsonl of gpu_comfyui_full.py: environment, files, ComfyUI timings and VRAM,
LoRA timings, latent comparisons, `lowbit quantize`, errors, and what was approximated.

    python3 scripts/gpu_comfyui_summary.py OUT/results.jsonl OUT/summary.md
"""
import json
import sys


def _f(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return out


APPROXIMATED = [
    "Weights are seeded random (flux_model.random_flux), not FLUX.1-dev's: speed, memory and LoRA timings are "
    "those of the real shapes, latents are meaningless (they are only compared with each other).",
    "The W4A4 / ternary files ComfyUI loads are built with reuse per shape: the first layer of each shape is "
    "quantized for real, later layers hold copies (same sizes, same kernels). Full-model quantization time is "
    "the per-shape times summed over all layers (an estimate) unless the `lowbit quantize` row finished.",
    "No text encoders or VAE: conditioning is seeded random at T5-XXL / CLIP-L widths (512 tokens); the timings "
    "are the diffusion model's (KSampler-equivalent comfy.sample.sample, euler, cfg 1, FLUX guidance 3.5).",
    "Low-VRAM: ComfyUI's reserved VRAM (the value --reserve-vram sets) is set in-process once the model size "
    "and ComfyUI's memory estimate are known, so that about half the model fits.",
]


STREAM_TARGET = 1.3  # issue 27: s/step at most 1.3x the whole-GPU run where half the quantized bytes stream


def stream_section(rows) -> list:
    """DynamicVRAM streaming (gpu_comfyui_worker.py --stream-cards): one line per model and emulated card."""
    loads = {(r["config"], r["model"]): r for r in rows if r.get("event") == "stream_load"}
    runs = [r for r in rows if r.get("event") == "stream"]
    if not runs:
        return []
    md = ["## DynamicVRAM streaming (issue 27)", ""]
    for (c, m), ld in loads.items():
        md.append(f"- {c} / {m}: {ld.get('patcher')}, quantized {_f(ld.get('quantized_gb'))} GB of {_f(ld.get('model_size_gb'))} GB"
                  + (f", lowbit T5 {_f(ld.get('t5_quantized_gb'))} GB" if ld.get("t5_quantized_gb") else "")
                  + f", built in {_f(ld.get('build_s'))} s")
    md.append("")
    table = []
    for r in runs:
        frac, slow = r.get("quant_streamed_fraction"), r.get("slowdown")
        verdict = "-"
        if slow is not None and frac is not None and frac >= 0.5:
            verdict = "met" if slow <= STREAM_TARGET else "MISSED"
        table.append([r["config"], r["model"], "whole GPU" if r.get("card_gb") is None else _f(r["card_gb"], 0),
                      r.get("te_encode_s"), r.get("first_step_s"), r.get("step_s"), slow,
                      r.get("quant_streamed_gb_per_step"), frac, r.get("quant_cast_buffer_per_step"),
                      r.get("other_streamed_gb_per_step"), r.get("device_used_peak_gb"), r.get("latent_identical"), verdict])
    md += _table(["config", "model", "card GB", "T5 encode s", "1st step s", "s/step", "x whole GPU",
                  "quantized GB streamed/step", "fraction of quantized", "cast-buffer layers/step",
                  "16-bit GB streamed/step", "device peak GB", "latent = whole GPU", f"<= {STREAM_TARGET}x at >= half"], table)
    md += ["", "Cards emulated on the one GPU: torch.cuda.set_per_process_memory_fraction(card / total) plus what "
               "--reserve-vram sets (ComfyUI's reserved VRAM, comfy-aimdo's headroom) for the rest; streamed bytes are "
               "the VBAR casts that were not resident (comfy.ops.resolve_cast_module_with_vbar), cast-buffer layers the "
               "ones that found no room in the VBAR. FLUX.2 [dev]-shaped: random tensors shared per shape (sizes, "
               "transfers and kernel work are real, outputs are not).", ""]
    return md


QOL_TARGET_S = 120  # issue 29: quantize-on-load of FLUX.1-dev data-free on an H100


def quantize_on_load_section(rows) -> list:
    """Quantize on load (gpu_quantize_on_load.py): the first load (cache miss) and cache hits vs lowbit loads."""
    rows = [r for r in rows if r.get("phase") == "quantize_on_load" and r.get("format")]
    misses = {r["format"]: r for r in rows if r.get("event") == "miss"}
    hits = {r["format"]: r for r in rows if r.get("event") == "hit"}
    if not misses:
        return []
    table = []
    for fmt, m in misses.items():
        h = hits.get(fmt, {})
        ratio = h.get("ratio")
        table.append([fmt, m.get("miss_s"), "met" if m.get("miss_s", 1e9) <= QOL_TARGET_S else "MISSED",
                      (m.get("cache_bytes") or 0) / 1e9, m.get("key_s"), m.get("gpu_peak_gb"), m.get("host_rss_peak_gb"),
                      h.get("hit_s"), h.get("lowbit_load_s"), ratio,
                      "-" if ratio is None else ("met" if ratio <= 1.05 else "MISSED")])
    return ["## Quantize on load (issue 29)", ""] + _table(
        ["format", "first load s (quantize + load)", f"<= {QOL_TARGET_S} s", "cache file GB", "source key s",
         "GPU peak GB", "host RSS peak GB", "cache hit s", "lowbit load s", "hit / lowbit", "hit no slower"], table) + [
        "", "First load: the node on the BF16 file, data-free, quantizing on the GPU into the cache and loading the "
            "result; cache hit: the node again (source key, lookup, load); lowbit load: the cached file through the "
            "function Load LowBit Diffusion Model runs (medians; 'no slower' allows 5% of timing noise).", ""]


def write_summary(results_path, out_path):
    rows = [json.loads(line) for line in open(results_path) if line.strip()]
    md = ["# comfyui-lowbit: full-size FLUX in ComfyUI (scripts/gpu_comfyui_full.py)", ""]
    env = next((r for r in rows if r.get("phase") == "env"), {})
    md += [f"GPU: {env.get('gpu')} ({_f(env.get('gpu_mem_gb'), 1)} GiB); torch {env.get('torch')} (CUDA {env.get('cuda')}), "
           f"triton {env.get('triton')}, Python {env.get('python')}, ComfyUI {env.get('comfyui')}; "
           f"{'reduced model (dry run)' if env.get('small') else 'FLUX.1-dev shapes'}; budget {env.get('budget_s')} s.", ""]
    builds = [r for r in rows if r.get("phase") == "build"]
    if builds:
        md += ["## Files", ""]
        md += _table(["file", "GB", "build s", "save s", "host RSS peak GB", "est. full quantize s"],
                     [[r.get("what"), (r.get("bytes") or 0) / 1e9, r.get("build_s"), r.get("save_s"),
                       r.get("host_rss_peak_gb"), r.get("est_full_quantize_s")] for r in builds])
        for r in builds:
            if r.get("per_shape_s"):
                md += ["", f"{r['what']} per-shape quantize s (GPU) / host prep s: " + ", ".join(
                    f"{k} {v} / {r['per_shape_host_s'].get(k)}" for k, v in r["per_shape_s"].items())]
        md.append("")
    setups = {r["config"]: r for r in rows if r.get("event") == "setup"}
    samples = {(r["config"], r["model"]): r for r in rows if r.get("event") == "sample"}
    loads = {(r["config"], r["model"]): r for r in rows if r.get("event") == "load"}
    warm = {(r["config"], r["model"]): r for r in rows if r.get("event") == "warmup"}
    if loads:
        md += ["## ComfyUI: load, sampling, VRAM", ""]
        md += [f"- {c}: DynamicVRAM {s.get('dynamic_vram')}, args `{s.get('comfy_args')}`, import {_f(s.get('import_s'))} s"
               for c, s in setups.items()] + [""]
        table = []
        for key, ld in loads.items():
            s, w = samples.get(key, {}), warm.get(key, {})
            table.append([key[0], key[1], ld.get("patcher"), ld.get("model_size_gb"), ld.get("file_s"), ld.get("to_device_s"),
                          w.get("first_step_s"), s.get("step_s"), s.get("transformer_vram_gb"), s.get("torch_peak_gb"),
                          s.get("lowvram", ld.get("lowvram")), ld.get("reserve_vram_gb")])
        md += _table(["config", "model", "patcher", "model GB", "file s", "to GPU s", "1st step s", "s/step",
                      "peak VRAM GB (device)", "torch peak GB", "partial", "reserved GB"], table) + [""]
    loras = [r for r in rows if r.get("event") == "lora"]
    if loras:
        md += ["## LoRA (rank %s, all block linears)" % loras[0].get("rank"), ""]
        md += _table(["config", "model", "map s", "apply s", "s/step with LoRA", "strength s", "remove s",
                      "removal bit-identical", "packed weights unmoved", "LoRA effect"],
                     [[r["config"], r["model"], r["apply"]["map_s"], r["apply"]["load_s"], r["apply"]["step_s"],
                       r["strength"]["map_s"] + r["strength"]["load_s"], r.get("remove_load_s"), r.get("removal_bit_identical"),
                       r.get("packed_weights_unmoved"), r.get("lora_effect_rel")] for r in loras])
        md += ["", "apply / strength: ComfyUI's key mapping (map) plus the load that composes the branches; "
                   "LoRA effect: relative change of the latent."] + [""]
    md += stream_section(rows)
    md += quantize_on_load_section(rows)
    comps = [r for r in rows if r.get("phase") == "compare"]
    if comps:
        md += ["## Latents across configurations", ""]
        md += _table(["a", "b", "model", "latent", "identical", "max abs diff", "rel L2"],
                     [[r["a"], r["b"], r["model"], r["kind"], r["identical"], r["max_abs"], r["rel_l2"]] for r in comps]) + [""]
    cli = [r for r in rows if r.get("phase") == "cli_quantize"]
    if cli:
        md += ["## `lowbit quantize` of the BF16 file", ""]
        md += _table(["format", "finished", "seconds", "layers done", "projected total s", "host RSS peak GB", "output GB"],
                     [[r["format"], r.get("finished"), r.get("seconds"), f"{r.get('done', '-')}/{r.get('total', '-')}",
                       r.get("projected_total_s"), r.get("host_rss_peak_gb"), (r.get("output_bytes") or 0) / 1e9 or None]
                      for r in cli]) + [""]
    errors = [r for r in rows if r.get("event") == "error" or r.get("ok") is False or r.get("killed_at_timeout")
              or r.get("skipped")]
    if errors:
        md += ["## Errors, timeouts, skips", ""]
        md += [f"- {r.get('config', r.get('phase'))} {r.get('model', r.get('what', r.get('format', '')))}: "
               f"{r.get('error') or r.get('skipped') or ('killed at its time limit' if r.get('killed_at_timeout') else r.get('tail', ''))}"[:600]
               for r in errors] + [""]
    notes = list(APPROXIMATED)
    if any(s.get("dynamic_vram") == "forced on cpu" for s in setups.values()):
        notes.append("CPU dry run: ModelPatcherDynamic forced on a CPU has no VBAR, so ComfyUI applies no LoRA to "
                     "its 16-bit layers there (bf16 LoRA effect 0, bf16 LoRA latents differ from static); on a GPU it does. "
                     "Nothing streams there either (no cards emulated): the streaming rows only test the script.")
    md += ["## Approximated", ""] + [f"- {x}" for x in notes] + [""]
    with open(out_path, "w") as f:
        f.write("\n".join(md))


if __name__ == "__main__":
    write_summary(sys.argv[1], sys.argv[2])
