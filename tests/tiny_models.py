"""Seeded tiny FLUX / T5 state dicts and files for tests (no ComfyUI needed).

TINY_FLUX_CONFIG keeps head dim 128 (ComfyUI derives num_heads = hidden // 128) and a text width equal to
the tiny T5's d_model, so the two work together in ComfyUI (T5 through model_options["t5xxl_model_config"]).
img_in reads 64 channels (16 latent channels x 2x2 patches) as in real FLUX. Weights are heavy-tailed
(Student-t) with a few outlier input channels, like real transformer weights.
"""
import os
import tempfile

import torch
from safetensors.torch import save_file

from comfyui_lowbit.checkpoint import flux, llm, t5

TINY_T5_CONFIG = dict(d_ff=256, d_kv=64, d_model=128, num_heads=2, num_layers=2, vocab_size=32128,
                      dense_act_fn="gelu_pytorch_tanh", is_gated_act=True, model_type="t5",
                      relative_attention_num_buckets=32, layer_norm_epsilon=1e-6)
TINY_FLUX_CONFIG = dict(in_channels=64, vec_in_dim=768, context_in_dim=TINY_T5_CONFIG["d_model"],
                        hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
                        axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, guidance_embed=True)
# FLUX.2-shaped (ComfyUI's image_model flux2): text width 384 = 3 x the tiny FLUX.2 text encoders' width 128
# (ComfyUI stacks three of their layers); [klein] has no guidance embedder, [dev] has one
TINY_FLUX2_CONFIG = dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=384,
                         hidden_size=256, mlp_ratio=3.0, num_heads=2, depth=2, depth_single_blocks=2,
                         axes_dim=[32, 32, 32, 32], theta=2000, qkv_bias=False, guidance_embed=False)
TINY_TE_WIDTH = 128
OUTLIER_COLUMNS = 3
TAIL_DOF = 6  # Student-t degrees of freedom: heavier tails than Gaussian, milder than real outliers


def _value(name: str, shape, g: torch.Generator) -> torch.Tensor:
    if name.endswith(".scale") or "norm" in name and name.endswith(".weight") and len(shape) == 1:
        return 1 + 0.1 * torch.randn(shape, generator=g)
    if len(shape) == 1:
        return 0.02 * torch.randn(shape, generator=g)
    n, k = shape
    z = torch.randn(n, k, generator=g)
    chi2 = sum(torch.randn(n, k, generator=g) ** 2 for _ in range(TAIL_DOF)) / TAIL_DOF
    w = z / chi2.sqrt() * ((TAIL_DOF - 2) / TAIL_DOF / k) ** 0.5  # unit-variance Student-t, / sqrt(fan_in)
    cols = torch.randperm(k, generator=g)[:OUTLIER_COLUMNS]
    w[:, cols] *= 3.0
    return w


def tiny_flux_state_dict(seed=0, naming="bfl", dtype=torch.bfloat16, prefix="", config=None, **overrides) -> dict:
    """A tiny FLUX transformer. naming: "bfl" (ComfyUI/BFL keys) or "diffusers" (FluxTransformer2DModel);
    `prefix` is prepended to every key (e.g. "model.diffusion_model."); overrides change TINY_FLUX_CONFIG
    (e.g. guidance_embed=False for a schnell-like model)."""
    cfg = {**TINY_FLUX_CONFIG, **(config or {}), **overrides}
    g = torch.Generator().manual_seed(seed)
    sd = {k: _value(k, s, g).to(dtype) for k, s in sorted(flux.expected_shapes(cfg).items())}
    if naming == "diffusers":
        sd = bfl_to_diffusers(sd)
    elif naming != "bfl":
        raise ValueError(f"naming must be 'bfl' or 'diffusers', got {naming!r}")
    return {prefix + k: v for k, v in sd.items()}


def tiny_flux2_state_dict(seed=0, naming="bfl", dtype=torch.bfloat16, prefix="", **overrides) -> dict:
    """A tiny FLUX.2 transformer (TINY_FLUX2_CONFIG with overrides, e.g. guidance_embed=True for [dev])."""
    return tiny_flux_state_dict(seed, naming, dtype, prefix, config={**TINY_FLUX2_CONFIG, **overrides})


def bfl_to_diffusers(sd: dict) -> dict:
    """Split a BFL state dict into diffusers names (the inverse of flux.diffusers_plan)."""
    plan = flux.diffusers_plan(_diffusers_keys(sd))
    out = {}
    for bfl, (srcs, swap) in plan.items():
        t = sd[bfl]
        if swap:
            shift, scale = t.chunk(2, dim=0)
            t = torch.cat([scale, shift], dim=0)
        h = sd["img_in.weight"].shape[0]
        sizes = [h] * len(srcs)
        if len(srcs) == 4:  # single block linear1: q, k, v, proj_mlp
            sizes[-1] = t.shape[0] - 3 * h
        for name, part in zip(srcs, t.split(sizes, dim=0) if len(srcs) > 1 else [t]):
            out[name] = part.clone()
    return out


