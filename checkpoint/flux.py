"""FLUX transformer layouts (FLUX.1 and FLUX.2, one ComfyUI `Flux` class): config from tensor shapes, the
tensors a config implies, and the diffusers (FluxTransformer2DModel / Flux2Transformer2DModel) -> BFL/ComfyUI
name conversion. Which layer gets which format is data in checkpoint/families.py.

Everything here uses BFL names without the `model.diffusion_model.` prefix (what ComfyUI's detection
and LoRA key mapping expect). FLUX.2 (ComfyUI's `image_model: flux2`, comfy/model_detection.py): global
modulation instead of per-block modulation linears, SiLU-gated MLPs (the first MLP linear is 2 x mlp wide),
no biases, 128 latent channels at patch size 1, 4 rotary axes of 32, theta 2000.
"""
import re

from .layout import find_prefix, shape_reader

HEAD_DIM = 128
AXES_DIM = [16, 56, 56]
FLUX2_AXES_DIM = [32, 32, 32, 32]
FLUX2_THETA = 2000
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
DETECT_KEYS = ("img_in.weight", "double_blocks.0.img_attn.qkv.weight")
DIFFUSERS_DETECT_KEYS = ("x_embedder.weight", "transformer_blocks.0.attn.to_q.weight")
FLUX2_KEY = "double_stream_modulation_img.lin.weight"  # ComfyUI's FLUX.2 detection key
FLUX2_DIFFUSERS_KEY = "double_stream_modulation_img.linear.weight"
# lowbit.config keys expected_shapes reads and what each must be (checked before a file is trusted)
CONFIG_TYPES = {"in_channels": "positive int", "context_in_dim": "positive int", "hidden_size": "positive int",
                "num_heads": "positive int", "depth": "count", "depth_single_blocks": "count",
                "mlp_ratio": "positive number", "qkv_bias": "bool", "guidance_embed": "bool",
                "vec_in_dim": "positive int or null"}
OPTIONAL_CONFIG = {"out_channels": "positive int", "axes_dim": "list", "theta": "positive number",
                   "image_model": "str"}
IMAGE_MODELS = ("flux", "flux2")


def is_flux2(config: dict) -> bool:
    return config.get("image_model", "flux") == "flux2"


def layer_format(name: str, block_fmt: str, family: str = "flux1") -> str | None:
    """Format of BFL layer `name` (no `.weight`) in a checkpoint whose blocks use `block_fmt`;
    None: stays 16-bit (embedders, final layer, norms). See checkpoint/families.py."""
    from .families import FAMILIES

    return FAMILIES[family].layer_format(name, block_fmt)


def layer_options(name: str, fmt: str, family: str = "flux1") -> dict:
    """Extra quantizer options (FLUX.1: the second MLP linears read a GELU output, unsigned activations)."""
    from .families import FAMILIES

    return FAMILIES[family].layer_options(name, fmt)


def strip_prefix(keys) -> str:
    """The common prefix in PREFIXES carried by the keys of a FLUX file ('' if none)."""
    return find_prefix(keys, PREFIXES, ("img_in.", "x_embedder."))


def naming(keys) -> str | None:
    """'bfl', 'diffusers' or None (not a FLUX transformer) after removing the prefix (FLUX.1 and FLUX.2)."""
    keys = set(keys)
    if all(k in keys for k in DETECT_KEYS):
        return "bfl"
    if all(k in keys for k in DIFFUSERS_DETECT_KEYS):
        return "diffusers"
    return None


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    n = max(idx) + 1 if idx else 0
    if idx != set(range(n)):
        raise ValueError(f"block indices {sorted(idx)} of {pattern!r} are not 0..{n - 1}; the file is incomplete")
    return n


def infer_config(shapes: dict) -> dict:
    """FLUX config from BFL tensor shapes {name: shape} (see checkpoint contract); FLUX.2 when the global
    modulation is there, as ComfyUI detects it."""
    shape = shape_reader(shapes, "FLUX transformer")
    hidden, in_ch = shape("img_in.weight")
    if hidden % HEAD_DIM:
        raise ValueError(f"img_in.weight: hidden size {hidden} is not a multiple of the head dim {HEAD_DIM}")
    depth = _count(shapes, r"^double_blocks\.(\d+)\.")
    if FLUX2_KEY in shapes:
        return _infer_flux2(shapes, shape, hidden, in_ch, depth)
    config = {
        "in_channels": in_ch,
        "vec_in_dim": shape("vector_in.in_layer.weight")[1] if "vector_in.in_layer.weight" in shapes else None,
        "context_in_dim": shape("txt_in.weight")[1],
        "hidden_size": hidden,
        "mlp_ratio": shape("double_blocks.0.img_mlp.0.weight")[0] / hidden if depth else
        (shape("single_blocks.0.linear1.weight")[0] - 3 * hidden) / hidden,
        "num_heads": hidden // HEAD_DIM,
        "depth": depth,
        "depth_single_blocks": _count(shapes, r"^single_blocks\.(\d+)\."),
        "axes_dim": list(AXES_DIM),
        "theta": 10000,
        "qkv_bias": "double_blocks.0.img_attn.qkv.bias" in shapes or "single_blocks.0.linear1.bias" in shapes,
        "guidance_embed": "guidance_in.in_layer.weight" in shapes,
    }
    # FLUX.1 Fill / Depth / Canny read the image latent plus a conditioning latent (a wider img_in) and write
    # the plain latent: the final layer's width is its own
    out_ch = shape("final_layer.linear.weight")[0] if "final_layer.linear.weight" in shapes else in_ch
    if out_ch != in_ch:
        config["out_channels"] = out_ch
    return config


