"""Loader nodes: lowbit FLUX.1 / FLUX.2 diffusion models, FLUX.1 text encoders (lowbit T5 and/or CLIP-L) and the
FLUX.2 text encoder (lowbit Mistral 3 / Qwen3)."""
import logging
import os

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sd
import comfy.utils
import folder_paths

from .. import kernels, quant_ops
from .ops import lowbit_modules, make_ops
from .patcher import wrap_patcher

log = logging.getLogger("comfyui_lowbit")

DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
T5_CONFIG_KEYS = ("d_ff", "d_kv", "d_model", "num_heads", "num_layers", "vocab_size", "dense_act_fn",
                  "is_gated_act", "relative_attention_num_buckets", "layer_norm_epsilon")


def check_backend(backend: str) -> None:
    """Refuse backend=triton where ComfyUI runs on the CPU: the Triton kernels are GPU code (Triton's
    interpreter, TRITON_INTERPRET=1, runs them on CPU tensors, slowly, for debugging)."""
    if backend not in kernels.BACKENDS:
        raise ValueError(f"backend must be one of {kernels.BACKENDS}, got {backend!r}")
    if backend != "triton":
        return
    device = comfy.model_management.get_torch_device()
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' needs a GPU, but ComfyUI runs on the CPU here (--cpu or no GPU found); "
                         "choose 'auto' or 'reference' (TRITON_INTERPRET=1 runs the Triton kernels on the CPU, "
                         "for debugging only)")
    kernels.set_backend("triton")
    try:
        kernels.backend_for(device)  # imports the kernels now, so a broken Triton fails at load, not mid-sampling
    finally:
        kernels.set_backend(None)


def _backend_wrapper(backend: str):
    """An APPLY_MODEL wrapper that runs this model's calls on `backend` (the choice is per model, not global)."""

    def wrapper(executor, *args, **kwargs):
        kernels.set_backend(backend)
        try:
            return executor(*args, **kwargs)
        finally:
            kernels.set_backend(None)

    return wrapper


ACTIVATIONS_TIP = ("Activation quantization of the 4-bit and ternary layers (the weights are the same): int4 is "
                   "SVDQuant's own; int8 (per token, int8 tensor cores, any recent GPU) and fp8 (e4m3 per token, FP8 "
                   "tensor cores: RTX 40xx / H100 and newer) are more accurate; auto picks per GPU family (int8 on "
                   "RTX 30/40/50 and A100, fp8 on H100/H200), int4 on the CPU.")


def _set_activations(model, mode: str, device) -> None:
    got = quant_ops.set_activations(model, mode, device)
    log.info("comfyui-lowbit: %s activations on %s", got, device)


def load_lowbit_diffusion_model(path: str, dtype: torch.dtype | None = None, backend: str = "auto",
                                activations: str = "auto", disable_dynamic: bool = False):
    """A ComfyUI ModelPatcher for a lowbit FLUX checkpoint (or a Nunchaku INT4 FLUX file) at `path`."""
    from .. import checkpoint
    from ..checkpoint import nunchaku

    check_backend(backend)
    try:
        info = checkpoint.read_info(path)
    except checkpoint.NotALowbitCheckpoint:
        if not nunchaku.is_nunchaku(path):
            raise
        info = None  # a Nunchaku INT4 FLUX file: converted in memory below
    if info is not None and info.model != "flux":
        raise ValueError(f"{path}: a lowbit {info.model!r} checkpoint ({info.family.title}), expected a FLUX diffusion "
                         f"model (lowbit.model = 'flux'); load text encoders with 'Load LowBit Text Encoders (FLUX)' "
                         f"(T5 / CLIP-L) or 'Load LowBit Text Encoder (FLUX.2)' (Mistral 3 / Qwen3)")
    sd, info = checkpoint.load_checkpoint(path) if info is not None else nunchaku.load_nunchaku(path)
    options = {"custom_operations": make_ops(info.layers, dtype, source=path)}
    if dtype is not None:
        options["dtype"] = dtype
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options, disable_dynamic=disable_dynamic)
    if patcher is None:
        raise RuntimeError(f"{path}: ComfyUI could not detect a FLUX model in this lowbit checkpoint "
                           f"(keys such as img_in.weight and double_blocks.0.img_attn.norm.key_norm.scale are expected)")
    n_quant = len(lowbit_modules(patcher.model.diffusion_model))
    if n_quant != len(info.layers):
        raise ValueError(f"{path}: lowbit.layers lists {len(info.layers)} quantized layers but the model took "
                         f"{n_quant}; the layer names do not match ComfyUI's FLUX")
    if backend != "auto":
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "lowbit_backend",
                                     _backend_wrapper(backend))
    _set_activations(patcher.model.diffusion_model, activations, patcher.load_device)
    patcher.cached_patcher_init = (load_lowbit_diffusion_model, (path, dtype, backend, activations))
    return wrap_patcher(patcher)


