"""T5 encoder layout (ComfyUI's key names): which tensors are quantized, config from tensor shapes."""
import re

from .layout import find_prefix, layer_count, shape_reader

PREFIXES = ("text_encoders.t5xxl.transformer.", "t5xxl.transformer.", "transformer.")
DETECT_KEYS = ("shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight")
OPTIONAL_KEYS = ("encoder.embed_tokens.weight",)  # some exports keep a tied copy of shared.weight
FORMAT = "w4a16"
GROUP_SIZE = 128
# lowbit.config keys expected_shapes (and ComfyUI's T5) read and what each must be
CONFIG_TYPES = {"d_ff": "positive int", "d_kv": "positive int", "d_model": "positive int", "num_heads": "positive int",
                "num_layers": "positive int", "vocab_size": "positive int", "relative_attention_num_buckets": "positive int",
                "is_gated_act": "bool"}
OPTIONAL_CONFIG = {"dense_act_fn": "str", "model_type": "str", "layer_norm_epsilon": "positive number"}

LINEAR = re.compile(r"^encoder\.block\.\d+\.layer\.(0\.SelfAttention\.[qkvo]|1\.DenseReluDense\.(wi|wi_0|wi_1|wo))$")


def strip_prefix(keys) -> str:
    return find_prefix(keys, PREFIXES, ("encoder.block.",))


def is_t5(keys) -> bool:
    keys = set(keys)
    return all(k in keys for k in DETECT_KEYS)


def infer_config(shapes: dict) -> dict:
    """The T5 config keys ComfyUI's T5 reads (t5xxl_model_config), from tensor shapes."""
    shape = shape_reader(shapes, "T5 encoder")
    vocab, d_model = shape("shared.weight")
    inner = shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    d_ff = shape("encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight")[0]
    layers = layer_count(shapes, r"^encoder\.block\.(\d+)\.", "T5 block")
    if inner % heads:
        raise ValueError(f"encoder.block.0.layer.0.SelfAttention.q.weight: inner dim {inner} is not a multiple of "
                         f"the {heads} heads of relative_attention_bias")
    return {"d_ff": d_ff, "d_kv": inner // heads, "d_model": d_model, "num_heads": heads, "num_layers": layers,
            "vocab_size": vocab, "dense_act_fn": "gelu_pytorch_tanh" if gated else "relu", "is_gated_act": gated,
            "model_type": "t5", "relative_attention_num_buckets": buckets, "layer_norm_epsilon": 1e-6}


def expected_shapes(c: dict) -> dict:
    d, inner, ff = c["d_model"], c["d_kv"] * c["num_heads"], c["d_ff"]
    out = {"shared.weight": (c["vocab_size"], d), "encoder.final_layer_norm.weight": (d,),
           "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
               (c["relative_attention_num_buckets"], c["num_heads"])}
    for i in range(c["num_layers"]):
        p = f"encoder.block.{i}.layer"
        for n in "qkv":
            out[f"{p}.0.SelfAttention.{n}.weight"] = (inner, d)
        out[f"{p}.0.SelfAttention.o.weight"] = (d, inner)
        out[f"{p}.0.layer_norm.weight"] = (d,)
        for n in ("wi_0", "wi_1") if c["is_gated_act"] else ("wi",):
            out[f"{p}.1.DenseReluDense.{n}.weight"] = (ff, d)
        out[f"{p}.1.DenseReluDense.wo.weight"] = (d, ff)
        out[f"{p}.1.layer_norm.weight"] = (d,)
    return out
