"""Models for the DynamicVRAM streaming step of the GPU run (gpu_comfyui_worker.py --stream-cards; issue 27), built
in memory without files, with ComfyUI's own classes and our operations:

- a FLUX.2 [dev]-shaped lowbit transformer: ComfyUI's flux2 detection (comfy.model_detection) reads a probe of the
  keys FLUX.2 [dev] has (meta tensors), ComfyUI's Flux class built from that config on the meta device lists
  every tensor, and comfy.sd.load_diffusion_model_state_dict loads the result with our operations as our loader
  does. Block linears are W4A4 (rank 32), the global modulations W4A16, the rest 16-bit; the quantized tensors
  are random and shared by all layers of a shape (sizes, transfers and kernel work are a real FLUX.2 [dev]'s,
  host memory is not; outputs are meaningless). It needs no FLUX.2 checkpoint layout of ours.
- FLUX.1's text encoders: a T5-XXL-shaped lowbit T5 (w4a16, random codes shared per shape) and a random 16-bit
  CLIP-L, through comfy.sd.load_text_encoder_state_dicts with our operations. Where ComfyUI's tokenizer data is
  absent (the copy gpu_carry.py makes has none) a tokenizer of fixed tokens stands in for FLUX's.
"""
import re

import torch

GB = 1024 ** 3
FLUX2_DEV = dict(hidden=6144, context=15360, depth=8, single=48)
FLUX2_SMALL = dict(hidden=256, context=256, depth=1, single=2)
T5_XXL = dict(d_ff=10240, d_kv=64, d_model=4096, num_heads=64, num_layers=24, vocab_size=32128,
              dense_act_fn="gelu_pytorch_tanh", is_gated_act=True, model_type="t5", relative_attention_num_buckets=32,
              layer_norm_epsilon=1e-6)
T5_SMALL = dict(T5_XXL, d_ff=512, d_model=256, num_heads=4, num_layers=2)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77)
RANK = 32
_W4A4 = re.compile(r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])|single_blocks\.\d+\.linear[12])$")
_W4A16 = re.compile(r"^(double_stream_modulation_(img|txt)|single_stream_modulation)\.lin$")


def _float(key: str, shape, g) -> torch.Tensor:
    if key.endswith(".scale") or "norm" in key:
        return torch.ones(shape, dtype=torch.bfloat16)
    if len(shape) == 1:
        return torch.zeros(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=g) / shape[-1] ** 0.5).to(torch.bfloat16)