BACKEND_INPUT = (list(kernels.BACKENDS), {
    "default": "auto", "tooltip": "auto: Triton kernels on a GPU, the PyTorch reference on CPU. reference: exact PyTorch "
                                  "path everywhere (slow). triton: require the Triton kernels (an error on a CPU-only "
                                  "ComfyUI)."})
DTYPE_INPUT = (list(DTYPES), {
    "default": "auto", "tooltip": "16-bit dtype of the model's 16-bit weights, scales and low-rank branch; ComfyUI "
                                  "computes in it on a GPU (on CPU it casts to float32). auto lets ComfyUI pick "
                                  "(float16 on GPUs without bfloat16)."})


class LowBitDiffusionModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (folder_paths.get_filename_list("diffusion_models"),
                           {"tooltip": "A lowbit FLUX.1 or FLUX.2 checkpoint (4-bit SVDQuant W4A4 or 1.58-bit ternary) in "
                                       "models/diffusion_models."}),
            "backend": BACKEND_INPUT,
            "compute_dtype": DTYPE_INPUT,
        }, "optional": {
            "activations": (list(quant_ops.ACTIVATIONS), {"default": "auto", "tooltip": ACTIVATIONS_TIP}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "lowbit"
    DESCRIPTION = ("Loads a lowbit FLUX.1 or FLUX.2 diffusion model as ComfyUI's own FLUX (detected from the file, as "
                   "Load Diffusion Model does) with quantized linear layers.")

    def load(self, model_name, backend="auto", compute_dtype="auto", activations="auto"):
        path = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        return (load_lowbit_diffusion_model(path, DTYPES[compute_dtype], backend, activations),)


QUANTIZE_ON_LOAD_INPUTS = {
    "quantize_16bit": ("BOOLEAN", {"default": False,
                       "tooltip": "Quantize a 16-bit (or fp8) text encoder to W4A16 on the first load and keep it in "
                                  "models/lowbit_cache; later loads read the cached file. A lowbit file loads as it "
                                  "is."}),
    "cache_limit_gb": ("FLOAT", {"default": 64.0, "min": 0.0, "max": 100000.0, "step": 1.0,
                       "tooltip": "Size limit of models/lowbit_cache in GB: the least recently used entries are "
                                  "removed to make room for a new one (0: no limit)."}),
}


def _quantized_text_encoders(paths, cache_limit_gb, load):
    from .quantize_on_load import _gb_to_bytes, quantize_text_encoders

    return quantize_text_encoders(paths, _gb_to_bytes(cache_limit_gb, "cache_limit_gb"), load)


def _read_text_encoder(path: str):
    """(state dict, lowbit info or None) for a lowbit or ordinary 16-bit text encoder file."""
    from .. import checkpoint

    try:
        info = checkpoint.read_info(path)
    except checkpoint.NotALowbitCheckpoint:
        return comfy.utils.load_torch_file(path, safe_load=True), None
    if info.model == "flux":
        raise ValueError(f"{path}: a lowbit 'flux' checkpoint, expected a text encoder (T5 or CLIP-L); "
                         f"load FLUX models with 'Load LowBit Diffusion Model'")
    if info.model == "llm":
        raise ValueError(f"{path}: a lowbit FLUX.2 text encoder ({info.config.get('model_type') if info.config else '?'}), "
                         f"not T5 / CLIP-L; load it with 'Load LowBit Text Encoder (FLUX.2)'")
    return checkpoint.load_checkpoint(path)


def _logical_shape(sd: dict, layers: dict, key: str) -> tuple:
    """Shape of `key` as the 16-bit model has it (a quantized layer's weight is packed in the file)."""
    layer, _, end = key.rpartition(".")
    if end == "weight" and layer in layers:
        return (layers[layer]["out_features"], layers[layer]["in_features"])
    return tuple(sd[key].shape)


CLIP_L_SIZE = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12}


def _clip_l_config(sd: dict, layers: dict) -> dict | None:
    """ComfyUI's CLIP-L config overrides for a CLIP-L whose sizes differ from OpenAI's (None if they match).
    Heads are not in the shapes: head width 64, as in CLIP-L."""
    emb = "text_model.embeddings.token_embedding.weight"
    if emb not in sd:
        return None
    vocab, hidden = sd[emb].shape
    n_layers = len({k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layers.")})
    cfg = {"hidden_size": hidden, "num_hidden_layers": n_layers, "num_attention_heads": max(1, hidden // 64),
           "intermediate_size": _logical_shape(sd, layers, "text_model.encoder.layers.0.mlp.fc1.weight")[0],
           "vocab_size": vocab,
           "max_position_embeddings": sd["text_model.embeddings.position_embedding.weight"].shape[0]}
    if all(cfg[k] == v for k, v in CLIP_L_SIZE.items()):
        return None
    return cfg


def _t5_config(sd: dict, layers: dict, info) -> dict | None:
    """ComfyUI's T5 config overrides when the encoder is not T5-XXL's size (None if it is)."""
    from ..checkpoint import t5

    if info is not None and info.model == "t5" and info.config:
        cfg = {k: info.config[k] for k in T5_CONFIG_KEYS if k in info.config}
    elif t5.is_t5(sd):
        cfg = t5.infer_config({k: _logical_shape(sd, layers, k) for k in sd})
    else:
        return None
    if (cfg.get("d_model"), cfg.get("num_layers"), cfg.get("d_ff")) == (4096, 24, 10240):
        return None
    return {k: cfg[k] for k in T5_CONFIG_KEYS if k in cfg}


def load_lowbit_text_encoders(paths: list[str], dtype: torch.dtype | None = None):
    """A ComfyUI CLIP (FLUX: CLIP-L + T5-XXL) from files of which any may be lowbit. Encoders smaller
    than CLIP-L / T5-XXL (tests, distilled encoders) get ComfyUI config overrides read from their shapes."""
    state_dicts, layers, options = [], {}, {}
    for path in paths:
        sd, info = _read_text_encoder(path)
        state_dicts.append(sd)
        own = info.layers if info is not None else {}
        clash = set(layers) & set(own)
        if clash:
            raise ValueError(f"{path}: quantized layer names also in another text encoder file: {sorted(clash)[:3]}")
        layers.update(own)
        t5_cfg, clip_cfg = _t5_config(sd, own, info), _clip_l_config(sd, own)
        if t5_cfg:
            options["t5xxl_model_config"] = t5_cfg
        if clip_cfg:
            # load_text_encoder_state_dicts rebuilds clip_l_model_config from model_options["model_config"]
            # (comfy/text_encoders/long_clipl.py), so the overrides go there
            options["model_config"] = clip_cfg
    if layers:
        options["custom_operations"] = make_ops(layers, dtype, source=" + ".join(paths))
    clip = comfy.sd.load_text_encoder_state_dicts(state_dicts=state_dicts, clip_type=comfy.sd.CLIPType.FLUX,
                                                  embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                                  model_options=options)
    n_quant = len(lowbit_modules(clip.cond_stage_model))
    if n_quant != len(layers):
        raise ValueError(f"{' + '.join(paths)}: lowbit.layers lists {len(layers)} quantized layers but the text "
                         f"encoders took {n_quant}; the layer names do not match ComfyUI's T5 / CLIP")
    if layers:  # LoraLoader's clip LoRAs on quantized layers go into their low-rank branch too
        clip.patcher = wrap_patcher(clip.patcher)
    return clip


class LowBitTextEncoderLoader:
    @classmethod
    def INPUT_TYPES(cls):
        names = folder_paths.get_filename_list("text_encoders")
        return {"required": {
            "clip_name1": (names, {"tooltip": "CLIP-L or T5-XXL from models/text_encoders; lowbit or 16-bit."}),
            "clip_name2": (names, {"tooltip": "The other FLUX text encoder (T5-XXL or CLIP-L); lowbit or 16-bit."}),
            "compute_dtype": (list(DTYPES), {"default": "auto",
                              "tooltip": "16-bit dtype of the quantized layers' scales and low-rank branch; auto keeps "
                                         "the text encoder's dtype."}),
        }, "optional": QUANTIZE_ON_LOAD_INPUTS}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "lowbit"
    DESCRIPTION = ("Loads FLUX's two text encoders, either of which may be a lowbit checkpoint; with quantize_16bit a "
                   "16-bit one is quantized to W4A16 on the first load and cached.")

    def load(self, clip_name1, clip_name2, compute_dtype="auto", quantize_16bit=False, cache_limit_gb=64.0):
        paths = [folder_paths.get_full_path_or_raise("text_encoders", n) for n in (clip_name1, clip_name2)]
        if quantize_16bit:
            return (_quantized_text_encoders(paths, cache_limit_gb,
                                             lambda p: load_lowbit_text_encoders(p, DTYPES[compute_dtype])),)
        return (load_lowbit_text_encoders(paths, DTYPES[compute_dtype]),)


# ---- FLUX.2: one LLM text encoder ---------------------------------------------------------------------------
# ComfyUI picks the class from the file's widths (comfy/sd.py detect_te_model); the lowbit file's config names
# it (model_type), so a lowbit encoder builds exactly the class ComfyUI would build for its 16-bit original.
LLM_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "final_norm", "lm_head")
FLUX2_MISTRAL_LAYERS = 40  # fewer: ComfyUI's "pruned" FLUX.2 file


def _flux2_clip_target(model_type: str, sd: dict, config: dict):
    """(ClipTarget, tokenizer data, {model_type}_model_config overrides) of ComfyUI's own FLUX.2 encoder classes."""
    import comfy.supported_models_base
    import comfy.text_encoders.flux as f2
    import comfy.text_encoders.hunyuan_video
    import comfy.text_encoders.llama as llama

    detect = comfy.text_encoders.hunyuan_video.llama_detect(sd)
    if model_type == "mistral3_24b":
        pruned = config["num_hidden_layers"] < FLUX2_MISTRAL_LAYERS
        target = comfy.supported_models_base.ClipTarget(f2.Flux2Tokenizer, f2.flux2_te(**detect, pruned=pruned))
        defaults = llama.Mistral3Small24BConfig(**({"num_hidden_layers": 30, "final_norm": False} if pruned else {}))
        tokenizer_data = {"tekken_model": sd.get("tekken_model")}
    else:
        tokenizer = f2.KleinTokenizer if model_type == "qwen3_4b" else f2.KleinTokenizer8B
        target = comfy.supported_models_base.ClipTarget(tokenizer, f2.klein_te(**detect, model_type=model_type))
        defaults = (llama.Qwen3_4BConfig if model_type == "qwen3_4b" else llama.Qwen3_8BConfig)()
        tokenizer_data = {}
    overrides = {k: config[k] for k in LLM_CONFIG_KEYS if getattr(defaults, k) != config[k]}
    return target, tokenizer_data, overrides


def load_lowbit_flux2_text_encoder(path: str, dtype: torch.dtype | None = None):
    """A ComfyUI CLIP for FLUX.2 from a lowbit (or 16-bit) Mistral 3 / Qwen3 text encoder file: ComfyUI's own
    classes (comfy/text_encoders/flux.py flux2_te / klein_te) built with quantized Linear layers. Encoders of other
    sizes than the released ones (tests) get ComfyUI config overrides read from the file."""
    from .. import checkpoint
    from ..checkpoint import llm

    try:
        info = checkpoint.read_info(path)
    except checkpoint.NotALowbitCheckpoint:
        info = None
    if info is not None and info.model != "llm":
        raise ValueError(f"{path}: a lowbit {info.model!r} checkpoint ({info.family.title}), expected a FLUX.2 text "
                         f"encoder (Mistral 3 / Qwen3); load "
                         + ("FLUX models with 'Load LowBit Diffusion Model'" if info.model == "flux" else
                            "T5 / CLIP-L with 'Load LowBit Text Encoders (FLUX)'"))
    if info is not None:
        sd, info = checkpoint.load_checkpoint(path)
        layers, config = info.layers, info.config
    else:
        sd = comfy.utils.load_torch_file(path, safe_load=True)
        sd = {("model.lm_head.weight" if k == "lm_head.weight" else k): v for k, v in sd.items()}
        if not llm.is_llm(sd):
            raise ValueError(f"{path}: not a FLUX.2 text encoder (expected {llm.DETECT_KEYS[0]} and "
                             f"{llm.DETECT_KEYS[1]}); FLUX.1's T5 / CLIP-L go into 'Load LowBit Text Encoders (FLUX)'")
        layers, config = {}, llm.infer_config({k: tuple(v.shape) for k, v in sd.items()})
    model_type = config["model_type"]
    target, tokenizer_data, overrides = _flux2_clip_target(model_type, sd, config)
    options = {f"{model_type}_model_config": overrides} if overrides else {}
    if layers:
        options["custom_operations"] = make_ops(layers, dtype, source=path)
    clip = comfy.sd.CLIP(target, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                         parameters=comfy.utils.calculate_parameters(sd), tokenizer_data=tokenizer_data,
                         state_dict=[sd], model_options=options)
    n_quant = len(lowbit_modules(clip.cond_stage_model))
    if n_quant != len(layers):
        raise ValueError(f"{path}: lowbit.layers lists {len(layers)} quantized layers but the text encoder took "
                         f"{n_quant}; the layer names do not match ComfyUI's {model_type}")
    if layers:
        clip.patcher = wrap_patcher(clip.patcher)
    return clip


class LowBitFlux2TextEncoderLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_name": (folder_paths.get_filename_list("text_encoders"),
                          {"tooltip": "FLUX.2's text encoder from models/text_encoders, lowbit or 16-bit: Mistral 3 "
                                      "Small 24B for [dev] (the full or the pruned FLUX.2 file), Qwen3 4B for [klein] "
                                      "4B, Qwen3 8B for [klein] 9B."}),
            "compute_dtype": (list(DTYPES), {"default": "auto",
                              "tooltip": "16-bit dtype of the quantized layers' scales; auto keeps the text "
                                         "encoder's dtype."}),
        }, "optional": QUANTIZE_ON_LOAD_INPUTS}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "lowbit"
    DESCRIPTION = ("Loads FLUX.2's text encoder (Mistral 3 for [dev], Qwen3 for [klein]) as ComfyUI's own class, "
                   "from a lowbit W4A16 file or a 16-bit one; same CLIP as Load CLIP with type flux2.")

    def load(self, clip_name, compute_dtype="auto", quantize_16bit=False, cache_limit_gb=64.0):
        path = folder_paths.get_full_path_or_raise("text_encoders", clip_name)
        if quantize_16bit:
            return (_quantized_text_encoders([path], cache_limit_gb,
                                             lambda p: load_lowbit_flux2_text_encoder(p[0], DTYPES[compute_dtype])),)
        return (load_lowbit_flux2_text_encoder(path, DTYPES[compute_dtype]),)
