"""Whole-model quantization of a FluxTransformer by its family's layer rules (checkpoint/families.py)."""
from torch import nn

from ..checkpoint.families import FAMILIES, family_of
from ..quant_ops import LowBitLinear, module_from_packed, quantize_linear


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def quantize_fn(block_fmt: str, rank: int = 32, act_absmax: dict | None = None, reuse_per_shape: bool = False,
                progress=None, family: str = "flux1", **options):
    """A `quantize(name, linear)` callable mapping the layers of a FLUX `family` ("flux1" / "flux2") to formats:
    blocks -> block_fmt with `rank`, modulation -> w4a16, the rest stays 16-bit (returns None).

    reuse_per_shape: quantize only the first layer of each (format, options, shape) and give later layers
    copies of its packed tensors - for timing/memory benchmarks of full-size random models, where SVD per
    layer would dominate; the model's outputs are then meaningless. options go to quantize_linear
    (e.g. act_int8=True for ternary, iters=1 for a quick fit)."""
    cache = {}
    fam = FAMILIES[family]

    def quantize(name, linear):
        fmt = fam.layer_format(name, block_fmt)
        if fmt is None:
            return None
        opts = {**options, **fam.layer_options(name, fmt)}
        if fmt == "w4a16":
            opts = {k: v for k, v in opts.items() if k in ("group_size", "dtype", "device")}
            opts.setdefault("group_size", 64)
        elif fmt == "svdq_w4a4":
            opts.pop("act_int8", None)
        else:
            opts.pop("act_unsigned", None)
        key = (fmt, tuple(sorted(opts.items())), tuple(linear.weight.shape))
        if reuse_per_shape and key in cache:
            src = cache[key]
            mod = module_from_packed(type(src).from_tensors({k: v.clone() for k, v in src.tensors().items()},
                                                            src.config(), layer=name))
        else:
            absmax = None if act_absmax is None else act_absmax.get(name)
            mod = quantize_linear(linear, fmt, rank=rank, act_absmax=absmax, **opts)
            if reuse_per_shape:
                cache[key] = mod.packed()
        if progress is not None:
            progress(name)
        return mod

    return quantize


def quantize_flux(model: nn.Module, block_fmt: str, rank: int = 32, act_absmax: dict | None = None,
                  reuse_per_shape: bool = False, progress=None, **options) -> nn.Module:
    """Replace, in place, every FLUX linear that layer_format maps to a format (see quantize_fn).
    Returns the model. Layers are quantized one by one on their own device."""
    family = family_of("flux", getattr(model, "config", None)).name
    fn = quantize_fn(block_fmt, rank, act_absmax, reuse_per_shape, progress, family=family, **options)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear):
            q = fn(name, m)
            if q is not None:
                set_module(model, name, q)
    return model


def quantized_layers(model: nn.Module) -> dict:
    """{name: lowbit module} of a model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowBitLinear)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and persistent buffers (packed tensors count at their stored size)."""
    sd = model.state_dict()
    seen, total = set(), 0
    for t in sd.values():
        key = (t.data_ptr(), t.numel(), t.dtype) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