def _packed(fmt: str, n: int, k: int, g, cache: dict):
    """Random packed tensors of a (fmt, N, K) layer, one set per shape."""
    from comfyui_lowbit.quant_ops import W4A4Weights, W4A16Weights

    key = (fmt, n, k)
    if key not in cache:
        codes = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
        scales = torch.full((k // 64, n), 1.0 / (4 * k ** 0.5), dtype=torch.bfloat16)
        if fmt == "svdq_w4a4":
            cache[key] = W4A4Weights(codes, scales, torch.ones(k, dtype=torch.bfloat16),
                                     (torch.randn(k, RANK, generator=g) / k ** 0.5).to(torch.bfloat16),
                                     (0.02 * torch.randn(n, RANK, generator=g)).to(torch.bfloat16))
        else:
            cache[key] = W4A16Weights(codes, scales)
    return cache[key]


def _lowbit_state_dict(shapes: dict, format_of, seed: int):
    """(state dict, lowbit.layers) for {key: shape} where format_of(layer) names the quantized layers."""
    g = torch.Generator().manual_seed(seed)
    sd, layers, cache = {}, {}, {}
    for key, shape in shapes.items():
        layer, _, end = key.rpartition(".")
        fmt = format_of(layer) if end == "weight" and len(shape) == 2 else None
        if fmt is None:
            if not (end == "bias" and format_of(layer)):
                sd[key] = _float(key, shape, g)
            continue
        packed = _packed(fmt, shape[0], shape[1], g, cache)
        layers[layer] = packed.config()
        sd.update({f"{layer}.{k}": v for k, v in packed.tensors().items()})
    return sd, layers


def flux2_shapes(small: bool = False) -> dict:
    """{key: shape} of a FLUX.2 [dev]-shaped transformer, as ComfyUI's detection and Flux class make it."""
    import comfy.ldm.flux.model
    import comfy.model_detection
    import comfy.ops

    c = FLUX2_SMALL if small else FLUX2_DEV
    meta = lambda *s: torch.empty(s, device="meta")  # noqa: E731
    probe = {"img_in.weight": meta(c["hidden"], 128), "txt_in.weight": meta(c["hidden"], c["context"]),
             "double_stream_modulation_img.lin.weight": meta(6 * c["hidden"], c["hidden"]),
             "guidance_in.in_layer.weight": meta(c["hidden"], 256)}
    probe.update({f"double_blocks.{i}.img_attn.norm.key_norm.scale": meta(128) for i in range(c["depth"])})
    probe.update({f"single_blocks.{i}.norm.key_norm.scale": meta(128) for i in range(c["single"])})
    config = comfy.model_detection.detect_unet_config(probe, "")
    if config.get("image_model") != "flux2":
        raise RuntimeError(f"ComfyUI did not detect the FLUX.2 probe as flux2: {config}")
    model = comfy.ldm.flux.model.Flux(**config, dtype=torch.bfloat16, device="meta", operations=comfy.ops.manual_cast)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_flux2(small: bool = False, seed: int = 0):
    """A ModelPatcher (wrapped as our loader wraps it) of a FLUX.2 [dev]-shaped lowbit transformer; (patcher, info)."""
    import comfy.sd

    from comfyui_lowbit import quant_ops
    from comfyui_lowbit.nodes.ops import make_ops
    from comfyui_lowbit.nodes.patcher import wrap_patcher

    def format_of(layer):
        return "svdq_w4a4" if _W4A4.match(layer) else "w4a16" if _W4A16.match(layer) else None

    shapes = flux2_shapes(small)
    sd, layers = _lowbit_state_dict(shapes, format_of, seed)
    ops = make_ops(layers, torch.bfloat16, source="FLUX.2-dev-shaped (in memory)")
    mp = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": ops, "dtype": torch.bfloat16})
    if mp is None or type(mp.model).__name__ != "Flux2":
        raise RuntimeError(f"ComfyUI did not build a Flux2 model from the FLUX.2-shaped state dict: {type(mp.model) if mp else None}")
    quant_ops.set_activations(mp.model.diffusion_model, "auto", mp.load_device)
    c = FLUX2_SMALL if small else FLUX2_DEV
    return wrap_patcher(mp), {"context_in_dim": c["context"], "vec_in_dim": None, "latent_channels": 128,
                              "downscale": 16, "layers": len(layers)}


class FixedTokens:
    """FLUX's tokenizer interface (CLIP-L + T5) giving the same tokens for any text: ComfyUI builds a CLIP only with
    a tokenizer, and the carried ComfyUI copy has no vocabularies."""

    def __init__(self, embedding_directory=None, tokenizer_data={}, t5_tokens: int = 512):
        self.t5_tokens = t5_tokens

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        word = (0,) if return_word_ids else ()
        clip = [(49406, 1.0, *word)] + [(320 + i, 1.0, *word) for i in range(20)] + [(49407, 1.0, *word)] * 56
        t5 = [(100 + i % 30000, 1.0, *word) for i in range(self.t5_tokens - 1)] + [(1, 1.0, *word)]
        return {"l": [clip], "t5xxl": [t5]}

    def untokenize(self, token_weight_pair):
        return token_weight_pair

    def state_dict(self):
        return {}


def tokenizer_data_present() -> bool:
    import os

    import comfy.text_encoders.flux as flux_te

    here = os.path.dirname(os.path.dirname(flux_te.__file__))
    return (os.path.isfile(os.path.join(here, "sd1_tokenizer", "vocab.json"))
            and os.path.isfile(os.path.join(here, "text_encoders", "t5_tokenizer", "tokenizer.json")))


def load_flux1_text_encoders(small: bool = False, seed: int = 1, fixed_tokens: bool | None = None, d_model=None):
    """(CLIP with a lowbit T5-XXL-shaped T5 and a 16-bit CLIP-L, wrapped as our loader does; info). small: a
    2-layer T5 of width d_model (default 256: the reduced FLUX's text width)."""
    import comfy.sd
    import comfy.text_encoders.flux as flux_te

    from comfyui_lowbit.checkpoint import clip_l, families, t5
    from comfyui_lowbit.nodes.ops import make_ops
    from comfyui_lowbit.nodes.patcher import wrap_patcher

    cfg = dict(T5_SMALL, d_model=d_model or T5_SMALL["d_model"]) if small else T5_XXL
    t5_sd, layers = _lowbit_state_dict(t5.expected_shapes(cfg), lambda layer: families.T5.layer_format(layer, "w4a16"), seed)
    g = torch.Generator().manual_seed(seed + 1)
    clip_sd = {k: _float(k, s, g) for k, s in clip_l.expected_shapes(CLIP_L).items()}
    clip_sd["text_projection.weight"] = _float("text_projection.weight", (768, 768), g)
    options = {"custom_operations": make_ops(layers, torch.bfloat16, source="T5-XXL-shaped (in memory)")}
    if small:
        options["t5xxl_model_config"] = {k: v for k, v in cfg.items() if k != "model_type"}
    real = flux_te.FluxTokenizer
    if fixed_tokens is None:
        fixed_tokens = not tokenizer_data_present()
    if fixed_tokens:
        flux_te.FluxTokenizer = FixedTokens
    try:
        clip = comfy.sd.load_text_encoder_state_dicts(state_dicts=[t5_sd, clip_sd], clip_type=comfy.sd.CLIPType.FLUX,
                                                      model_options=options)
    finally:
        flux_te.FluxTokenizer = real
    clip.patcher = wrap_patcher(clip.patcher)
    t5_bytes = sum(v.nbytes for k, v in t5_sd.items() if k.rpartition(".")[0] in layers)
    return clip, {"t5_quantized_gb": t5_bytes / GB, "fixed_tokens": fixed_tokens, "t5_layers": len(layers)}
