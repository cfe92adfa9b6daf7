"""UI-format ComfyUI workflows (what users share) -> API format (what /prompt takes), driven by
/object_info the way the frontend and `comfy run` do it."""

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTE_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MUTED_MODES = {2, 4}  # never / bypass


def _is_widget(spec) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control_widget(name, spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed"))


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in NOTE_TYPES or node.get("mode", 0) in MUTED_MODES:
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise KeyError(f"node {node['id']}: type {node['type']!r} is not registered in this ComfyUI")
        linked = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _, origin, slot, *_ = links[inp["link"]]
                linked[inp["name"]] = [str(origin), slot]
        values = list(node.get("widgets_values", []))
        inputs = {}
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name, spec in specs.items():
            if name in linked:
                inputs[name] = linked[name]
                if _is_widget(spec):  # a widget converted to an input still holds a slot in widgets_values
                    values.pop(0) if values else None
                    if _has_control_widget(name, spec) and values:
                        values.pop(0)
                continue
            if not _is_widget(spec):
                continue
            if not values:
                if name in info["input"].get("optional", {}):
                    continue  # a widget added after the workflow was saved: the frontend shows its default
                raise ValueError(f"node {node['id']} ({node['type']}): no widget value left for input {name!r}")
            inputs[name] = values.pop(0)
            if _has_control_widget(name, spec) and values:
                values.pop(0)  # "fixed" / "randomize": a frontend-only widget
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
