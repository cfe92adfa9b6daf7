"""Model families as data: for every kind of source model, which layers get which format, which read an
unsigned (post-GELU) input, and the real configurations, so that one question - "which family is this file,
which layer gets which format, what will it weigh" - has one answer that quantize, validation, inspect, the
loaders and the nodes all read.

A family's rules are (regex on the layer name without `.weight`, format) pairs, first match wins; BLOCK stands
for the block format the user chose (svdq_w4a4 / ternary / w4a16); a layer no rule matches stays 16-bit
(embedders, final layer, norms, embeddings). Shapes and config inference live in the layout modules
(checkpoint/flux.py, t5.py, clip_l.py, llm.py), keyed by lowbit.model.
"""
import math
import re
from dataclasses import dataclass

from . import clip_l, flux, llm, t5

BLOCK = "block"
LAYOUTS = {"flux": flux, "t5": t5, "clip_l": clip_l, "llm": llm}
DEFAULT_RANK = {"svdq_w4a4": 32, "ternary": 64, "w4a16": 0}
BF16 = 2  # bytes


@dataclass(frozen=True)
class Variant:
    """A released model of a family: its config as lowbit.config records it, and where the numbers come from."""

    name: str
    title: str
    config: dict
    source: str


@dataclass(frozen=True)
class Family:
    name: str            # "flux1", "flux2", "t5", "clip_l", "flux2_te"
    model: str           # lowbit.model of its checkpoints
    title: str
    rules: tuple         # ((regex, BLOCK or a format), ...)
    unsigned_inputs: str = ""  # regex: svdq_w4a4 layers whose input is a GELU output (shifted, unsigned)
    variants: tuple = ()
    text_encoder: bool = False

    @property
    def layout(self):
        return LAYOUTS[self.model]

    def layer_format(self, name: str, block_fmt: str) -> str | None:
        for pattern, fmt in self.rules:
            if re.match(pattern, name):
                return block_fmt if fmt == BLOCK else fmt
        return None

    def layer_options(self, name: str, fmt: str) -> dict:
        if fmt == "svdq_w4a4" and self.unsigned_inputs and re.search(self.unsigned_inputs, name):
            return {"act_unsigned": True}
        return {}

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ValueError(f"{self.title} has no variant {name!r}; known: {[v.name for v in self.variants]}")

    def plan(self, config: dict, block_fmt: str, rank: int | None = None, group_size: int = 64) -> dict:
        """{format or "16-bit": {"layers", "params", "bytes"}} of a checkpoint of this config, from its shapes
        alone (tensor bytes; the safetensors header adds well under 1 MB)."""
        rank = DEFAULT_RANK.get(block_fmt, 0) if rank is None else rank
        shapes = self.layout.expected_shapes(config)
        out = {}
        for key, shape in shapes.items():
            layer, _, end = key.rpartition(".")
            fmt = self.layer_format(layer, block_fmt) if end == "weight" and len(shape) == 2 else None
            if end == "bias" and self.layer_format(layer, block_fmt) is not None:
                continue  # counted with its layer
            row = out.setdefault(fmt or "16-bit", {"layers": 0, "params": 0, "bytes": 0})
            n = math.prod(shape)
            if fmt is None:
                row["params"] += n
                row["bytes"] += BF16 * n
                row["layers"] += end == "weight"
                continue
            bias = f"{layer}.bias" in shapes
            row["layers"] += 1
            row["params"] += n + (shape[0] if bias else 0)
            row["bytes"] += packed_bytes(fmt, *shape, rank=rank, group_size=group_size, bias=bias)
        return out


def packed_bytes(fmt: str, n: int, k: int, rank: int = 0, group_size: int = 64, bias: bool = False,
                 zeros: bool = False) -> int:
    """Bytes of one quantized (n, k) layer as stored (quant_ops/formats.py): packed codes, 16-bit scales,
    smoothing, low-rank branch (rank capped at min(n, k); w4a16 has none) and bias. zeros: w4a16 with zero
    points (an upper estimate; lowbit's w4a16 is symmetric)."""
    r = 0 if fmt == "w4a16" else min(rank, n, k)
    extra = BF16 * (r * (n + k) + (n if bias else 0))
    if fmt == "svdq_w4a4":
        return n * k // 2 + BF16 * ((k // 64) * n + k) + extra
    if fmt == "ternary":
        return n * k // 4 + BF16 * n + extra
    if fmt == "w4a16":
        return n * k // 2 + BF16 * (k // group_size) * n * (2 if zeros else 1) + extra
    raise ValueError(f"unknown format {fmt!r}")


# ---- the families ---------------------------------------------------------------------------------------------

_FLUX_BLOCKS = (r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])|single_blocks\.\d+\.linear[12])$", BLOCK)
_FLUX_SOURCE = "ComfyUI comfy/model_detection.py (FLUX detection); black-forest-labs/flux"
_F2_DEV = "black-forest-labs/flux2 src/flux2/model.py Flux2Params defaults; diffusers Flux2Transformer2DModel defaults"
_F2_KLEIN = ("FLUX.2-klein-{} transformer/config.json as restated by public code (InvokeAI backend/flux2 presets, "
             "AsymFLUX.2 configs); text width = 3 x the Qwen3 width (ComfyUI comfy/text_encoders/flux.py)")
_COMFY_LLAMA = "ComfyUI comfy/text_encoders/llama.py {}"


