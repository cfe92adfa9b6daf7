"""Prepare what gpu_comfyui_full.py needs on a GPU machine that has torch and triton but no package index:
a trimmed copy of ComfyUI's Python source (no tokenizer data, no UI) and wheels of the packages ComfyUI 0.29
imports that such a machine lacks (comfy-kitchen, comfy-aimdo, torchsde, trampoline). Writes DEST
(default .gpu_carry, git-ignored), about 45 MB; carry it with the device tool (`carry: [".gpu_carry"]`).

    python3 scripts/gpu_carry.py --comfyui ~/ComfyUI [--python-version 3.12]
"""
import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# top-level files besides comfy/ that a headless in-process run imports (our loaders import folder_paths)
TOP_FILES = ("folder_paths.py", "node_helpers.py", "comfyui_version.py", "requirements.txt", "LICENSE")
TOKENIZER_DATA = re.compile(r"tokenizer")  # vocabularies (~8 MB) under *tokenizer* folders; their .py files stay
# ComfyUI requirements a torch + triton image lacks; versions of the first two come from requirements.txt
WHEELS = {"comfy-kitchen": None, "comfy-aimdo": None, "torchsde": "0.2.6", "trampoline": "0.1.2"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_12_x86_64", "manylinux2010_x86_64")


def copy_source(comfyui: Path, dest: Path) -> int:
    if not (comfyui / "comfy" / "model_patcher.py").is_file():
        raise SystemExit(f"{comfyui}: not a ComfyUI checkout (comfy/model_patcher.py missing)")
    if dest.exists():
        shutil.rmtree(dest)
    total = 0
    for path in sorted((comfyui / "comfy").rglob("*")):
        rel = path.relative_to(comfyui)
        if (path.is_dir() or "__pycache__" in rel.parts or path.suffix in (".png", ".pyc")
                or path.suffix != ".py" and TOKENIZER_DATA.search(str(rel))):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel)
        total += path.stat().st_size
    for name in TOP_FILES:
        if (comfyui / name).is_file():
            shutil.copy2(comfyui / name, dest / name)
            total += (comfyui / name).stat().st_size
    return total


def pinned_versions(comfyui: Path) -> dict:
    versions = dict(WHEELS)
    for line in (comfyui / "requirements.txt").read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
        if m and m.group(1).lower() in versions:
            versions[m.group(1).lower()] = m.group(2)
    missing = [k for k, v in versions.items() if v is None]
    if missing:
        raise SystemExit(f"{comfyui}/requirements.txt: no pinned version for {missing}")
    return versions


def download_wheels(versions: dict, dest: Path, python_version: str) -> int:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
           "--implementation", "cp", "-d", str(dest)]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd + [f"{k}=={v}" for k, v in versions.items()], check=True)
    return sum(p.stat().st_size for p in dest.glob("*.whl"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", required=True, help="a ComfyUI 0.29 checkout")
    p.add_argument("--dest", default=str(ROOT / ".gpu_carry"))
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (wheels are built per version)")
    a = p.parse_args(argv)
    comfyui, dest = Path(a.comfyui).expanduser().resolve(), Path(a.dest)
    src = copy_source(comfyui, dest / "ComfyUI")
    whl = download_wheels(pinned_versions(comfyui), dest / "wheels", a.python_version)
    print(f"{dest}: ComfyUI source {src / 1e6:.1f} MB, wheels {whl / 1e6:.1f} MB (the device tool carries 64 MiB "
          f"in all, working tree included)")


if __name__ == "__main__":
    main()