def _infer_flux2(shapes, shape, hidden, in_ch, depth) -> dict:
    # SiLU-gated MLP: the first linear is 2 x mlp wide (single blocks: 3 x hidden + 2 x mlp)
    mlp = shape("double_blocks.0.img_mlp.0.weight")[0] / 2 if depth else \
        (shape("single_blocks.0.linear1.weight")[0] - 3 * hidden) / 2
    return {
        "image_model": "flux2",
        "in_channels": in_ch,
        "out_channels": shape("final_layer.linear.weight")[0],
        "vec_in_dim": None,
        "context_in_dim": shape("txt_in.weight")[1],
        "hidden_size": hidden,
        "mlp_ratio": mlp / hidden,
        "num_heads": hidden // HEAD_DIM,
        "depth": depth,
        "depth_single_blocks": _count(shapes, r"^single_blocks\.(\d+)\."),
        "axes_dim": list(FLUX2_AXES_DIM),
        "theta": FLUX2_THETA,
        "qkv_bias": False,
        "guidance_embed": "guidance_in.in_layer.weight" in shapes,
    }


def expected_shapes(config: dict) -> dict:
    """{BFL tensor name: shape} of a FLUX transformer with `config` (16-bit, before quantization)."""
    if is_flux2(config):
        return _expected_flux2(config)
    h = config["hidden_size"]
    mlp = int(h * config["mlp_ratio"])
    hd = h // config["num_heads"]
    out = {}

    def lin(name, n, k, bias=True):
        out[f"{name}.weight"] = (n, k)
        if bias:
            out[f"{name}.bias"] = (n,)

    lin("img_in", h, config["in_channels"])
    lin("txt_in", h, config["context_in_dim"])
    embedders = ["time_in"] + (["guidance_in"] if config["guidance_embed"] else [])
    for e in embedders:
        lin(f"{e}.in_layer", h, 256)
        lin(f"{e}.out_layer", h, h)
    if config.get("vec_in_dim"):
        lin("vector_in.in_layer", h, config["vec_in_dim"])
        lin("vector_in.out_layer", h, h)
    qb = config["qkv_bias"]
    for i in range(config["depth"]):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            lin(f"{p}_mod.lin", 6 * h, h)
            lin(f"{p}_attn.qkv", 3 * h, h, qb)
            lin(f"{p}_attn.proj", h, h)
            lin(f"{p}_mlp.0", mlp, h)
            lin(f"{p}_mlp.2", h, mlp)
            out[f"{p}_attn.norm.query_norm.scale"] = (hd,)
            out[f"{p}_attn.norm.key_norm.scale"] = (hd,)
    for i in range(config["depth_single_blocks"]):
        p = f"single_blocks.{i}"
        lin(f"{p}.linear1", 3 * h + mlp, h, qb)
        lin(f"{p}.linear2", h, h + mlp)
        lin(f"{p}.modulation.lin", 3 * h, h)
        out[f"{p}.norm.query_norm.scale"] = (hd,)
        out[f"{p}.norm.key_norm.scale"] = (hd,)
    lin("final_layer.linear", config.get("out_channels", config["in_channels"]), h)
    lin("final_layer.adaLN_modulation.1", 2 * h, h)
    return out


def _expected_flux2(config: dict) -> dict:
    """FLUX.2 (ComfyUI's Flux with global_modulation, mlp_silu_act, ops_bias False): no biases anywhere."""
    h = config["hidden_size"]
    mlp = int(h * config["mlp_ratio"])
    hd = h // config["num_heads"]
    out = {"img_in.weight": (h, config["in_channels"]), "txt_in.weight": (h, config["context_in_dim"])}
    for e in ["time_in"] + (["guidance_in"] if config["guidance_embed"] else []):
        out[f"{e}.in_layer.weight"], out[f"{e}.out_layer.weight"] = (h, 256), (h, h)
    out["double_stream_modulation_img.lin.weight"] = (6 * h, h)
    out["double_stream_modulation_txt.lin.weight"] = (6 * h, h)
    out["single_stream_modulation.lin.weight"] = (3 * h, h)
    for i in range(config["depth"]):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            out[f"{p}_attn.qkv.weight"], out[f"{p}_attn.proj.weight"] = (3 * h, h), (h, h)
            out[f"{p}_mlp.0.weight"], out[f"{p}_mlp.2.weight"] = (2 * mlp, h), (h, mlp)
            out[f"{p}_attn.norm.query_norm.scale"] = out[f"{p}_attn.norm.key_norm.scale"] = (hd,)
    for i in range(config["depth_single_blocks"]):
        p = f"single_blocks.{i}"
        out[f"{p}.linear1.weight"], out[f"{p}.linear2.weight"] = (3 * h + 2 * mlp, h), (h, h + mlp)
        out[f"{p}.norm.query_norm.scale"] = out[f"{p}.norm.key_norm.scale"] = (hd,)
    out["final_layer.linear.weight"] = (config.get("out_channels", config["in_channels"]), h)
    out["final_layer.adaLN_modulation.1.weight"] = (2 * h, h)
    return out


