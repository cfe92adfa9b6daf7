"""FLUX.2's LLM text encoders (Mistral 3 Small 24B for [dev], Qwen3 4B / 8B for [klein]) in ComfyUI's key names
(comfy/text_encoders/llama.py: `model.embed_tokens`, `model.layers.N.self_attn.{q,k,v,o}_proj`, Qwen3's
`q_norm` / `k_norm`, `model.layers.N.mlp.{gate,up,down}_proj`, RMSNorms, `model.norm`, the 8B's
`model.lm_head`): config from tensor shapes and the tensors a config implies. Which layers get which format is
data in checkpoint/families.py.

ComfyUI builds these encoders from its own configs (Qwen3_4BConfig, Qwen3_8BConfig, Mistral3Small24BConfig) and
picks the class from the file (comfy/sd.py detect_te_model: Qwen3 by `q_norm` and width 2560 / 4096, Mistral 3 by
width 5120, "pruned" when layer 39 is absent). `model_type` in the config names that class.
"""
from .layout import find_prefix, layer_count, shape_reader

HEAD_DIM = 128  # every ComfyUI llama-style config above has head_dim 128 (a class constant, not a field)
PREFIXES = ("text_encoders.qwen3_4b.transformer.", "text_encoders.qwen3_8b.transformer.",
            "text_encoders.mistral3_24b.transformer.")
DETECT_KEYS = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.layers.0.mlp.gate_proj.weight")
# the Mistral 3 tokenizer (tekken JSON as uint8) travels inside ComfyUI's FLUX.2 text-encoder file
OPTIONAL_KEYS = ("tekken_model",)
PASSTHROUGH = ("tekken_model",)  # non-float tensors copied as they are
MODEL_TYPES = ("qwen3_4b", "qwen3_8b", "mistral3_24b")
# widths of other ComfyUI Qwen3 encoders (0.6B, 2B: Ovis / ACE), which are not FLUX.2's
OTHER_QWEN3_WIDTHS = (1024, 2048)
CONFIG_TYPES = {"model_type": "str", "vocab_size": "positive int", "hidden_size": "positive int",
                "intermediate_size": "positive int", "num_hidden_layers": "positive int",
                "num_attention_heads": "positive int", "num_key_value_heads": "positive int", "q_norm": "bool",
                "final_norm": "bool", "lm_head": "bool"}
OPTIONAL_CONFIG = {}


def strip_prefix(keys) -> str:
    return find_prefix(keys, PREFIXES, ("model.layers.",))


def is_llm(keys) -> bool:
    keys = set(keys)
    return all(k in keys for k in DETECT_KEYS)


def model_type(hidden: int, q_norm: bool) -> str:
    """ComfyUI's class for a FLUX.2 encoder of this width (comfy/sd.py detect_te_model, comfy/supported_models.py
    Flux2.clip_target). Other widths are the tiny test encoders: Qwen3-shaped -> qwen3_4b's class, else Mistral's."""
    if q_norm:
        if hidden in OTHER_QWEN3_WIDTHS:
            raise ValueError(f"a Qwen3 encoder of width {hidden} (Qwen3 0.6B / 2B) is not a FLUX.2 text encoder "
                             f"(FLUX.2 [klein] uses Qwen3 4B or 8B, widths 2560 / 4096)")
        return "qwen3_8b" if hidden == 4096 else "qwen3_4b"
    return "mistral3_24b"


def infer_config(shapes: dict) -> dict:
    """The ComfyUI llama config fields a FLUX.2 text encoder file implies (plus its model_type)."""
    shape = shape_reader(shapes, "FLUX.2 text encoder")
    vocab, hidden = shape("model.embed_tokens.weight")
    q = shape("model.layers.0.self_attn.q_proj.weight")[0]
    kv = shape("model.layers.0.self_attn.k_proj.weight")[0]
    if q % HEAD_DIM or kv % HEAD_DIM:
        raise ValueError(f"model.layers.0.self_attn: q_proj / k_proj widths {q} / {kv} are not multiples of the "
                         f"head dim {HEAD_DIM} that ComfyUI's Qwen3 / Mistral 3 classes use")
    layers = layer_count(shapes, r"^model\.layers\.(\d+)\.", "layer")
    q_norm = "model.layers.0.self_attn.q_norm.weight" in shapes
    return {"model_type": model_type(hidden, q_norm), "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": shape("model.layers.0.mlp.gate_proj.weight")[0], "num_hidden_layers": layers,
            "num_attention_heads": q // HEAD_DIM, "num_key_value_heads": kv // HEAD_DIM, "q_norm": q_norm,
            "final_norm": "model.norm.weight" in shapes, "lm_head": "model.lm_head.weight" in shapes}


def expected_shapes(c: dict) -> dict:
    """{tensor name: shape} of the encoder (16-bit; OPTIONAL_KEYS may come on top)."""
    h, ff = c["hidden_size"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * HEAD_DIM, c["num_key_value_heads"] * HEAD_DIM
    out = {"model.embed_tokens.weight": (c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out[f"{p}.self_attn.q_proj.weight"] = (q, h)
        out[f"{p}.self_attn.k_proj.weight"] = out[f"{p}.self_attn.v_proj.weight"] = (kv, h)
        out[f"{p}.self_attn.o_proj.weight"] = (h, q)
        if c["q_norm"]:
            out[f"{p}.self_attn.q_norm.weight"] = out[f"{p}.self_attn.k_norm.weight"] = (HEAD_DIM,)
        out[f"{p}.mlp.gate_proj.weight"] = out[f"{p}.mlp.up_proj.weight"] = (ff, h)
        out[f"{p}.mlp.down_proj.weight"] = (h, ff)
        out[f"{p}.input_layernorm.weight"] = out[f"{p}.post_attention_layernorm.weight"] = (h,)
    if c["final_norm"]:
        out["model.norm.weight"] = (h,)
    if c["lm_head"]:
        out["model.lm_head.weight"] = (c["vocab_size"], h)
    return out


def source_plan(keys, prefix: str = "") -> dict:
    """{ComfyUI tensor name: ([source key], False)} for the tensors of an encoder file: the prefix removed and a
    bare `lm_head.weight` (some exports) named `model.lm_head.weight`, as ComfyUI renames it on load."""
    plan = {}
    for k in keys:
        if not k.startswith(prefix):
            continue
        name = k[len(prefix):]
        plan["model.lm_head.weight" if name == "lm_head.weight" else name] = ([k], False)
    return plan
