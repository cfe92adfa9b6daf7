"""`lowbit demo`: quantize a small seeded FLUX-shaped transformer and compare it with BF16 - no downloads.

The model has FLUX's structure (double and single blocks, head dim 128, RoPE, modulation) at a small width,
heavy-tailed weights and a few large residual-stream channels (the "massive activations" of real DiTs).
Each format is quantized in memory (flux_model.quantize_flux: blocks in the format, modulation
W4A16, embedders and final layer BF16) and run once through the kernels (Triton on a GPU, the PyTorch
reference on CPU). `--comfyui PATH` additionally runs a shipped workflow headless (see run_workflow_headless).
"""
import contextlib
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .args import device

DEMO_CONFIG = dict(in_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=512, mlp_ratio=4.0, num_heads=4,
                   depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, guidance_embed=True)
TINY_CONFIG = dict(DEMO_CONFIG, context_in_dim=256, hidden_size=256, num_heads=2, depth=1, depth_single_blocks=2)
# (label, block format, rank, quantizer options); the rank-0 rows show what the low-rank branch buys
VARIANTS = (("BF16", None, 0, {}),
            ("W4A4 r32", "svdq_w4a4", 32, {"iters": 3}),
            ("W4A4 r0 (no low-rank)", "svdq_w4a4", 0, {}),
            ("ternary r64", "ternary", 64, {"iters": 3}),
            ("ternary r0 (no low-rank)", "ternary", 0, {}))
PACK_DIR = Path(__file__).resolve().parent.parent
DEFAULT_WORKFLOW = "flux1-dev-lowbit-w4a4.json"


def _forward_ms(model, inputs, device, runs):
    from .benchmark import time_ms

    # on CPU the error forward just before is the warm-up
    return time_ms(lambda: model(**inputs), device, warmup=1 if device.type == "cuda" else 0, runs=runs)[0]


@contextlib.contextmanager
def _one_cpu_thread(device):
    """One CPU thread while quantizing and timing: the SVDs and matmuls are small, and several threads slow down
    by 10-100x when the cores are shared with other work (timings of one run then varied 10x between runs)."""
    n = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


CALIBRATED = ("W4A4 r32 calibrated", "svdq_w4a4", 32, {"iters": 3, "alphas": (0.25, 0.5, 0.75), "search_iters": 1})


