"""The FLUX.1 and FLUX.2 transformers in plain PyTorch with BFL parameter names: the same math as BFL's /
ComfyUI's Flux, written for clarity. Sequences stay patchified: `img` is (B, L, in_channels), the output
(B, L, out_channels). FLUX.2 (config image_model "flux2"): modulation computed once per model from vec
(double_stream_modulation_img / _txt, single_stream_modulation) and handed to every block, SiLU-gated MLPs,
no biases."""
import math

import torch
import torch.nn.functional as F
from torch import nn


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
    def __init__(self, k, hidden, dtype=None, device=None, bias=True):
        super().__init__()
        self.in_layer = _linear(k, hidden, bias, dtype=dtype, device=device)
        self.out_layer = _linear(hidden, hidden, bias, dtype=dtype, device=device)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    def __init__(self, hidden, n, dtype=None, device=None, bias=True):
        super().__init__()
        self.n = n
        self.lin = _linear(hidden, n * hidden, bias, dtype=dtype, device=device)

    def forward(self, vec):
        """vec (B, hidden) -> n tensors (B, 1, hidden)."""
        return self.lin(F.silu(vec))[:, None, :].chunk(self.n, dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, hidden, heads, qkv_bias, dtype=None, device=None, proj_bias=True):
        super().__init__()
        self.heads = heads
        self.qkv = _linear(hidden, 3 * hidden, qkv_bias, dtype, device)
        self.norm = QKNorm(hidden // heads, dtype, device)
        self.proj = _linear(hidden, hidden, proj_bias, dtype=dtype, device=device)

    def qkv_heads(self, x):
        """x (B, L, hidden) -> normed q, k and v, each (B, H, L, D) in v's dtype."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return self.norm.query_norm(q).to(v.dtype), self.norm.key_norm(k).to(v.dtype), v


class SiLUGate(nn.Module):
    """FLUX.2's MLP activation: silu(first half) * second half (signed, unlike FLUX.1's GELU)."""

    def forward(self, x):
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


def _mlp(hidden, mlp_hidden, flux2, dtype=None, device=None) -> nn.Sequential:
    if flux2:
        return nn.Sequential(_linear(hidden, 2 * mlp_hidden, False, dtype, device), SiLUGate(),
                             _linear(mlp_hidden, hidden, False, dtype, device))
    return nn.Sequential(_linear(hidden, mlp_hidden, dtype=dtype, device=device), nn.GELU(approximate="tanh"),
                         _linear(mlp_hidden, hidden, dtype=dtype, device=device))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, joined in one attention (text tokens first).
    flux2: no modulation of its own (forward takes `vec` = (img modulation, txt modulation), six tensors each)."""

    def __init__(self, hidden, heads, mlp_hidden, qkv_bias, dtype=None, device=None, flux2=False):
        super().__init__()
        self.flux2 = flux2
        for s in ("img", "txt"):
            if not flux2:
                setattr(self, f"{s}_mod", Modulation(hidden, 6, dtype, device))
            setattr(self, f"{s}_attn", SelfAttention(hidden, heads, qkv_bias, dtype, device, proj_bias=not flux2))
            setattr(self, f"{s}_mlp", _mlp(hidden, mlp_hidden, flux2, dtype, device))

    def forward(self, img, txt, vec, pe):
        im, tm = vec if self.flux2 else (self.img_mod(vec), self.txt_mod(vec))
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
    """linear1 computes qkv and the MLP input together; linear2 reads [attention, act(mlp)] (FLUX.1: GELU;
    FLUX.2: SiLU gate over a 2 x mlp wide input, and `vec` is the (shift, scale, gate) of the global modulation)."""

    def __init__(self, hidden, heads, mlp_hidden, qkv_bias, dtype=None, device=None, flux2=False):
        super().__init__()
        self.hidden, self.heads, self.mlp_hidden, self.flux2 = hidden, heads, mlp_hidden, flux2
        self.mlp_in = 2 * mlp_hidden if flux2 else mlp_hidden
        self.linear1 = _linear(hidden, 3 * hidden + self.mlp_in, qkv_bias, dtype, device)
        self.linear2 = _linear(hidden + mlp_hidden, hidden, not flux2, dtype=dtype, device=device)
        self.norm = QKNorm(hidden // heads, dtype, device)
        if not flux2:
            self.modulation = Modulation(hidden, 3, dtype, device)
        self.act = SiLUGate() if flux2 else nn.GELU(approximate="tanh")

    def forward(self, x, vec, pe):
        shift, scale, gate = vec if self.flux2 else self.modulation(vec)
        qkv, mlp = self.linear1(modulate(layer_norm(x), shift, scale)).split([3 * self.hidden, self.mlp_in], -1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = self.norm.query_norm(q).to(v.dtype), self.norm.key_norm(k).to(v.dtype)
        out = self.linear2(torch.cat([attention(q, k, v, pe), self.act(mlp)], -1))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden, out_channels, dtype=None, device=None, bias=True):
        super().__init__()
        self.linear = _linear(hidden, out_channels, bias, dtype=dtype, device=device)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), _linear(hidden, 2 * hidden, bias, dtype=dtype, device=device))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x), shift, scale))


