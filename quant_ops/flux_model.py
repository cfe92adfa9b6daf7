"""A compact pure-PyTorch FLUX.1 transformer with BFL parameter names (no ComfyUI needed).

Used by benchmarks, the demo and tests: the same math as BFL's / ComfyUI's Flux (RoPE over 3 id axes,
AdaLN modulation, q/k RMSNorm, joint attention, parallel single blocks), written for clarity.
Sequences stay patchified: `img` is (B, L, in_channels) and the output is (B, L, out_channels).

Also here: seeded random FLUX models of any size (heavy-tailed weights, outlier channels) and whole-model
quantization by the layer mapping of quant_ops.flux.layer_format.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .flux import infer_config, layer_format, layer_options
from .formats import FORMATS
from .linear import LowBitLinear, module_from_packed

# ---- math -------------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0, time_factor: float = 1000.0):
    """Sinusoidal embedding (cos half, then sin half) of t * time_factor, float32 (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_angles(ids: torch.Tensor, axes_dim, theta: float) -> torch.Tensor:
    """ids (B, L, n_axes) positions -> angles float32 (B, L, sum(axes_dim) / 2), axis by axis."""
    parts = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)
        parts.append((ids[..., i].double()[..., None] * omega).float())
    return torch.cat(parts, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x (B, H, L, D) by the angles; float32 out."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2)


def attention(q, k, v, pe) -> torch.Tensor:
    """q, k, v (B, H, L, D); pe = (cos, sin) each (B, 1, L, D/2) -> (B, L, H * D)."""
    if pe is not None:
        q, k = apply_rope(q, *pe).to(v.dtype), apply_rope(k, *pe).to(v.dtype)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


# ---- modules ----------------------------------------------------------------------------------------------


def _linear(k, n, bias=True, dtype=None, device=None) -> nn.Linear:
    return nn.Linear(k, n, bias=bias, dtype=dtype, device=device)


class RMSNorm(nn.Module):
    def __init__(self, dim, dtype=None, device=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x):
        xf = x.float()
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale.float()


class QKNorm(nn.Module):
    def __init__(self, dim, dtype=None, device=None):
        super().__init__()
        self.query_norm = RMSNorm(dim, dtype, device)
        self.key_norm = RMSNorm(dim, dtype, device)


class MLPEmbedder(nn.Module):
    def __init__(self, k, hidden, dtype=None, device=None):
        super().__init__()
        self.in_layer = _linear(k, hidden, dtype=dtype, device=device)
        self.out_layer = _linear(hidden, hidden, dtype=dtype, device=device)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    def __init__(self, hidden, n, dtype=None, device=None):
        super().__init__()
        self.n = n
        self.lin = _linear(hidden, n * hidden, dtype=dtype, device=device)

    def forward(self, vec):
        """vec (B, hidden) -> n tensors (B, 1, hidden)."""
        return self.lin(F.silu(vec))[:, None, :].chunk(self.n, dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, hidden, heads, qkv_bias, dtype=None, device=None):
        super().__init__()
        self.heads = heads
        self.qkv = _linear(hidden, 3 * hidden, qkv_bias, dtype, device)
        self.norm = QKNorm(hidden // heads, dtype, device)
        self.proj = _linear(hidden, hidden, dtype=dtype, device=device)

    def qkv_heads(self, x):
        """x (B, L, hidden) -> normed q, k and v, each (B, H, L, D) in v's dtype."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return self.norm.query_norm(q).to(v.dtype), self.norm.key_norm(k).to(v.dtype), v


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, joined in one attention (text tokens first)."""

    def __init__(self, hidden, heads, mlp_hidden, qkv_bias, dtype=None, device=None):
        super().__init__()
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(hidden, 6, dtype, device))
            setattr(self, f"{s}_attn", SelfAttention(hidden, heads, qkv_bias, dtype, device))
            setattr(self, f"{s}_mlp", nn.Sequential(_linear(hidden, mlp_hidden, dtype=dtype, device=device),
                                                    nn.GELU(approximate="tanh"),
                                                    _linear(mlp_hidden, hidden, dtype=dtype, device=device)))

    def forward(self, img, txt, vec, pe):
        im = self.img_mod(vec)
        tm = self.txt_mod(vec)
        iq, ik, iv = self.img_attn.qkv_heads(modulate(layer_norm(img), im[0], im[1]))
        tq, tk, tv = self.txt_attn.qkv_heads(modulate(layer_norm(txt), tm[0], tm[1]))
        attn = attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), pe)
        t_attn, i_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + im[2] * self.img_attn.proj(i_attn)
        img = img + im[5] * self.img_mlp(modulate(layer_norm(img), im[3], im[4]))
        txt = txt + tm[2] * self.txt_attn.proj(t_attn)
        txt = txt + tm[5] * self.txt_mlp(modulate(layer_norm(txt), tm[3], tm[4]))
        return img, txt