def input_absmax(model, inputs) -> dict:
    """{layer: per-input-channel absmax (float32)} of the block linears over one forward on `inputs`
    (what the ComfyUI calibration node records over real prompts)."""
    from ..checkpoint.flux import layer_format

    stats, hooks = {}, []

    def hook(name):
        def pre(module, args):
            a = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(dim=0)
            stats[name] = torch.maximum(stats[name], a) if name in stats else a
        return pre

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and layer_format(name, "svdq_w4a4") == "svdq_w4a4":
            hooks.append(m.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return stats


def run_demo(tiny=False, device=None, seed=0, runs=None, log=print, calibrate=False) -> dict:
    """Returns {"config", "device", "backend", "tokens", "rows": [{label, format, rank, weight_bytes,
    size_ratio, rel_error, ms, quantize_s}]}; rel_error is the relative L2 error of the transformer output
    against the BF16 model on the same inputs."""
    from .. import kernels
    from ..flux_model import make_inputs, quantize_flux, random_flux, weight_bytes

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    runs = runs or (5 if device.type == "cuda" else 3)
    cfg = TINY_CONFIG if tiny else DEMO_CONFIG
    hw, txt = ((8, 8), 16) if tiny else ((16, 16), 64)
    base = random_flux(cfg, seed=seed, dtype=torch.bfloat16, device=device)
    inputs = make_inputs(cfg, height=hw[0], width=hw[1], txt_len=txt, seed=seed + 1, device=device)
    with torch.no_grad():
        ref = base(**inputs).float()
    variants = [(*v, None) for v in VARIANTS]
    if calibrate:  # smoothing from activation statistics, collected on other inputs than the evaluation's
        cal_inputs = make_inputs(cfg, height=hw[0], width=hw[1], txt_len=txt, seed=seed + 2, device=device)
        variants.insert(2, (*CALIBRATED, input_absmax(base, cal_inputs)))
    rows = []
    for label, fmt, rank, opts, absmax in variants:
        with _one_cpu_thread(device):
            t0 = time.time()
            model = base if fmt is None else quantize_flux(copy.deepcopy(base), fmt, rank=rank, act_absmax=absmax, **opts)
            qs = time.time() - t0
            with torch.no_grad():
                out = model(**inputs).float()
            ms = _forward_ms(model, inputs, device, runs)
        err = ((out - ref).norm() / ref.norm()).item()
        row = dict(label=label, format=fmt or "bf16", rank=rank, weight_bytes=weight_bytes(model),
                   rel_error=err, ms=ms, quantize_s=None if fmt is None else qs)
        rows.append(row)
        log(f"  {label:26s} error {err:.4f}  {row['ms']:.1f} ms/forward" + (f"  (quantized in {qs:.1f} s)" if fmt else ""))
        if model is not base:
            del model
    for r in rows:
        r["size_ratio"] = rows[0]["weight_bytes"] / r["weight_bytes"]
    where = "cpu, 1 thread" if device.type == "cpu" else str(device)
    return {"config": cfg, "device": where, "backend": kernels.backend_for(device).__name__.rsplit(".", 1)[-1],
            "tokens": (hw[0] * hw[1], txt), "rows": rows}


def format_table(result: dict) -> str:
    c = result["config"]
    head = (f"FLUX-shaped transformer: hidden {c['hidden_size']}, {c['depth']} double + {c['depth_single_blocks']} "
            f"single blocks, seeded random weights; {result['tokens'][0]} image + {result['tokens'][1]} text tokens; "
            f"{result['device']}, kernels: {result['backend']}")
    lines = [head, "", "| format | weights MB | smaller than BF16 | output error vs BF16 (rel. L2) | ms / forward |",
             "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['label']} | {r['weight_bytes'] / 1e6:.2f} | {r['size_ratio']:.2f}x | {r['rel_error']:.4f} | "
                     f"{r['ms']:.1f} |")
    calibrated = any(r["label"] == CALIBRATED[0] for r in result["rows"])
    lines += ["", "Blocks are quantized (modulation layers W4A16); embedders and the final layer stay BF16. "
                  + ("Data-free quantization except the calibrated row (SVDQuant smoothing from input statistics of "
                     "one forward on other inputs)" if calibrated else "Data-free quantization (no calibration)")
                  + "; errors are for random weights, not a trained model."]
    return "\n".join(lines) + "\n"


# where ComfyUI installs keep their Python: a venv inside the checkout, or the Windows portable build's
# python_embeded next to it
PYTHON_CANDIDATES = ("venv/bin/python", ".venv/bin/python", "venv/Scripts/python.exe", ".venv/Scripts/python.exe",
                     "../python_embeded/python.exe", "python_embeded/python.exe")
# what the headless run imports in that Python: pytest, and a few of ComfyUI's own requirements
NEEDED_MODULES = ("pytest", "torch", "safetensors", "aiohttp", "yaml", "PIL", "einops")


def _missing_modules(python: str) -> list:
    code = "import importlib.util as u, sys; print(','.join(m for m in sys.argv[1:] if u.find_spec(m) is None))"
    try:
        out = subprocess.run([python, "-c", code, *NEEDED_MODULES], capture_output=True, text=True, timeout=120)
    except OSError as e:
        raise ValueError(f"{python}: cannot run it ({e.strerror or e}); pass --comfyui-python PYTHON") from None
    if out.returncode != 0:
        raise ValueError(f"{python}: not a working Python (exit code {out.returncode}); pass --comfyui-python PYTHON")
    return [m for m in out.stdout.strip().split(",") if m]


def find_comfyui_python(comfyui_path: str, python: str | None = None) -> str:
    """The Python to run ComfyUI headless with: `python` if given, else the checkout's venv / .venv /
    python_embeded, else this one if it has ComfyUI's requirements; one-line errors saying what to pass."""
    if python:
        candidates, where = [python], "--comfyui-python"
    else:
        found = [os.path.normpath(os.path.join(comfyui_path, c)) for c in PYTHON_CANDIDATES]
        candidates = [c for c in found if os.path.isfile(c)] or [sys.executable]
        where = f"found in {comfyui_path}" if candidates[0] != sys.executable else \
            f"this Python: no venv, .venv or python_embeded in {comfyui_path}"
    chosen = candidates[0]
    if not os.path.isfile(chosen) and not shutil.which(chosen):
        raise FileNotFoundError(f"--comfyui-python {chosen}: no such program")
    missing = _missing_modules(chosen)
    if missing:
        hint = f"install them with `{chosen} -m pip install {' '.join(missing)}`" if missing == ["pytest"] else \
            "pass the Python that runs your ComfyUI with --comfyui-python PYTHON"
        raise ValueError(f"{chosen} ({where}) lacks {', '.join(missing)} for the headless ComfyUI run; {hint}")
    return chosen


def _importable_pack() -> tuple[str, tempfile.TemporaryDirectory | None]:
    """A folder to put on PYTHONPATH so that `import comfyui_lowbit` finds this pack (a git checkout is
    usually named comfyui-lowbit, which is not importable): the parent, or a temporary folder with a link."""
    if PACK_DIR.name == "comfyui_lowbit":
        return str(PACK_DIR.parent), None
    tmp = tempfile.TemporaryDirectory(prefix="lowbit-demo-")
    try:
        os.symlink(PACK_DIR, os.path.join(tmp.name, "comfyui_lowbit"), target_is_directory=True)
    except OSError as e:
        tmp.cleanup()
        raise OSError(f"cannot link {PACK_DIR} as comfyui_lowbit for the headless run ({e.strerror or e}); "
                      f"rename the pack folder to comfyui_lowbit") from None
    return tmp.name, tmp


def _failure_line(log: str) -> str:
    """The most telling line of a failed pytest run: its last `E ` line, else its last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    return (errors or lines or ["no output"])[-1]


def check_headless(comfyui_path, workflow_json=DEFAULT_WORKFLOW, python=None) -> tuple[str, str]:
    """(ComfyUI folder, Python) for run_workflow_headless, checked before any work: one-line errors."""
    comfyui_path = os.path.abspath(os.path.expanduser(str(comfyui_path)))
    if not os.path.isfile(os.path.join(comfyui_path, "main.py")):
        raise FileNotFoundError(f"{comfyui_path}: not a ComfyUI checkout (no main.py)")
    test = PACK_DIR / "tests" / "test_workflows.py"
    if not test.is_file():
        raise FileNotFoundError(f"{test}: the headless workflow runner is not available in this install "
                                "(it ships with the pack's git checkout)")
    if not (PACK_DIR / "workflows" / workflow_json).is_file():
        raise FileNotFoundError(f"{PACK_DIR / 'workflows' / workflow_json}: no such shipped workflow")
    return comfyui_path, find_comfyui_python(comfyui_path, python)


def run_workflow_headless(comfyui_path, workflow_json=DEFAULT_WORKFLOW, python=None, timeout=1800) -> int:
    """Run one shipped workflow (workflows/<workflow_json>) headless through the ComfyUI checkout at
    `comfyui_path` (`main.py --cpu` on a free loopback port), on tiny stand-in models written to a temp
    folder under the file names the workflow expects (no downloads), and check its saved image.

    This drives the pack's own headless workflow test (tests/test_workflows.py), so it needs the pack's
    tests/ folder (a git checkout) and a Python with ComfyUI's requirements and pytest (`python`, default:
    find_comfyui_python). Returns 0 when the workflow ran and saved its image; a failure raises one line
    with the reason and the path of the full log."""
    comfyui_path, python = check_headless(comfyui_path, workflow_json, python)
    test = PACK_DIR / "tests" / "test_workflows.py"
    pythonpath, link = _importable_pack()
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{test}::test_workflow_runs[{workflow_json}]"]
    env = dict(os.environ, COMFYUI_PATH=comfyui_path,
               PYTHONPATH=os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH")) if p))
    try:
        run = subprocess.run(cmd, cwd=PACK_DIR, env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        raise ValueError(f"the headless ComfyUI run of {workflow_json} did not finish in {timeout} s") from None
    finally:
        if link is not None:
            link.cleanup()
    if run.returncode != 0:
        log = run.stdout + run.stderr
        with tempfile.NamedTemporaryFile("w", prefix="lowbit-demo-comfyui-", suffix=".log", delete=False) as f:
            f.write(log)
        raise ValueError(f"the headless ComfyUI run of {workflow_json} with {python} failed: {_failure_line(log)} "
                         f"(full log: {f.name})")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="quantize a small seeded FLUX-shaped model to W4A4 and ternary and compare with BF16",
                       description="Builds a small seeded FLUX-shaped transformer (no downloads), quantizes it to "
                                   "SVDQuant W4A4 and ternary (with and without the low-rank branch), runs one forward "
                                   "through the kernels and prints size, output error and time per format.")
    p.add_argument("--tiny", action="store_true", help="an even smaller model (hidden 256, 1+2 blocks, 80 tokens): seconds")
    p.add_argument("--device", type=device, default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=None,
                   help="timed forwards per format, median reported (default 5 on a GPU, 3 on CPU)")
    p.add_argument("--calibrate", action="store_true",
                   help="add a W4A4 row quantized with smoothing from activation statistics (slower)")
    p.add_argument("--comfyui", metavar="PATH", default=None,
                   help="also run a shipped workflow headless through the ComfyUI checkout at PATH, on tiny "
                        "stand-in models (needs the pack's tests/ folder, pytest and ComfyUI's requirements)")
    p.add_argument("--workflow", default=None, help=f"workflow for --comfyui (default {DEFAULT_WORKFLOW})")
    p.add_argument("--comfyui-python", default=None,
                   help="Python with ComfyUI's requirements and pytest (default: PATH's venv, .venv or python_embeded, "
                        "else this one)")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.runs is not None and args.runs < 1:
        raise ValueError(f"--runs must be >= 1, got {args.runs}")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    given = [flag for flag, v in (("--workflow", args.workflow), ("--comfyui-python", args.comfyui_python)) if v]
    if given and not args.comfyui:
        raise ValueError(f"{' and '.join(given)} only choose{'s' if len(given) == 1 else ''} what the headless ComfyUI "
                         f"run uses; add --comfyui PATH (the ComfyUI checkout to run it with), or drop {given[0]}")
    args.workflow = args.workflow or DEFAULT_WORKFLOW
    if args.comfyui:  # before the table, which takes a while: a wrong path or Python fails now
        args.comfyui, args.comfyui_python = check_headless(args.comfyui, args.workflow, args.comfyui_python)
    result = run_demo(tiny=args.tiny, device=args.device, seed=args.seed, runs=args.runs, log=log,
                      calibrate=args.calibrate)
    print(format_table(result), end="")
    if args.comfyui:
        log(f"running workflows/{args.workflow} headless through {args.comfyui} ...")
        run_workflow_headless(args.comfyui, args.workflow, python=args.comfyui_python)  # raises one line on failure
        print(f"ComfyUI headless run of {args.workflow}: ok (the workflow ran on tiny stand-in models and saved its image)")
    return 0