def _flux2(hidden, depth, single, context, guidance):
    return {"image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None,
            "context_in_dim": context, "hidden_size": hidden, "mlp_ratio": 3.0, "num_heads": hidden // 128,
            "depth": depth, "depth_single_blocks": single, "axes_dim": list(flux.FLUX2_AXES_DIM),
            "theta": flux.FLUX2_THETA, "qkv_bias": False, "guidance_embed": guidance}


def _llm(model_type, vocab, hidden, ff, layers, q_norm, lm_head=False, final_norm=True):
    return {"model_type": model_type, "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": ff,
            "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 8, "q_norm": q_norm,
            "final_norm": final_norm, "lm_head": lm_head}


FLUX1 = Family(
    "flux1", "flux", "FLUX.1",
    rules=(_FLUX_BLOCKS,
           (r"^(double_blocks\.\d+\.(img|txt)_mod\.lin|single_blocks\.\d+\.modulation\.lin)$", "w4a16")),
    unsigned_inputs=r"_mlp\.2$",  # GELU(tanh) output: >= -0.17, shifted by +0.171875 and quantized unsigned
    variants=(Variant("dev", "FLUX.1 [dev]", {
        "in_channels": 64, "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0,
        "num_heads": 24, "depth": 19, "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000,
        "qkv_bias": True, "guidance_embed": True}, _FLUX_SOURCE),))

FLUX2 = Family(
    "flux2", "flux", "FLUX.2",
    rules=(_FLUX_BLOCKS, (r"^(double_stream_modulation_(img|txt)|single_stream_modulation)\.lin$", "w4a16")),
    unsigned_inputs="",  # SiLU-gated MLPs: silu(a) * b is signed, so img/txt_mlp.2 and linear2 stay signed
    variants=(Variant("dev", "FLUX.2 [dev]", _flux2(6144, 8, 48, 15360, True), _F2_DEV),
              Variant("klein-4b", "FLUX.2 [klein] 4B", _flux2(3072, 5, 20, 7680, False), _F2_KLEIN.format("4B")),
              Variant("klein-9b", "FLUX.2 [klein] 9B", _flux2(4096, 8, 24, 12288, False), _F2_KLEIN.format("9B"))))

T5 = Family("t5", "t5", "T5 encoder", rules=((t5.LINEAR.pattern, "w4a16"),), text_encoder=True,
            variants=(Variant("xxl", "T5-XXL encoder", {
                "d_ff": 10240, "d_kv": 64, "d_model": 4096, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
                "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "model_type": "t5",
                "relative_attention_num_buckets": 32, "layer_norm_epsilon": 1e-6},
                "ComfyUI comfy/text_encoders/t5_config_xxl.json"),))

CLIP_L = Family("clip_l", "clip_l", "CLIP-L", rules=((clip_l.LINEAR.pattern, "w4a16"),), text_encoder=True,
                variants=(Variant("l", "CLIP-L", {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                                  "vocab_size": 49408, "max_position_embeddings": 77},
                                  "ComfyUI comfy/sd1_clip_config.json"),))

FLUX2_TE = Family(
    "flux2_te", "llm", "FLUX.2 text encoder",
    # attention and MLP linears weight-only 4-bit; the 8B's lm_head too (ComfyUI never runs it to encode);
    # the embedding table and the RMSNorms stay 16-bit
    rules=((r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$", "w4a16"),
           (r"^model\.lm_head$", "w4a16")),
    text_encoder=True,
    variants=(Variant("mistral3-24b", "Mistral 3 Small 24B (FLUX.2 [dev])",
                      _llm("mistral3_24b", 131072, 5120, 32768, 40, False),
                      _COMFY_LLAMA.format("Mistral3Small24BConfig")),
              Variant("mistral3-24b-pruned", "Mistral 3 Small 24B, FLUX.2 pruned file (30 layers)",
                      _llm("mistral3_24b", 131072, 5120, 32768, 30, False, final_norm=False),
                      _COMFY_LLAMA.format("Mistral3Small24BConfig") + "; pruned: comfy/text_encoders/flux.py num_layers 30"),
              Variant("qwen3-4b", "Qwen3 4B (FLUX.2 [klein] 4B)", _llm("qwen3_4b", 151936, 2560, 9728, 36, True),
                      _COMFY_LLAMA.format("Qwen3_4BConfig")),
              Variant("qwen3-8b", "Qwen3 8B (FLUX.2 [klein] 9B)", _llm("qwen3_8b", 151936, 4096, 12288, 36, True, True),
                      _COMFY_LLAMA.format("Qwen3_8BConfig") + " (lm_head: the 8B's own output matrix)")))

FAMILIES = {f.name: f for f in (FLUX1, FLUX2, T5, CLIP_L, FLUX2_TE)}


def family_of(model: str, config: dict | None) -> Family:
    """The family of a checkpoint or source from its lowbit.model and config."""
    if model == "flux":
        return FLUX2 if flux.is_flux2(config or {}) else FLUX1
    for f in FAMILIES.values():
        if f.model == model:
            return f
    raise ValueError(f"no model family for lowbit.model {model!r}")


def find_variant(name: str) -> tuple:
    """(family, variant) for a variant name such as 'flux2:klein-9b' or just 'klein-9b'."""
    fam_name, _, var_name = name.rpartition(":")
    matches = [(f, v) for f in FAMILIES.values() if not fam_name or f.name == fam_name
               for v in f.variants if v.name == var_name]
    if len(matches) != 1:
        known = ", ".join(f"{f.name}:{v.name}" for f in FAMILIES.values() for v in f.variants)
        raise ValueError(f"{'ambiguous' if matches else 'unknown'} model {name!r}; known: {known}")
    return matches[0]