class SingleStreamBlock(nn.Module):
    """linear1 computes qkv and the MLP input together; linear2 reads [attention, GELU(mlp)]."""

    def __init__(self, hidden, heads, mlp_hidden, qkv_bias, dtype=None, device=None):
        super().__init__()
        self.hidden, self.heads, self.mlp_hidden = hidden, heads, mlp_hidden
        self.linear1 = _linear(hidden, 3 * hidden + mlp_hidden, qkv_bias, dtype, device)
        self.linear2 = _linear(hidden + mlp_hidden, hidden, dtype=dtype, device=device)
        self.norm = QKNorm(hidden // heads, dtype, device)
        self.modulation = Modulation(hidden, 3, dtype, device)

    def forward(self, x, vec, pe):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(layer_norm(x), shift, scale)).split([3 * self.hidden, self.mlp_hidden], -1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = self.norm.query_norm(q).to(v.dtype), self.norm.key_norm(k).to(v.dtype)
        out = self.linear2(torch.cat([attention(q, k, v, pe), F.gelu(mlp, approximate="tanh")], -1))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden, out_channels, dtype=None, device=None):
        super().__init__()
        self.linear = _linear(hidden, out_channels, dtype=dtype, device=device)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), _linear(hidden, 2 * hidden, dtype=dtype, device=device))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x), shift, scale))


class FluxTransformer(nn.Module):
    """FLUX.1 transformer. config: the lowbit checkpoint's flux config (see COMMON / quant_ops.flux)."""

    def __init__(self, config: dict, dtype=torch.bfloat16, device=None):
        super().__init__()
        c = self.config = dict(config)
        h, heads = c["hidden_size"], c["num_heads"]
        if h % heads:
            raise ValueError(f"hidden_size {h} is not a multiple of num_heads {heads}")
        if sum(c["axes_dim"]) != h // heads:
            raise ValueError(f"sum(axes_dim) = {sum(c['axes_dim'])} must equal the head dim {h // heads}")
        mlp = int(h * c["mlp_ratio"])
        kw = dict(dtype=dtype, device=device)
        self.img_in = _linear(c["in_channels"], h, **kw)
        self.txt_in = _linear(c["context_in_dim"], h, **kw)
        self.time_in = MLPEmbedder(256, h, **kw)
        self.vector_in = MLPEmbedder(c["vec_in_dim"], h, **kw) if c.get("vec_in_dim") else None
        self.guidance_in = MLPEmbedder(256, h, **kw) if c.get("guidance_embed") else None
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(h, heads, mlp, c["qkv_bias"], **kw) for _ in range(c["depth"]))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(h, heads, mlp, c["qkv_bias"], **kw)
                                           for _ in range(c["depth_single_blocks"]))
        self.final_layer = LastLayer(h, c.get("out_channels", c["in_channels"]), **kw)

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    def rope(self, img_ids, txt_ids):
        """(cos, sin), each (B, 1, L_txt + L_img, head_dim / 2)."""
        ang = rope_angles(torch.cat([txt_ids, img_ids], dim=1), self.config["axes_dim"], self.config["theta"])
        return torch.cos(ang)[:, None], torch.sin(ang)[:, None]

    def embed_vec(self, timesteps, y=None, guidance=None):
        dt = self.dtype
        vec = self.time_in(timestep_embedding(timesteps).to(dt))
        if self.guidance_in is not None and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dt))
        if self.vector_in is not None:
            if y is None:
                y = torch.zeros(timesteps.shape[0], self.config["vec_in_dim"], dtype=dt, device=timesteps.device)
            vec = vec + self.vector_in(y.to(dt))
        return vec

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y=None, guidance=None):
        if img.dim() != 3 or txt.dim() != 3:
            raise ValueError(f"img and txt must be (B, L, C), got shapes {tuple(img.shape)} and {tuple(txt.shape)}")
        dt = self.dtype
        img, txt = self.img_in(img.to(dt)), self.txt_in(txt.to(dt))
        vec = self.embed_vec(timesteps, y, guidance)
        pe = self.rope(img_ids, txt_ids)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1]:], vec)