def _diffusers_keys(sd: dict) -> list:
    """The diffusers key names a BFL state dict maps to (needed to build the plan before splitting)."""
    keys = []
    top, double, single = flux.diffusers_tables([flux.FLUX2_DIFFUSERS_KEY] if flux.FLUX2_KEY in sd else [])
    inv_top = {**top, flux.FINAL_MOD[0]: flux.FINAL_MOD[1]}
    for k in sd:
        layer, _, end = k.rpartition(".")
        if layer in inv_top:
            keys.append(f"{inv_top[layer]}.{end}")
            continue
        parts = layer.split(".")
        kind, i, rest = parts[0], parts[1], ".".join(parts[2:])
        if kind == "double_blocks":
            src, lin, norms = f"transformer_blocks.{i}", double, flux._DOUBLE_NORMS
        else:
            src, lin, norms = f"single_transformer_blocks.{i}", single, flux._SINGLE_NORMS
        if rest in lin:
            keys += [f"{src}.{s}.{end}" for s in lin[rest]]
        else:
            keys.append(f"{src}.{norms[rest]}.weight")
    return keys


def tiny_t5_state_dict(seed=0, dtype=torch.bfloat16, config=None) -> dict:
    """A tiny T5 encoder with ComfyUI's T5 key names (gated GELU, relative bias in block 0)."""
    c = {**TINY_T5_CONFIG, **(config or {})}
    shapes = t5.expected_shapes(c)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in sorted(shapes.items()):
        if k in ("shared.weight",) or "relative_attention_bias" in k:
            sd[k] = torch.randn(s, generator=g).to(dtype)
        else:
            sd[k] = _value(k, s, g).to(dtype)
    return sd


def tiny_clip_l_state_dict(seed=0, dtype=torch.float16, hidden=128, layers=2, vocab=1000) -> dict:
    """A small CLIP text encoder with CLIP-L's key names (ComfyUI itself only loads the full-size CLIP-L)."""
    shapes = {"text_model.embeddings.token_embedding.weight": (vocab, hidden),
              "text_model.embeddings.position_embedding.weight": (77, hidden),
              "text_model.final_layer_norm.weight": (hidden,), "text_model.final_layer_norm.bias": (hidden,),
              "text_projection.weight": (hidden, hidden)}
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}"
        for n in ("q", "k", "v", "out"):
            shapes[f"{p}.self_attn.{n}_proj.weight"], shapes[f"{p}.self_attn.{n}_proj.bias"] = (hidden, hidden), (hidden,)
        shapes[f"{p}.mlp.fc1.weight"], shapes[f"{p}.mlp.fc1.bias"] = (4 * hidden, hidden), (4 * hidden,)
        shapes[f"{p}.mlp.fc2.weight"], shapes[f"{p}.mlp.fc2.bias"] = (hidden, 4 * hidden), (hidden,)
        for n in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}.{n}.weight"], shapes[f"{p}.{n}.bias"] = (hidden,), (hidden,)
    g = torch.Generator().manual_seed(seed)
    sd = {k: _value(k, s, g).to(dtype) for k, s in sorted(shapes.items())}
    sd["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    return sd


# FLUX.2 text encoders in ComfyUI's names (checkpoint/llm.py) at width 128: ComfyUI stacks the outputs of layers
# 9, 18, 27 (Qwen3) / 10, 20, 30 (Mistral 3), so they keep 28 / 40 layers; Qwen3 keeps the real vocabulary (its
# tokenizer ships with ComfyUI), Mistral a 512-entry tekken vocabulary written into the file as ComfyUI's is
TINY_QWEN3_CONFIG = dict(model_type="qwen3_4b", vocab_size=151936, hidden_size=TINY_TE_WIDTH, intermediate_size=256,
                         num_hidden_layers=28, num_attention_heads=1, num_key_value_heads=1, q_norm=True,
                         final_norm=True, lm_head=False)
TINY_MISTRAL_CONFIG = dict(model_type="mistral3_24b", vocab_size=512, hidden_size=TINY_TE_WIDTH, intermediate_size=256,
                           num_hidden_layers=40, num_attention_heads=1, num_key_value_heads=1, q_norm=False,
                           final_norm=True, lm_head=False)
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                    "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")


