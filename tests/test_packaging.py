"""Registry / ComfyUI-Manager metadata, shipped files, and the README's quickstart commands."""
import ast
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="Python < 3.11 has no tomllib")

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _readme_command(name: str) -> str:
    spec = importlib.util.spec_from_file_location("readme_command", ROOT / ".ci" / "readme_command.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.command(name)


def test_registry_metadata():
    """What `comfy node publish` reads: [project] name/version/license/urls and [tool.comfy]."""
    p = _pyproject()
    project, comfy = p["project"], p["tool"]["comfy"]
    assert project["name"] == "comfyui-lowbit"
    assert all(part.isdigit() for part in project["version"].split("."))
    assert project["license"] and project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"]
    assert "workflows" in comfy["includes"]
    assert (ROOT / "icon.svg").is_file() and (ROOT / "LICENSE").is_file()


def test_requirements_match_dependencies():
    """ComfyUI-Manager installs requirements.txt into ComfyUI's venv (which has torch already)."""
    reqs = {line.split(">")[0].split("=")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    deps = {d.split(">")[0].split("=")[0].strip() for d in _pyproject()["project"]["dependencies"]}
    assert reqs == deps - {"torch"}


def test_console_script_and_version():
    from comfyui_lowbit import __version__, cli

    assert _pyproject()["project"]["scripts"]["lowbit"] == "comfyui_lowbit.cli:main"
    assert __version__ == _pyproject()["project"]["version"]
    commands = cli._parser()._subparsers._group_actions[0].choices
    for name in ("quantize", "inspect", "convert-nunchaku", "bench", "demo"):
        assert name in commands, f"`lowbit {name}` is not registered"


def test_workflows_are_ui_format():
    files = sorted((ROOT / "workflows").glob("*.json"))
    assert len(files) >= 5
    for f in files:
        wf = json.loads(f.read_text())
        assert {"nodes", "links", "version"} <= set(wf), f"{f.name} is not a UI-format workflow"
        ids = {n["id"] for n in wf["nodes"]}
        for link in wf["links"]:
            assert link[1] in ids and link[3] in ids, f"{f.name}: link {link[0]} points at a missing node"


def test_readme_quickstart_is_what_ci_runs():
    torch_line, demo, test = _readme_command("torch"), _readme_command("demo"), _readme_command("test")
    assert demo.endswith("lowbit demo") and "python3 -m venv" in demo
    assert "pytest" in test and "python3 -m venv" in test
    assert "readme_command.py test" in (ROOT / ".ci" / "run").read_text()
    # a fresh machine installs torch's CPU build first; the demo and test lines then pin the version it
    # installed, so pip fetches no other (on Linux: CUDA) torch
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_line and "python3 -m venv" in torch_line
    pins = {line: re.findall(r"torch==([\w.+]+)", line) for line in (torch_line, demo, test)}
    assert all(len(p) == 1 for p in pins.values()) and len({p[0] for p in pins.values()}) == 1, pins
    assert "download.pytorch.org" not in test  # CI runs the test line and may not reach that index


def test_readme_defaults_agree_with_the_code():
    """The quantize ranks the README states are the command's (and the node's -1 = the command's)."""
    from comfyui_lowbit.checkpoint import DEFAULT_RANK

    readme = (ROOT / "README.md").read_text()
    assert f"{DEFAULT_RANK['svdq_w4a4']} for `svdq_w4a4`, {DEFAULT_RANK['ternary']} for `ternary`" in readme
    assert f"ternary r{DEFAULT_RANK['ternary']}" in readme and f"W4A4 r{DEFAULT_RANK['svdq_w4a4']}" in readme


def test_import_without_comfyui():
    """The package and CLI import without ComfyUI; nodes are only imported inside ComfyUI."""
    import comfyui_lowbit  # noqa: F401

    assert "folder_paths" not in sys.modules or hasattr(sys.modules["folder_paths"], "get_filename_list")


def _node_classes() -> list:
    """NODE_CLASS_MAPPINGS keys of nodes/__init__.py (read, not imported: it needs ComfyUI)."""
    tree = ast.parse((ROOT / "nodes" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "NODE_CLASS_MAPPINGS":
            return [k.value for k in node.value.keys]
    raise AssertionError("nodes/__init__.py defines no NODE_CLASS_MAPPINGS")


def test_every_node_has_a_help_page():
    """ComfyUI's node-docs convention: web/docs/<NodeClass>.md under the pack's WEB_DIRECTORY (the server test
    in test_comfyui_validation.py fetches them through ComfyUI)."""
    tree = ast.parse((ROOT / "__init__.py").read_text())
    web = [n.value.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "WEB_DIRECTORY"]
    assert web == ["./web"]
    classes = _node_classes()
    assert len(classes) >= 6
    pages = {p.stem for p in (ROOT / "web" / "docs").glob("*.md")}
    assert pages == set(classes), f"pages {sorted(pages)} vs nodes {sorted(classes)}"
    for name in classes:
        text = (ROOT / "web" / "docs" / f"{name}.md").read_text()
        assert text.startswith("# ") and "## Inputs" in text and "## Errors" in text, name
        assert "## Files" in text, f"{name}.md does not say where the files go"
