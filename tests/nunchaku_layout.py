"""Test-side writer of Nunchaku's published FLUX layout (the forward direction of checkpoint/nunchaku.py).

Written from the layout as published (deepcompressor backend/nunchaku/utils.py, backend/tinychat/utils.py,
backend/nunchaku/convert.py), independently of the importer: each packer cuts the natural tensor into the
packer's named tile dimensions and permutes them into storage order.
"""
import json

import torch

from tiny_models import TINY_FLUX_CONFIG, tiny_flux_state_dict

# ---- W4A4 (mma fragments, warp_n 128, int4) ---------------------------------------------------------------


def pack_qweight(q: torch.Tensor) -> torch.Tensor:
    """int (N, K) in [-8, 7] -> int8 (N, K/2)."""
    n, k = q.shape
    t = q.to(torch.int32).reshape(n // 128, 8, 2, 8, 1, k // 64, 1, 2, 4, 8)
    # (n_tile, n_pack, n_pack_size, n_lane, reg_n, k_tile, k_pack, k_pack_size, k_lane, reg_k)
    # -> (n_tile, k_tile, k_pack, n_pack, n_lane, k_lane, n_pack_size, k_pack_size, reg_n, reg_k)
    t = t.permute(0, 5, 6, 1, 3, 8, 2, 7, 4, 9).contiguous() & 0xF
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    words = (t << shifts).sum(dim=-1, dtype=torch.int32)   # eight nibbles per int32, first in bits 0-3
    return words.view(torch.int8).reshape(n, k // 2)


def pack_channels(t: torch.Tensor) -> torch.Tensor:
    """(G, N) group scales or (N,) vector -> Nunchaku's per-128-channel order, same shape."""
    two_d = t.dim() == 2
    nat = t.t() if two_d else t.unsqueeze(1)               # (N, G)
    n, g = nat.shape
    s = nat.contiguous().reshape(n // 128, 1, 8, 2, 4, 2, g).permute(0, 6, 1, 2, 4, 3, 5).contiguous()
    return s.reshape(g, n) if two_d else s.reshape(n)


def pack_lowrank(w: torch.Tensor, down: bool) -> torch.Tensor:
    """proj_down (K, r) -> lora_down (K, r); proj_up (N, r) -> lora_up (N, r)."""
    if down:
        m = w.t().contiguous()                              # (r, K): "n" is the rank, "k" the input
        rn, ck = m.shape
        tiles = m.reshape(rn // 16, 16, ck // 16, 16).permute(2, 0, 1, 3)
        c, r = ck, rn
    else:
        c, r = w.shape                                      # (N, r): "n" the output, "k" the rank
        tiles = w.reshape(c // 16, 16, r // 16, 16).permute(0, 2, 1, 3)
    tiles = tiles.reshape(c // 16, r // 16, 2, 8, 1, 2, 4, 2).permute(0, 1, 3, 6, 2, 5, 4, 7)
    return tiles.contiguous().reshape(c, r)


def random_w4a4(g, n, k, rank, dtype=torch.bfloat16, smooth=None, ones_smooth=False) -> dict:
    """Natural-layout SVDQuant parts: q, wscales (K/64, N), smooth (K), bias (N), down (K, r), up (N, r)."""
    nat = {"q": torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8),
           "wscales": (0.002 + 0.01 * torch.rand(k // 64, n, generator=g)).to(dtype),
           "bias": (0.05 * torch.randn(n, generator=g)).to(dtype),
           "down": (torch.randn(k, rank, generator=g) / k ** 0.5).to(dtype),
           "up": (0.1 * torch.randn(n, rank, generator=g)).to(dtype)}
    if smooth is None:
        smooth = torch.ones(k) if ones_smooth else 0.5 + torch.rand(k, generator=g)
    nat["smooth"] = smooth.to(dtype)
    return nat


def pack_w4a4(nat: dict, names: str = "lora") -> dict:
    """Natural parts -> the tensors of one Nunchaku GEMM_W4A4 layer (names "lora": lora_down/lora_up/smooth,
    "proj": the newer proj_down/proj_up/smooth_factor spelling)."""
    down, up, sm = ("lora_down", "lora_up", "smooth") if names == "lora" else ("proj_down", "proj_up", "smooth_factor")
    return {"qweight": pack_qweight(nat["q"]), "wscales": pack_channels(nat["wscales"]),
            "bias": pack_channels(nat["bias"]), sm: pack_channels(nat["smooth"]),
            sm + "_orig": pack_channels(nat["smooth"]),
            down: pack_lowrank(nat["down"], True), up: pack_lowrank(nat["up"], False)}


# ---- AWQ W4A16 modulation (TinyChat layout) ---------------------------------------------------------------


def pack_awq_qweight(qu: torch.Tensor) -> torch.Tensor:
    """int (N, K) in [0, 15] -> int32 (N/4, K/2)."""
    n, k = qu.shape
    v = qu.to(torch.int32).reshape(-1, 4, 8)                # 32 consecutive k: nibble i of word j is k = 8i + j
    words = v[:, 0] | (v[:, 1] << 4) | (v[:, 2] << 8) | (v[:, 3] << 12)
    words = words.reshape(n // 4, 4, k // 64, 16).permute(0, 2, 1, 3).reshape(n // 4, k)
    return words.to(torch.int16).view(torch.int32)


def random_awq(g, n, k, dtype=torch.bfloat16) -> dict:
    """Natural (BFL row order) AWQ parts: qu in [0, 15], s, z = -7 s (rounded), bias; w = qu * s + z."""
    s = (0.002 + 0.01 * torch.rand(k // 64, n, generator=g)).to(dtype)
    return {"qu": torch.randint(0, 16, (n, k), generator=g, dtype=torch.int16), "s": s,
            "z": (-7 * s.float()).to(dtype), "bias": (0.05 * torch.randn(n, generator=g)).to(dtype)}


def awq_dequant(nat: dict) -> torch.Tensor:
    gs = nat["qu"].shape[1] // nat["s"].shape[0]
    w = nat["qu"].float() * nat["s"].float().t().repeat_interleave(gs, 1) + nat["z"].float().t().repeat_interleave(gs, 1)
    return w.to(nat["s"].dtype)


def pack_awq(nat: dict, splits: int) -> dict:
    """Natural parts -> Nunchaku GEMV_AWQ tensors: rows interleaved by modulation chunk, +1 on the scale
    chunks' bias (added in the 16-bit dtype, as the converter does), scales/zeros padded to TinyChat's groups."""
    n, k = nat["qu"].shape

    def interleave(t):  # BFL row s*(n/splits) + j -> stored row j*splits + s
        return t.reshape(splits, n // splits, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    ng = k // 64
    packs = -(-ng // 8)
    ng_pad = -(-packs // 2) * 2 * 8                         # group 64: packs of 8 groups, a multiple of 2 packs
    s = torch.zeros(ng_pad, n, dtype=nat["s"].dtype)
    z = torch.zeros(ng_pad, n, dtype=nat["s"].dtype)
    s[:ng] = interleave(nat["s"].t()).t()
    z[:ng] = interleave(nat["z"].t()).t()
    delta = torch.zeros(splits, n // splits, dtype=nat["bias"].dtype)
    delta[1] = 1
    delta[-2] = 1
    bias = interleave((nat["bias"].reshape(splits, -1) + delta).reshape(n))
    return {"qweight": pack_awq_qweight(interleave(nat["qu"])), "wscales": s, "wzeros": z, "bias": bias}


def awq_expected_bias(nat: dict, splits: int) -> torch.Tensor:
    """What survives the file: (bias + 1) rounded to 16 bits, minus 1, on the scale chunks."""
    b = nat["bias"].reshape(splits, -1).clone()
    for i in {1, splits - 2}:
        b[i] = ((b[i] + 1).float() - 1).to(b.dtype)
    return b.reshape(-1)


# ---- a whole tiny FLUX ------------------------------------------------------------------------------------

DOUBLE_LAYERS = ("qkv_proj", "qkv_proj_context", "out_proj", "out_proj_context", "mlp_fc1", "mlp_fc2",
                 "mlp_context_fc1", "mlp_context_fc2")


def metadata(config=TINY_FLUX_CONFIG, weight_dtype="int4", model_class="NunchakuFluxTransformer2dModel") -> dict:
    diffusers_cfg = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": config["in_channels"],
                     "out_channels": config.get("out_channels"),
                     "num_layers": config["depth"], "num_single_layers": config["depth_single_blocks"],
                     "attention_head_dim": 128, "num_attention_heads": config["num_heads"],
                     "joint_attention_dim": config["context_in_dim"], "pooled_projection_dim": config["vec_in_dim"],
                     "guidance_embeds": config["guidance_embed"], "axes_dims_rope": config["axes_dim"]}
    qcfg = {"method": "svdquant", "weight": {"dtype": weight_dtype, "scale_dtype": None, "group_size": 64},
            "activation": {"dtype": weight_dtype, "scale_dtype": None, "group_size": 64}}
    out_ch = config.get("out_channels", config["in_channels"])
    comfy_cfg = {"model_class": "Flux" if config["guidance_embed"] else "FluxSchnell", "model_config": {
        "image_model": "flux", "in_channels": config["in_channels"] // 4, "out_channels": out_ch // 4, "patch_size": 2,
        "vec_in_dim": config["vec_in_dim"], "context_in_dim": config["context_in_dim"],
        "hidden_size": config["hidden_size"], "mlp_ratio": config["mlp_ratio"], "num_heads": config["num_heads"],
        "depth": config["depth"], "depth_single_blocks": config["depth_single_blocks"], "axes_dim": config["axes_dim"],
        "theta": config["theta"], "qkv_bias": config["qkv_bias"], "guidance_embed": config["guidance_embed"],
        "disable_unet_model_creation": True}}
    return {"config": json.dumps(diffusers_cfg), "comfy_config": json.dumps(comfy_cfg),
            "model_class": model_class, "quantization_config": json.dumps(qcfg)}


# The FLUX.1 models Nunchaku ships as svdq-int4_r32-flux.1-<name>.safetensors: the same block layout; Fill, Depth and
# Canny differ only in their 16-bit embedder and final layer (a wider img_in / x_embedder for the conditioning latent,
# diffusers in_channels 384 / 128 and out_channels 64)
VARIANTS = {"dev": {}, "kontext-dev": {}, "krea-dev": {}, "fill-dev": {"in_channels": 384, "out_channels": 64},
            "depth-dev": {"in_channels": 128, "out_channels": 64}, "canny-dev": {"in_channels": 128, "out_channels": 64}}


def nunchaku_tiny_flux(seed=0, rank=16, config=TINY_FLUX_CONFIG, names="lora", dtype=torch.bfloat16):
    """(nunchaku state dict, natural parts {nunchaku layer prefix: dict}, diffusers 16-bit state dict)."""
    g = torch.Generator().manual_seed(seed)
    h = config["hidden_size"]
    mlp = int(h * config["mlp_ratio"])
    diff = tiny_flux_state_dict(seed, naming="diffusers", dtype=dtype, config=config)
    sd, nat = {}, {}
    for k, v in diff.items():
        if not k.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            sd[k] = v
    shapes = {"qkv_proj": (3 * h, h), "qkv_proj_context": (3 * h, h), "out_proj": (h, h),
              "out_proj_context": (h, h), "mlp_fc1": (mlp, h), "mlp_fc2": (h, mlp),
              "mlp_context_fc1": (mlp, h), "mlp_context_fc2": (h, mlp)}

    def add(prefix, parts, packed):
        nat[prefix] = parts
        sd.update({f"{prefix}.{k}": v for k, v in packed.items()})

    for i in range(config["depth"]):
        p = f"transformer_blocks.{i}"
        for name in DOUBLE_LAYERS:
            parts = random_w4a4(g, *shapes[name], rank, dtype, ones_smooth=name.startswith("out_proj"))
            add(f"{p}.{name}", parts, pack_w4a4(parts, names))
        for name in ("norm1.linear", "norm1_context.linear"):
            parts = random_awq(g, 6 * h, h, dtype)
            add(f"{p}.{name}", parts, pack_awq(parts, 6))
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            sd[f"{p}.{n}.weight"] = diff[f"{p}.attn.{n}.weight"]
    for i in range(config["depth_single_blocks"]):
        p = f"single_transformer_blocks.{i}"
        qkv = random_w4a4(g, 3 * h, h, rank, dtype)
        fc1 = random_w4a4(g, mlp, h, rank, dtype, smooth=qkv["smooth"].float())  # shared smoothing (attn.to_q)
        add(f"{p}.qkv_proj", qkv, pack_w4a4(qkv, names))
        add(f"{p}.mlp_fc1", fc1, pack_w4a4(fc1, names))
        out = random_w4a4(g, h, h, rank, dtype, ones_smooth=True)
        add(f"{p}.out_proj", out, pack_w4a4(out, names))
        fc2 = random_w4a4(g, h, mlp, rank, dtype)
        add(f"{p}.mlp_fc2", fc2, pack_w4a4(fc2, names))
        parts = random_awq(g, 3 * h, h, dtype)
        add(f"{p}.norm.linear", parts, pack_awq(parts, 3))
        for n in ("norm_q", "norm_k"):
            sd[f"{p}.{n}.weight"] = diff[f"{p}.attn.{n}.weight"]
    return sd, nat, diff