def tiny_tekken(vocab_size: int = 512) -> torch.Tensor:
    """A byte-level tekken tokenizer JSON (Mistral's format: special tokens, then 256 byte tokens) as the uint8
    tensor ComfyUI's FLUX.2 text-encoder file carries under `tekken_model`."""
    import base64
    import json

    data = {"config": {"pattern": TEKKEN_PATTERN, "default_vocab_size": vocab_size,
                       "default_num_special_tokens": len(MISTRAL_SPECIALS)},
            "special_tokens": [{"rank": i, "token_str": t, "is_control": True} for i, t in enumerate(MISTRAL_SPECIALS)],
            "vocab": [{"rank": i, "token_bytes": base64.b64encode(bytes([i])).decode()} for i in range(256)]}
    return torch.frombuffer(bytearray(json.dumps(data).encode()), dtype=torch.uint8).clone()


def tiny_llm_state_dict(config=None, seed=0, dtype=torch.bfloat16) -> dict:
    """A tiny FLUX.2 text encoder (TINY_QWEN3_CONFIG by default) in ComfyUI's key names; Mistral-shaped ones carry
    a tekken tokenizer. The layers writing into the residual stream (o_proj, down_proj) are scaled by
    1 / sqrt(2 x layers), GPT-2's residual init, so that 28-40 random layers do not each replace the stream."""
    c = dict(config or TINY_QWEN3_CONFIG)
    g = torch.Generator().manual_seed(seed)
    residual = (2 * c["num_hidden_layers"]) ** -0.5
    sd = {}
    for k, shape in sorted(llm.expected_shapes(c).items()):
        v = torch.randn(shape, generator=g) if k == "model.embed_tokens.weight" else _value(k, shape, g)
        sd[k] = (v * residual if k.endswith(("o_proj.weight", "down_proj.weight")) else v).to(dtype)
    if c["model_type"] == "mistral3_24b":
        sd["tekken_model"] = tiny_tekken(c["vocab_size"])
    return sd


def write_tiny_llm(path, config=None, seed=0) -> str:
    return _save(tiny_llm_state_dict(config, seed), path)


def write_tiny_lowbit_llm(path, config=None, seed=0) -> str:
    from comfyui_lowbit import checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        src = write_tiny_llm(os.path.join(tmp, "tiny_te.safetensors"), config, seed)
        checkpoint.quantize_file(src, str(path), "w4a16", force=True)
    return str(path)


def _save(sd: dict, path, metadata=None) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=metadata)
    return path


def write_tiny_flux(path, seed=0, naming="bfl", dtype=torch.bfloat16, prefix="", **overrides) -> str:
    """A 16-bit tiny FLUX safetensors file at `path`."""
    return _save(tiny_flux_state_dict(seed, naming, dtype, prefix, **overrides), path)


def write_tiny_flux2(path, seed=0, naming="bfl", dtype=torch.bfloat16, prefix="", **overrides) -> str:
    """A 16-bit tiny FLUX.2 safetensors file at `path`."""
    return _save(tiny_flux2_state_dict(seed, naming, dtype, prefix, **overrides), path)


def write_tiny_t5(path, seed=0, dtype=torch.bfloat16) -> str:
    return _save(tiny_t5_state_dict(seed, dtype), path)


FAST = {"iters": 3}  # few low-rank refinement steps: seconds instead of a minute on a busy CPU


def write_tiny_lowbit_flux(path, fmt="svdq_w4a4", rank=16, seed=0, calib=None, options=FAST, **overrides) -> str:
    """A lowbit tiny FLUX checkpoint at `path`, quantized through checkpoint.quantize_file
    (options=None for the quantizers' full defaults)."""
    from comfyui_lowbit import checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        src = write_tiny_flux(os.path.join(tmp, "tiny_flux.safetensors"), seed=seed, **overrides)
        checkpoint.quantize_file(src, str(path), fmt, rank=rank, calib=calib, force=True, options=options)
    return str(path)


def write_tiny_lowbit_flux2(path, fmt="svdq_w4a4", rank=16, seed=0, calib=None, options=FAST, **overrides) -> str:
    """A lowbit tiny FLUX.2 checkpoint at `path`, quantized through checkpoint.quantize_file."""
    from comfyui_lowbit import checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        src = write_tiny_flux2(os.path.join(tmp, "tiny_flux2.safetensors"), seed=seed, **overrides)
        checkpoint.quantize_file(src, str(path), fmt, rank=rank, calib=calib, force=True, options=options)
    return str(path)


def write_tiny_lowbit_t5(path, seed=0, group_size=64) -> str:
    from comfyui_lowbit import checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        src = write_tiny_t5(os.path.join(tmp, "tiny_t5.safetensors"), seed=seed)
        checkpoint.quantize_file(src, str(path), "w4a16", force=True, group_size=group_size)
    return str(path)
