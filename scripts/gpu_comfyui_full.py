"""A full-size lowbit FLUX in a real ComfyUI on one GPU, in one time-boxed run (issue 17).

Phases, each a subprocess, results appended to OUT/results.jsonl as they come and OUT/summary.md at the end:
1. a seeded random FLUX.1-dev-shaped BF16 file (scripts/gpu_comfyui_build.py);
2. W4A4 and ternary files of the same model, built with reuse per shape (the first layer of each shape
   quantized for real and timed; the sum over all layers estimates a full quantization);
3. ComfyUI 0.29 in-process (scripts/gpu_comfyui_worker.py) per configuration: DynamicVRAM as main.py enables
   it, --disable-dynamic-vram, and a low-VRAM run of each (reserved VRAM leaves room for ~half the model):
   load time, s/step, peak VRAM at RES x RES, a rank-32 LoRA on all block linears applied / re-weighted /
   removed; latents compared across configurations;
4. quantize on load (issue 29, scripts/gpu_quantize_on_load.py): the 'Load Diffusion Model, Quantize on Load' node
   on the BF16 file, in ComfyUI on the GPU: the first load quantizes it data-free into the cache (target: <= 2
   minutes for FLUX.1-dev on an H100), then cache hits against plain lowbit loads of the cached file;
5. with the time left, `lowbit quantize --device cuda` on the BF16 file (wall time, peak host RAM; if the time
   runs out, the progress reached and the projected total).

Streaming under DynamicVRAM (issue 27), not in the default run: `--configs stream-flux1,stream-flux2` (with
`--models w4a4 --cli-quantize ''`): FLUX.1 W4A4 with a lowbit T5-XXL-shaped T5 and FLUX.2 [dev]-shaped W4A4 (built
in memory, gpu_stream_models.py), s/step with the whole GPU, then on emulated 16 / 12 / 8 GB cards
(torch.cuda.set_per_process_memory_fraction and what --reserve-vram sets), with the quantized bytes streamed per
step and the slowdown (target: <= 1.3x where half the quantized bytes stream).

    python3 scripts/gpu_comfyui_full.py --out $OUT                         # on the GPU machine, <= 8 minutes
    python3 scripts/gpu_comfyui_full.py --out /tmp/dry --small --device cpu --comfyui $COMFYUI_PATH   # dry run

ComfyUI's source and the wheels it needs come from .gpu_carry (scripts/gpu_carry.py); the wheels are installed
with pip --no-index into WORK/site when their packages do not import.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
CONFIGS = {  # name: (ComfyUI arguments, low-VRAM fraction, models)
    "dynamic": ("", 0.0, ("w4a4", "bf16", "ternary")),
    "static": ("--disable-dynamic-vram", 0.0, ("w4a4", "bf16", "ternary")),
    "lowvram-static": ("--disable-dynamic-vram", 0.5, ("w4a4", "ternary")),
    "lowvram-dynamic": ("", 0.5, ("w4a4", "bf16", "ternary")),
}
STREAM = {  # name: (emulated card sizes in GB, models, with FLUX.1's text encoders); DynamicVRAM, opt-in
    "stream-flux1": ("16,12,8", ("w4a4",), True),
    "stream-flux2": ("24,16", ("flux2",), False),
}
DEFAULT_CONFIGS = ",".join(CONFIGS)
COMPARE = (("static", "dynamic"), ("lowvram-static", "static"), ("lowvram-dynamic", "dynamic"))
NEEDED = ("comfy_aimdo", "comfy_kitchen", "torchsde")
# of the ComfyUI phase's time; the first configuration also pays for compiling and autotuning the Triton kernels
SHARES = {"dynamic": 4, "static": 3, "lowvram-static": 2, "lowvram-dynamic": 2, "stream-flux1": 4, "stream-flux2": 5}
# `lowbit quantize` with its peak resident memory printed to stderr every 2 s and at the end (it may be killed)
CLI_WRAPPER = """
import sys, threading, time
def peak():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 2**20
def report():
    while True:
        print('LOWBIT_PEAK_RSS_GB=%.3f' % peak(), file=sys.stderr, flush=True)
        time.sleep(2)