# ---- diffusers FluxTransformer2DModel / Flux2Transformer2DModel -> BFL ----------------------------------------
# Each BFL tensor is built from one or more diffusers tensors concatenated along dim 0 (fused q/k/v);
# `swap` marks diffusers' final norm, whose output halves are (scale, shift) where BFL has (shift, scale).
# FLUX.2 names from diffusers' transformer_flux2.py (Flux2Transformer2DModel): feed-forwards `ff.linear_in` /
# `ff.linear_out` (SwiGLU halves in BFL's order), single blocks fused `attn.to_qkv_mlp_proj` / `attn.to_out`,
# global `*_modulation.linear`, `time_guidance_embed.*`.

_DOUBLE = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.proj": ["attn.to_add_out"],
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
}
_DOUBLE_NORMS = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                 "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}
_SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")

_DOUBLE2 = {**{k: v for k, v in _DOUBLE.items() if "_mod." not in k and "_mlp." not in k},
            "img_mlp.0": ["ff.linear_in"], "img_mlp.2": ["ff.linear_out"],
            "txt_mlp.0": ["ff_context.linear_in"], "txt_mlp.2": ["ff_context.linear_out"]}
_SINGLE2 = {"linear1": ["attn.to_qkv_mlp_proj"], "linear2": ["attn.to_out"]}
_TOP2 = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
}


def diffusers_tables(keys) -> tuple:
    """(top-level, double-block, single-block) name tables for a diffusers FLUX.1 or FLUX.2 file."""
    if FLUX2_DIFFUSERS_KEY in set(keys):
        return _TOP2, _DOUBLE2, _SINGLE2
    return _TOP, _DOUBLE, _SINGLE


def diffusers_plan(keys) -> dict:
    """{BFL tensor name: (list of diffusers source keys concatenated along dim 0, swap_halves)} for the
    diffusers keys present in `keys` (unprefixed). Raises on diffusers keys it cannot place."""
    keys = set(keys)
    plan = {}
    top, double, single = diffusers_tables(keys)

    def add(bfl_layer, srcs, swap=False):
        for end in ("weight", "bias"):
            names = [f"{s}.{end}" for s in srcs]
            present = [n for n in names if n in keys]
            if not present:
                continue
            if len(present) != len(names):
                missing = sorted(set(names) - set(present))
                raise ValueError(f"{bfl_layer}.{end}: diffusers tensors {missing} are missing (needed with {present})")
            plan[f"{bfl_layer}.{end}"] = (names, swap)

    for bfl, d in top.items():
        add(bfl, [d])
    add(FINAL_MOD[0], [FINAL_MOD[1]], swap=True)
    for i in range(_count(keys, r"^transformer_blocks\.(\d+)\.")):
        for bfl, srcs in double.items():
            add(f"double_blocks.{i}.{bfl}", [f"transformer_blocks.{i}.{s}" for s in srcs])
        for bfl, d in _DOUBLE_NORMS.items():
            plan[f"double_blocks.{i}.{bfl}.scale"] = ([f"transformer_blocks.{i}.{d}.weight"], False)
    for i in range(_count(keys, r"^single_transformer_blocks\.(\d+)\.")):
        for bfl, srcs in single.items():
            add(f"single_blocks.{i}.{bfl}", [f"single_transformer_blocks.{i}.{s}" for s in srcs])
        for bfl, d in _SINGLE_NORMS.items():
            plan[f"single_blocks.{i}.{bfl}.scale"] = ([f"single_transformer_blocks.{i}.{d}.weight"], False)
    used = {k for srcs, _ in plan.values() for k in srcs}
    missing = sorted(k for k in used if k not in keys)
    if missing:
        raise ValueError(f"diffusers FLUX file lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    unknown = sorted(keys - used)
    if unknown:
        raise ValueError(f"diffusers FLUX tensor {unknown[0]} has no BFL counterpart "
                         f"({len(unknown)} such tensors; not a FluxTransformer2DModel / Flux2Transformer2DModel file?)")
    return plan


def bfl_plan(keys) -> dict:
    """Same shape of plan for a BFL file; norm `.weight` spellings become `.scale`."""
    plan = {}
    for k in keys:
        out = k[: -len(".weight")] + ".scale" if re.search(r"_norm\.weight$", k) else k
        plan[out] = ([k], False)
    return plan