class FluxTransformer(nn.Module):
    """FLUX.1 or FLUX.2 transformer. config: the lowbit checkpoint's flux config (see checkpoint.flux.infer_config)."""

    def __init__(self, config: dict, dtype=torch.bfloat16, device=None):
        super().__init__()
        c = self.config = dict(config)
        h, heads = c["hidden_size"], c["num_heads"]
        if h % heads:
            raise ValueError(f"hidden_size {h} is not a multiple of num_heads {heads}")
        if sum(c["axes_dim"]) != h // heads:
            raise ValueError(f"sum(axes_dim) = {sum(c['axes_dim'])} must equal the head dim {h // heads}")
        mlp = int(h * c["mlp_ratio"])
        self.flux2 = f2 = c.get("image_model", "flux") == "flux2"
        kw = dict(dtype=dtype, device=device)
        self.img_in = _linear(c["in_channels"], h, not f2, **kw)
        self.txt_in = _linear(c["context_in_dim"], h, not f2, **kw)
        self.time_in = MLPEmbedder(256, h, bias=not f2, **kw)
        self.vector_in = MLPEmbedder(c["vec_in_dim"], h, **kw) if c.get("vec_in_dim") else None
        self.guidance_in = MLPEmbedder(256, h, bias=not f2, **kw) if c.get("guidance_embed") else None
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(h, heads, mlp, c["qkv_bias"], flux2=f2, **kw)
                                           for _ in range(c["depth"]))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(h, heads, mlp, c["qkv_bias"], flux2=f2, **kw)
                                           for _ in range(c["depth_single_blocks"]))
        self.final_layer = LastLayer(h, c.get("out_channels", c["in_channels"]), bias=not f2, **kw)
        if f2:
            self.double_stream_modulation_img = Modulation(h, 6, bias=False, **kw)
            self.double_stream_modulation_txt = Modulation(h, 6, bias=False, **kw)
            self.single_stream_modulation = Modulation(h, 3, bias=False, **kw)

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
        double, single = self.modulations(vec)
        for block in self.double_blocks:
            img, txt = block(img, txt, double, pe)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, single, pe)
        return self.final_layer(x[:, txt.shape[1]:], vec)

    def modulations(self, vec):
        """(what the double blocks take, what the single blocks take): vec itself for FLUX.1 (each block has its
        own modulation), the global modulation's outputs for FLUX.2."""
        if not self.flux2:
            return vec, vec
        return ((self.double_stream_modulation_img(vec), self.double_stream_modulation_txt(vec)),
                self.single_stream_modulation(vec))


def make_inputs(config: dict, batch=1, height=64, width=64, txt_len=32, seed=0, dtype=torch.bfloat16, device="cpu"):
    """Seeded forward inputs for a `height` x `width` grid of latent patches (FLUX.1's 1024^2 image: 64 x 64
    2x2 patches; FLUX.2's: 64 x 64 tokens of 128 channels -> 4096 image tokens). Position ids as ComfyUI makes them
    (FLUX.2: 4 axes, the text's position on the last). Returns a dict of FluxTransformer.forward keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    n = height * width
    axes = len(config.get("axes_dim", [0] * 3))
    img_ids = torch.zeros(height, width, axes)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    txt_ids = torch.zeros(batch, txt_len, axes)
    if config.get("image_model") == "flux2":
        txt_ids[..., 3] = torch.arange(txt_len)
    out = {
        "img": torch.randn(batch, n, config["in_channels"], generator=g),
        "img_ids": img_ids.reshape(1, n, axes).repeat(batch, 1, 1),
        "txt": torch.randn(batch, txt_len, config["context_in_dim"], generator=g),
        "txt_ids": txt_ids,
        "timesteps": torch.full((batch,), 0.5),
        "y": torch.randn(batch, config["vec_in_dim"], generator=g) if config.get("vec_in_dim") else None,
        "guidance": torch.full((batch,), 3.5) if config.get("guidance_embed") else None,
    }
    cast = {"img", "txt", "y"}
    return {k: None if v is None else v.to(device=device, dtype=dtype if k in cast else None) for k, v in out.items()}
