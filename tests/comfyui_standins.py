"""Stand-in model files for headless ComfyUI tests that tests/tiny_models.py does not make, built with
ComfyUI's own classes (so every key and shape is what ComfyUI expects) and filled with seeded random
weights. Needs ComfyUI importable (COMFYUI_PATH on sys.path, run under ComfyUI's Python).

A full-size CLIP-L (the tiny FLUX's pooled input is CLIP-L's 768, and ComfyUI hard-codes the config of a
plain CLIP-L file), the FLUX VAE with a thin decoder (32 channels), the FLUX.2 VAE (32 latent channels, batch-norm
over 2x2 patches -> 128 channels at 16x; ComfyUI's full-width encoder for reference images, a thin decoder),
BFL-key LoRAs and input images.
"""
import json
import os

import torch
from safetensors.torch import save_file


def _fill(sd: dict, seed: int, scale: float = 0.05) -> dict:
    """Seeded random tensors for every entry: norms near 1, biases small, weights ~ 1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in sd.items():
        if not t.is_floating_point():
            out[k] = t.contiguous()
            continue
        fan_in = max(1, t[0].numel()) if t.dim() > 1 else 1
        v = torch.randn(t.shape, generator=g)
        if "norm" in k or k.endswith(".scale"):
            v = 1 + 0.1 * v if not k.endswith(".bias") else 0.02 * v
        elif t.dim() > 1:
            v = v / fan_in ** 0.5
        else:
            v = v * scale
        out[k] = v.to(torch.bfloat16 if t.dim() > 1 else torch.float32).contiguous()
    return out


def clip_l_state_dict(seed: int = 2) -> dict:
    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip

    with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")) as f:
        cfg = json.load(f)
    model = comfy.clip_model.CLIPTextModel(cfg, torch.float32, "cpu", comfy.ops.manual_cast)
    return {k: v.to(torch.float16) for k, v in _fill(model.state_dict(), seed).items()}


def vae_state_dict(seed: int = 3) -> dict:
    """FLUX's VAE layout: the encoder as ComfyUI builds it for a FLUX VAE file (width 128: VAEEncode,
    InpaintModelConditioning, Kontext references) and a thin decoder (width 32, which ComfyUI reads from its shapes)."""
    import comfy.ldm.modules.diffusionmodules.model as vae_model

    cfg = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch_mult=[1, 2, 4, 4],
               num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    sd = {f"encoder.{k}": v for k, v in _fill(vae_model.Encoder(ch=128, **cfg).state_dict(), seed + 100).items()}
    sd.update({f"decoder.{k}": v for k, v in _fill(vae_model.Decoder(ch=32, **cfg).state_dict(), seed).items()})
    return {k: v.to(torch.float16) for k, v in sd.items()}


def save_image(path, size: int, seed: int = 0, transparent_left: bool = False) -> str:
    """A seeded random RGB PNG (RGBA with the left half transparent: LoadImage's mask) at `path`."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(seed)
    pixels = g.integers(0, 256, (size, size, 3), dtype=np.uint8)
    if transparent_left:
        alpha = np.full((size, size, 1), 255, dtype=np.uint8)
        alpha[:, : size // 2] = 0
        image = Image.fromarray(np.concatenate([pixels, alpha], axis=2), "RGBA")
    else:
        image = Image.fromarray(pixels, "RGB")
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    image.save(str(path))
    return str(path)


def flux2_vae_state_dict(seed: int = 4) -> dict:
    """What comfy/sd.py reads as the FLUX.2 VAE (AutoencoderKL with quant convs and batch_norm_latent: 32 latent
    channels, batch norm over 2x2 patches -> 128 channels at 16x), built with ComfyUI's class. The encoder has
    ComfyUI's width (ch 128, which sd.py assumes); the decoder's width is read from the file (ch 32 here)."""
    import comfy.ldm.models.autoencoder as ae

    cfg = dict(double_z=True, z_channels=32, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
               num_res_blocks=2, attn_resolutions=[], dropout=0.0, batch_norm_latent=True)
    vae = ae.AutoencoderKL(ddconfig=cfg, embed_dim=32, decoder_ddconfig={**cfg, "ch": 32})
    sd = {k: v for k, v in vae.state_dict().items() if not k.startswith("bn.")}
    sd = {k: v.to(torch.float16) for k, v in _fill(sd, seed).items()}
    sd["bn.running_mean"] = torch.zeros(128)
    sd["bn.running_var"] = torch.ones(128)
    sd["bn.num_batches_tracked"] = torch.tensor(0)
    return sd


def lora_state_dict(flux_sd: dict, seed: int, rank: int = 4, scale: float = 0.05) -> dict:
    """A BFL-key LoRA (`diffusion_model.<layer>.lora_A/B.weight`, as ai-toolkit writes them) on every block linear
    of `flux_sd` (FLUX.1 or FLUX.2)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in flux_sd.items():
        if not (k.startswith(("double_blocks.", "single_blocks.")) and k.endswith(".weight") and w.dim() == 2):
            continue
        layer = k[: -len(".weight")]
        n, kk = w.shape
        out[f"diffusion_model.{layer}.lora_A.weight"] = (torch.randn(rank, kk, generator=g) * scale).to(torch.bfloat16)
        out[f"diffusion_model.{layer}.lora_B.weight"] = (torch.randn(n, rank, generator=g) * scale).to(torch.bfloat16)
    return out


def save(sd: dict, path, metadata: dict | None = None) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return str(path)
