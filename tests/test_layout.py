"""The package layout holds: imports point down the layers (README "Layout"), only nodes/ imports ComfyUI,
and callers outside a package import it through its __init__ (its public entry), not its files."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["kernels", "quant_ops", "checkpoint", "flux_model", "nodes", "cli"]  # bottom to top
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution",
                   "comfy_execution", "node_helpers", "latent_preview"}


def _package_files():
    for layer in LAYERS:
        for path in sorted((ROOT / layer).glob("*.py")):
            yield layer, path


def _imports(path: Path):
    """(level, module, names) of every import statement in a file, inner ones included."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield 0, a.name, []


def _targets(layer: str, level: int, module: str, names: list) -> list[tuple[str, str]]:
    """(top-level package of ours, first sub-part or '') that a relative import from `layer` reaches."""
    if level == 0:
        return []
    if level == 1:
        return [(layer, module.split(".")[0] if module else "")]
    top = module.split(".")[0] if module else ""
    if top:
        return [(top, (module.split(".") + [""])[1])]
    return [(n, "") for n in names]  # `from .. import checkpoint`


def test_imports_point_down_the_layers():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for layer, path in _package_files():
        for level, module, names in _imports(path):
            for top, _ in _targets(layer, level, module, names):
                if top in rank and rank[top] > rank[layer]:
                    upward.append(f"{path.relative_to(ROOT)} imports {top}/ (above {layer}/)")
    assert not upward, "\n".join(upward)


def test_only_nodes_import_comfyui():
    offenders = []
    for layer, path in _package_files():
        if layer == "nodes":
            continue
        for level, module, _ in _imports(path):
            if level == 0 and module.split(".")[0] in COMFYUI_MODULES:
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offenders, "\n".join(offenders)


def test_other_packages_use_the_public_entry():
    """From another package, `from ..quant_ops.linear import X` should be `from ..quant_ops import X`
    (checkpoint's format layouts flux / t5 / clip_l / llm / nunchaku and the model families are public submodules
    and count as entries)."""
    public_submodules = {"checkpoint": {"flux", "t5", "clip_l", "llm", "nunchaku", "families"},
                         "kernels": {"reference", "packing"}}
    deep = []
    for layer, path in _package_files():
        for level, module, names in _imports(path):
            for top, sub in _targets(layer, level, module, names):
                if top != layer and top in LAYERS and sub and sub not in public_submodules.get(top, ()):
                    deep.append(f"{path.relative_to(ROOT)} imports {top}.{sub}")
    assert not deep, "\n".join(deep)