def make_inputs(config: dict, batch=1, height=64, width=64, txt_len=32, seed=0, dtype=torch.bfloat16, device="cpu"):
    """Seeded forward inputs for a `height` x `width` latent grid of 2x2 patches (FLUX's 1024^2 image:
    height = width = 64 -> 4096 image tokens). Returns a dict of FluxTransformer.forward keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    n = height * width
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    out = {
        "img": torch.randn(batch, n, config["in_channels"], generator=g),
        "img_ids": img_ids.reshape(1, n, 3).repeat(batch, 1, 1),
        "txt": torch.randn(batch, txt_len, config["context_in_dim"], generator=g),
        "txt_ids": torch.zeros(batch, txt_len, 3),
        "timesteps": torch.full((batch,), 0.5),
        "y": torch.randn(batch, config["vec_in_dim"], generator=g) if config.get("vec_in_dim") else None,
        "guidance": torch.full((batch,), 3.5) if config.get("guidance_embed") else None,
    }
    cast = {"img", "txt", "y"}
    return {k: None if v is None else v.to(device=device, dtype=dtype if k in cast else None) for k, v in out.items()}


# ---- building from tensors --------------------------------------------------------------------------------


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


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

    from .checkpoint import NotALowbitCheckpoint, load_checkpoint, read_info
    from .flux import strip_prefix

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


# ---- random models and whole-model quantization -----------------------------------------------------------

OUTLIER_INPUTS = 4      # input columns per weight scaled up (weight outliers)
OUTLIER_HIDDEN = 4      # hidden channels carrying large activations (massive-activation channels)
LOWRANK = 8             # rank of the structured part of each random weight


def _random_weight(n, k, g, device, outliers=OUTLIER_INPUTS) -> torch.Tensor:
    """Student-t (3 dof) noise plus a rank-8 part of about the same norm (trained weights have a few large
    singular values), scaled by 1/sqrt(k); a few input columns 4x larger. float32."""
    z = torch.randn(n, k, generator=g, device=device)
    chi2 = sum(torch.randn(n, k, generator=g, device=device) ** 2 for _ in range(3)) / 3
    w = z.div_(chi2.sqrt_())
    r = min(LOWRANK, n, k)
    u = torch.randn(n, r, generator=g, device=device) * torch.linspace(2.0, 0.5, r, device=device)
    w.addmm_(u, torch.randn(r, k, generator=g, device=device), alpha=math.sqrt(1.5 / r))
    w.mul_(0.4 / math.sqrt(k))
    cols = torch.randperm(k, generator=g, device=device)[:outliers]
    w[:, cols] *= 4.0
    return w


def _init_leaf(name: str, m: nn.Module, g, device, dtype, config):
    h = config["hidden_size"]
    for pname, p in m.named_parameters(recurse=False):
        if pname == "scale":
            v = 1 + 0.1 * torch.randn(p.shape, generator=g, device=device)
        elif p.dim() == 1:
            v = 0.02 * torch.randn(p.shape, generator=g, device=device)
        else:
            v = _random_weight(*p.shape, g, device)
            if name in ("img_in", "txt_in"):
                # massive activations: a few hidden channels of the residual stream are large
                rows = torch.arange(0, h, max(1, h // OUTLIER_HIDDEN), device=device)[:OUTLIER_HIDDEN]
                v[rows] *= 16.0
        with torch.no_grad():
            setattr(m, pname, nn.Parameter(v.to(dtype), requires_grad=False))


def random_flux(config: dict, seed: int = 0, dtype=torch.bfloat16, device="cpu", quantize=None) -> FluxTransformer:
    """A seeded FLUX transformer with heavy-tailed weights (outlier input columns in every linear,
    a few large hidden channels from img_in/txt_in). Built leaf by leaf from the meta device, so only the
    final model plus one layer in float32 is ever held. `quantize(name, linear) -> module | None` may
    replace each linear right after it is made (see quantize_fn), so a quantized model never needs a
    full 16-bit copy. Values depend on the device's random generator."""
    device = torch.device(device)
    model = FluxTransformer(config, dtype=dtype, device="meta")
    g = torch.Generator(device=device).manual_seed(seed)
    for name, m in list(model.named_modules()):
        if not name or next(m.parameters(recurse=False), None) is None:
            continue
        _init_leaf(name, m, g, device, dtype, config)
        if quantize is not None and isinstance(m, nn.Linear):
            q = quantize(name, m)
            if q is not None:
                set_module(model, name, q)
    return model.eval()


def quantize_fn(block_fmt: str, rank: int = 32, act_absmax: dict | None = None, reuse_per_shape: bool = False,
                progress=None, **options):
    """A `quantize(name, linear)` callable mapping FLUX layers to formats (quant_ops.flux.layer_format):
    blocks -> block_fmt with `rank`, modulation -> w4a16, the rest stays 16-bit (returns None).

    reuse_per_shape: quantize only the first layer of each (format, options, shape) and give later layers
    copies of its packed tensors - for timing/memory benchmarks of full-size random models, where SVD per
    layer would dominate; the model's outputs are then meaningless. options go to quantize_linear
    (e.g. act_int8=True for ternary, iters=1 for a quick fit)."""
    from . import quantize_linear

    cache = {}

    def quantize(name, linear):
        fmt = layer_format(name, block_fmt)
        if fmt is None:
            return None
        opts = {**options, **layer_options(name, fmt)}
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
    fn = quantize_fn(block_fmt, rank, act_absmax, reuse_per_shape, progress, **options)
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