threading.Thread(target=report, daemon=True).start()
from comfyui_lowbit.cli import main
rc = main(sys.argv[1:])
print('LOWBIT_PEAK_RSS_GB=%.3f' % peak(), file=sys.stderr, flush=True)
sys.exit(rc)
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder (results.jsonl, summary.md, log.txt)")
    p.add_argument("--work", default=None, help="big files (default: /dev/shm if it has room, else the temp folder)")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or str(ROOT / ".gpu_carry" / "ComfyUI"))
    p.add_argument("--wheels", default=str(ROOT / ".gpu_carry" / "wheels"))
    p.add_argument("--budget-s", type=float, default=480, help="the whole run, all phases")
    p.add_argument("--small", action="store_true", help="hidden 256, 2 + 2 blocks (dry run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--res", type=int, default=None, help="image side (default 1024; 128 with --small)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--autotune", choices=("on", "first"), default="on",
                   help="first: each Triton kernel runs its first config, untuned (far less compiling; s/step not "
                        "representative)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"subset of {list(CONFIGS) + list(STREAM)}")
    p.add_argument("--models", default="w4a4,ternary,bf16", help="subset of w4a4, ternary, bf16 (bf16 is also the "
                                                                   "input of `lowbit quantize`)")
    p.add_argument("--cli-quantize", default="svdq_w4a4,ternary", help="formats for `lowbit quantize` with the time "
                                                                       "left ('' for none)")
    p.add_argument("--cli-reserve-s", type=float, default=45, help="time kept for `lowbit quantize` (a partial run "
                                                                      "still gives a projected total)")
    p.add_argument("--quantize-on-load", default="svdq_w4a4", help="formats for the quantize-on-load step ('' for none)")
    p.add_argument("--qol-reserve-s", type=float, default=200, help="time kept for the quantize-on-load step")
    p.add_argument("--quant-options", default="{}", help="JSON quantizer options for phase 2 (dry runs: '{\"iters\": 1}')")
    return p.parse_args(argv)


class Run:
    def __init__(self, a):
        self.a = a
        self.t0 = time.time()
        self.deadline = self.t0 + a.budget_s
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = self.out / "results.jsonl"
        self.log = open(self.out / "log.txt", "a")
        self.work = Path(a.work or default_work(a.small))
        self.work.mkdir(parents=True, exist_ok=True)
        self.pkg = Path(tempfile.mkdtemp(prefix="lowbit-pkg-"))
        (self.pkg / "comfyui_lowbit").symlink_to(ROOT, target_is_directory=True)
        self.pythonpath = [str(self.pkg), str(self.work / "site")]

    def left(self) -> float:
        return self.deadline - time.time()

    def write(self, **row):
        row = {"t_run_s": round(time.time() - self.t0, 2), **row}
        with open(self.results, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(json.dumps(row, default=str), flush=True)

    def env(self) -> dict:
        return {**os.environ, "PYTHONPATH": os.pathsep.join(self.pythonpath + [os.environ.get("PYTHONPATH", "")]),
                "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "TRITON_CACHE_AUTOTUNING": "1"}

    def run(self, name, cmd, timeout, env=None):
        """(returncode, or None if killed at the timeout; stdout text; seconds)."""
        self.log.write(f"\n=== {name}: {' '.join(map(str, cmd))}\n")
        self.log.flush()
        t = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=self.log, env=env or self.env(),
                                cwd=str(ROOT), text=True, start_new_session=True)
        rc = None
        try:
            text, _ = proc.communicate(timeout=max(1.0, timeout))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            text, _ = proc.communicate()
        self.log.write(text[-20000:])
        self.log.flush()
        return rc, text, time.perf_counter() - t


def default_work(small: bool) -> str:
    need = 2e9 if small else 45e9
    if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > need + 60e9:
        return "/dev/shm/lowbit-gpu-run"
    return os.path.join(tempfile.gettempdir(), "lowbit-gpu-run")


def phase_env(r: Run):
    code = ("import json, torch, sys; d = {'python': sys.version.split()[0], 'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "
            "'gpu_mem_gb': torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None}\n"
            "try:\n import triton; d['triton'] = triton.__version__\nexcept Exception as e: d['triton'] = repr(e)\n"
            "print(json.dumps(d))")
    rc, text, _ = r.run("env", [sys.executable, "-c", code], 120)
    info = json.loads(text.strip().splitlines()[-1]) if rc == 0 else {"error": text[-500:]}
    version = Path(r.a.comfyui, "comfyui_version.py")
    info["comfyui"] = re.findall(r'"([^"]+)"', version.read_text())[0] if version.is_file() else None
    r.write(phase="env", work=str(r.work), comfyui_path=r.a.comfyui, budget_s=r.a.budget_s, small=r.a.small, **info)
    return info


def phase_deps(r: Run):
    check = [sys.executable, "-c", "import " + ", ".join(NEEDED)]
    rc, _, _ = r.run("deps-check", check, 120)
    installed = []
    if rc != 0 and Path(r.a.wheels).is_dir():
        wheels = sorted(str(w) for w in Path(r.a.wheels).glob("*.whl"))
        r.run("deps-install", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--upgrade", "--target", str(r.work / "site"), *wheels], 300)
        installed = [Path(w).name for w in wheels]
        rc, _, _ = r.run("deps-check", check, 120)
    r.write(phase="deps", ok=rc == 0, installed=installed)
    if rc != 0:
        raise SystemExit(f"{NEEDED} do not import (see log.txt); prepare {r.a.wheels} with scripts/gpu_carry.py")


def build(r: Run, what: str, path: Path, reserve: float):
    cmd = [sys.executable, HERE / "gpu_comfyui_build.py", what, path, "--device", r.a.device]
    if r.a.small:
        cmd.append("--small")
    if what != "bf16":
        cmd += ["--options", r.a.quant_options]
    rc, text, secs = r.run(f"build {what}", cmd, r.left() - reserve)
    if rc != 0:
        r.write(phase="build", what=what, ok=False, returncode=rc, seconds=secs, tail=text[-1500:])
        raise SystemExit(f"building {what} failed (see log.txt)")
    res = json.loads(text.strip().splitlines()[-1])
    r.write(phase="build", ok=True, seconds=secs, **res)
    return res


def phase_comfy(r: Run, files: dict, reserve: float):
    names = [c for c in r.a.configs.split(",") if c]
    latents = r.work / "latents"
    shutil.rmtree(latents, ignore_errors=True)
    res = r.a.res or (128 if r.a.small else 1024)
    for i, name in enumerate(names):
        stream = STREAM.get(name)
        comfy_args, fraction, models = ("", 0.0, stream[1]) if stream else CONFIGS[name]
        share = (r.left() - reserve) * SHARES[name] / sum(SHARES[n] for n in names[i:])
        if share < 20:
            r.write(phase="comfyui", config=name, skipped="no time left")
            continue
        paths = {m: files.get(m, "memory" if m == "flux2" else None) for m in models}
        if not any(paths.values()):
            r.write(phase="comfyui", config=name, skipped=f"none of its models {list(models)} was built (--models)")
            continue
        args = comfy_args.split()
        if r.a.device == "cpu":
            args.append("--cpu")
        cmd = [sys.executable, HERE / "gpu_comfyui_worker.py", "--comfyui", r.a.comfyui, f"--comfy-args={' '.join(args)}",
               "--config", name, "--models", ",".join(f"{m}={p}" for m, p in paths.items() if p),
               "--results", r.results, "--latents", latents, "--res", res, "--steps", r.a.steps,
               "--lora-rank", r.a.lora_rank, "--lowvram-fraction", fraction, "--tokens", 32 if r.a.small else 512, "--deadline", time.time() + 0.6 * share]
        if r.a.autotune == "first":
            cmd.append("--autotune-first")
        if stream:
            cmd += ["--stream-cards", stream[0]] + (["--stream-te"] if stream[2] else []) + (["--small"] if r.a.small else [])
        if r.a.device == "cpu" and not comfy_args:
            cmd.append("--force-dynamic-cpu")  # ComfyUI enables DynamicVRAM on NVIDIA only
        rc, text, secs = r.run(f"comfyui {name}", cmd, share)
        r.write(phase="comfyui", config=name, returncode=rc, seconds=secs, killed_at_timeout=rc is None)
    compare_latents(r, latents)


def compare_latents(r: Run, folder: Path):
    import torch

    found = {}
    for f in folder.glob("*.pt"):
        config, model, kind = f.stem.split("__")
        found[(config, model, kind)] = f
    for a, b in COMPARE:
        for (config, model, kind), f in sorted(found.items()):
            if config != a or (b, model, kind) not in found:
                continue
            x, y = torch.load(f), torch.load(found[(b, model, kind)])
            r.write(phase="compare", a=a, b=b, model=model, kind=kind, identical=bool(torch.equal(x, y)),
                    max_abs=float((x - y).abs().max()), rel_l2=float((x - y).norm() / y.norm().clamp_min(1e-12)))


def phase_quantize_on_load(r: Run, bf16: Path, formats: str, reserve: float):
    """The quantize-on-load node on the BF16 file in ComfyUI on the GPU (gpu_quantize_on_load.py): rows appended to
    results.jsonl by the step itself."""
    left = r.left() - reserve
    if left < 30:
        r.write(phase="quantize_on_load", skipped="no time left")
        return
    args = "--cpu" if r.a.device == "cpu" else ""
    cmd = [sys.executable, HERE / "gpu_quantize_on_load.py", "--comfyui", r.a.comfyui, f"--comfy-args={args}",
           "--source", bf16, "--formats", formats, "--cache", r.work / "lowbit_cache", "--results", r.results,
           "--repeats", 1 if r.a.small else 3, "--deadline", time.time() + 0.8 * left]
    rc, text, secs = r.run("quantize on load", cmd, left)
    r.write(phase="quantize_on_load", event="end", returncode=rc, seconds=secs, killed_at_timeout=rc is None)


def phase_cli_quantize(r: Run, bf16: Path, formats):
    for fmt in formats:
        left = r.left() - 5
        if left < 15:
            r.write(phase="cli_quantize", format=fmt, skipped="no time left")
            continue
        dst = r.work / f"cli-{fmt}.safetensors"
        cmd = [sys.executable, "-c", CLI_WRAPPER, "quantize", bf16, dst, "--format", fmt, "--device", r.a.device, "--force"]
        env = {k: v for k, v in r.env().items() if k != "TQDM_DISABLE"}
        rc, text, secs = r.run(f"lowbit quantize {fmt}", cmd, left, env=env)
        row = dict(phase="cli_quantize", format=fmt, returncode=rc, seconds=secs, finished=rc == 0)
        row.update(progress_from_log(r.out / "log.txt"))
        if rc == 0:
            row["output_bytes"] = dst.stat().st_size
            row["summary"] = text.strip().splitlines()[-1] if text.strip() else ""
        elif rc is None and row.get("done"):
            row["projected_total_s"] = secs * row["total"] / row["done"]
        r.write(**row)
        if dst.exists():
            dst.unlink()


def progress_from_log(log: Path) -> dict:
    """Last tqdm 'done/total' and the peak RSS line that lowbit quantize's wrapper printed, from log.txt."""
    text = log.read_text(errors="replace")[-200000:]
    text = text[text.rfind("=== lowbit quantize"):]
    m = re.findall(r"(\d+)/(\d+) \[", text)
    out = {"done": int(m[-1][0]), "total": int(m[-1][1])} if m else {}
    rss = re.findall(r"LOWBIT_PEAK_RSS_GB=([\d.]+)", text)
    if rss:
        out["host_rss_peak_gb"] = float(rss[-1])
    return out


def cap_file(path: Path, limit: int):
    """Keep the first and last limit/2 bytes of a file that grew past `limit`."""
    if path.stat().st_size <= limit:
        return
    data = path.read_bytes()
    path.write_bytes(data[: limit // 2] + b"\n[... %d bytes cut ...]\n" % (len(data) - limit) + data[-limit // 2:])


def main(argv=None):
    a = parse_args(argv)
    r = Run(a)
    try:
        phase_env(r)
        phase_deps(r)
        tail = 90 if not a.small else 10  # kept for the ComfyUI phase
        models = [m for m in a.models.split(",") if m]
        files = {}
        for key, fmt in (("bf16", "bf16"), ("w4a4", "svdq_w4a4"), ("ternary", "ternary")):
            if key in models or key == "bf16" and (a.cli_quantize or a.quantize_on_load):
                files[key] = r.work / f"flux1-dev-random-{fmt}.safetensors"
                build(r, fmt, files[key], tail)
        qol_reserve = a.qol_reserve_s if a.quantize_on_load else 0.0
        cli_reserve = a.cli_reserve_s if a.cli_quantize else 0.0
        phase_comfy(r, {k: v for k, v in files.items() if k in models}, cli_reserve + qol_reserve)
        if a.quantize_on_load:
            phase_quantize_on_load(r, files["bf16"], a.quantize_on_load, cli_reserve)
        if a.cli_quantize:
            phase_cli_quantize(r, files["bf16"], [f for f in a.cli_quantize.split(",") if f])
    finally:
        r.write(phase="end", wall_s=time.time() - r.t0)
        r.log.close()
        cap_file(r.out / "log.txt", 12 * 2 ** 20)  # the device tool brings back files up to 16 MiB
        sys.path.insert(0, str(HERE))
        from gpu_comfyui_summary import write_summary

        write_summary(r.results, r.out / "summary.md")
        shutil.rmtree(r.pkg, ignore_errors=True)


if __name__ == "__main__":
    main()
