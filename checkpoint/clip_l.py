"""CLIP-L text encoder layout (ComfyUI / transformers key names): encoder linears -> w4a16, the rest 16-bit.
ComfyUI hard-codes CLIP-L's architecture, so the config recorded is informational."""
import re

from .layout import layer_count, shape_reader

DETECT_KEYS = ("text_model.encoder.layers.0.mlp.fc1.weight", "text_model.embeddings.token_embedding.weight")
BIGGER_CLIPS = ("text_model.encoder.layers.22.mlp.fc1.weight",)  # CLIP-H / CLIP-G: not supported here
FORMAT = "w4a16"
OPTIONAL_KEYS = ("text_projection.weight", "text_model.embeddings.position_ids", "logit_scale")
# lowbit.config keys (informational for CLIP-L: ComfyUI hard-codes its architecture); checked when present
CONFIG_TYPES = {}
OPTIONAL_CONFIG = {"hidden_size": "positive int", "intermediate_size": "positive int",
                   "num_hidden_layers": "positive int", "vocab_size": "positive int"}

LINEAR = re.compile(r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def is_clip_l(keys) -> bool:
    keys = set(keys)
    return all(k in keys for k in DETECT_KEYS) and not any(k in keys for k in BIGGER_CLIPS)


def infer_config(shapes: dict) -> dict:
    shape = shape_reader(shapes, "CLIP-L text encoder")
    vocab, hidden = shape("text_model.embeddings.token_embedding.weight")
    layers = layer_count(shapes, r"^text_model\.encoder\.layers\.(\d+)\.", "CLIP layer")
    return {"hidden_size": hidden, "intermediate_size": shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
            "num_hidden_layers": layers, "vocab_size": vocab,
            "max_position_embeddings": shape("text_model.embeddings.position_embedding.weight")[0]}


def expected_shapes(config: dict) -> dict:
    """{tensor name: shape} of a CLIP-L text model with `config` (16-bit; OPTIONAL_KEYS may come on top)."""
    h, ff = config["hidden_size"], config["intermediate_size"]
    out = {"text_model.embeddings.token_embedding.weight": (config["vocab_size"], h),
           "text_model.embeddings.position_embedding.weight": (config["max_position_embeddings"], h),
           "text_model.final_layer_norm.weight": (h,), "text_model.final_layer_norm.bias": (h,)}
    for i in range(config["num_hidden_layers"]):
        p = f"text_model.encoder.layers.{i}"
        for n in ("q", "k", "v", "out"):
            out[f"{p}.self_attn.{n}_proj.weight"], out[f"{p}.self_attn.{n}_proj.bias"] = (h, h), (h,)
        out[f"{p}.mlp.fc1.weight"], out[f"{p}.mlp.fc1.bias"] = (ff, h), (ff,)
        out[f"{p}.mlp.fc2.weight"], out[f"{p}.mlp.fc2.bias"] = (h, ff), (h,)
        for n in ("layer_norm1", "layer_norm2"):
            out[f"{p}.{n}.weight"], out[f"{p}.{n}.bias"] = (h,), (h,)
    return out
