"""CLIP-L text encoder layout (ComfyUI / transformers key names): encoder linears -> w4a16, the rest 16-bit.
ComfyUI hard-codes CLIP-L's architecture, so the config recorded is informational."""
import re

DETECT_KEYS = ("text_model.encoder.layers.0.mlp.fc1.weight", "text_model.embeddings.token_embedding.weight")
BIGGER_CLIPS = ("text_model.encoder.layers.22.mlp.fc1.weight",)  # CLIP-H / CLIP-G: not supported here
FORMAT = "w4a16"

_LINEAR = re.compile(r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def is_clip_l(keys) -> bool:
    keys = set(keys)
    return all(k in keys for k in DETECT_KEYS) and not any(k in keys for k in BIGGER_CLIPS)


def layer_format(name: str, fmt: str = FORMAT) -> str | None:
    return fmt if _LINEAR.match(name) else None


def infer_config(shapes: dict) -> dict:
    vocab, hidden = shapes["text_model.embeddings.token_embedding.weight"]
    idx = {int(m.group(1)) for k in shapes if (m := re.match(r"^text_model\.encoder\.layers\.(\d+)\.", k))}
    if idx != set(range(len(idx))):
        raise ValueError(f"CLIP layer indices {sorted(idx)} are not 0..{len(idx) - 1}; the file is incomplete")
    return {"hidden_size": hidden, "intermediate_size": shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
            "num_hidden_layers": len(idx), "vocab_size": vocab}


def check_shapes(path: str, shapes: dict, config: dict) -> None:
    h, ff = config["hidden_size"], config["intermediate_size"]
    for i in range(config["num_hidden_layers"]):
        p = f"text_model.encoder.layers.{i}"
        want = {f"{p}.self_attn.{n}_proj.weight": (h, h) for n in ("q", "k", "v", "out")}
        want.update({f"{p}.mlp.fc1.weight": (ff, h), f"{p}.mlp.fc2.weight": (h, ff)})
        for k, s in want.items():
            if k not in shapes:
                raise ValueError(f"{path}: tensor {k} is missing")
            if tuple(shapes[k]) != s:
                raise ValueError(f"{path}: tensor {k} has shape {tuple(shapes[k])}, expected {s}")
