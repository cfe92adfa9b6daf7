"""FluxTransformer <-> tensors: build one from a (lowbit or 16-bit) state dict or checkpoint file, and back."""
import torch
from torch import nn

from ..checkpoint.flux import infer_config
from ..quant_ops import FORMATS, module_from_packed
from .model import FluxTransformer
from .quantize import quantized_layers, set_module


def flux_from_state_dict(sd: dict, config: dict | None = None, layers: dict | None = None, device=None) -> FluxTransformer:
    """FluxTransformer holding the tensors of `sd` (BFL names, no prefix). `layers` ({name: packed.config()}
    from a lowbit checkpoint) names the quantized layers, which become quant_ops.linear modules.
    config defaults to the one inferred from the shapes of a 16-bit state dict."""
    layers = layers or {}
    if config is None:
        if layers:
            raise ValueError("flux_from_state_dict: a quantized state dict needs its config (lowbit.config)")
        config = infer_config({k: tuple(v.shape) for k, v in sd.items()})
    dtype = sd["img_in.weight"].dtype if "img_in.weight" in sd else torch.bfloat16
    model = FluxTransformer(config, dtype=dtype, device="meta")
    used = set()
    for name, cfg in layers.items():
        cls = FORMATS.get(cfg.get("format"))
        if cls is None:
            raise ValueError(f"layer {name}: unknown format {cfg.get('format')!r}, expected one of {sorted(FORMATS)}")
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"layer {name}: no such layer in a FLUX transformer with this config") from None
        keys = {k: f"{name}.{k}" for k in cls.TENSORS if f"{name}.{k}" in sd}
        packed = cls.from_tensors({k: sd[full] for k, full in keys.items()}, cfg, layer=name)
        set_module(model, name, module_from_packed(packed))
        used.update(keys.values())
    rest = {k: v for k, v in sd.items() if k not in used}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    missing = [k for k in missing if k.rpartition(".")[0] not in layers]
    if unexpected:
        raise ValueError(f"tensor {unexpected[0]} is not part of a FLUX transformer with this config "
                         f"({len(unexpected)} unexpected tensors)")
    if missing:
        raise ValueError(f"tensor {missing[0]} is missing ({len(missing)} missing tensors)")
    return model if device is None else model.to(device)


def flux_from_checkpoint(path: str, device="cpu") -> FluxTransformer:
    """A lowbit FLUX checkpoint (or a plain 16-bit BFL FLUX safetensors file) as a FluxTransformer."""
    from safetensors.torch import load_file

    from ..checkpoint import NotALowbitCheckpoint, load_checkpoint, read_info
    from ..checkpoint.flux import strip_prefix

    try:
        info = read_info(path)
    except NotALowbitCheckpoint:
        sd = load_file(path, device=str(device))
        p = strip_prefix(sd)
        return flux_from_state_dict({k[len(p):]: v for k, v in sd.items() if k.startswith(p)})
    if info.model != "flux":
        raise ValueError(f"{path}: lowbit.model is {info.model!r}, expected 'flux'")
    sd, info = load_checkpoint(path, device=device)
    return flux_from_state_dict(sd, info.config, info.layers)


def flux_state_dict(model: nn.Module) -> tuple[dict, dict]:
    """(tensors, layers) of a (partly) quantized FluxTransformer in the checkpoint layout."""
    tensors, layers = {}, {}
    qnames = quantized_layers(model)
    for name, m in qnames.items():
        packed = m.packed()
        layers[name] = packed.config()
        tensors.update({f"{name}.{k}": v for k, v in packed.tensors().items()})
    for k, v in model.state_dict().items():
        layer = k.rpartition(".")[0]
        if layer not in qnames:
            tensors[k] = v
    return tensors, layers

