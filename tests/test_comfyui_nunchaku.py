"""A Nunchaku INT4 FLUX file through the lowbit diffusion-model loader in ComfyUI (in-process, CPU).

    COMFYUI_PATH=/work/comfyui /work/cvenv/bin/python -m pytest -q tests/test_comfyui_nunchaku.py
"""
import os

import pytest
import torch
from safetensors.torch import save_file

COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY, reason="COMFYUI_PATH is not set (point it at a ComfyUI 0.29.0 checkout)")]



def test_loader_takes_a_nunchaku_file_like_its_converted_checkpoint(comfy, tmp_path):
    import nunchaku_layout as nl

    from comfyui_lowbit import cli
    from comfyui_lowbit.nodes.loaders import load_lowbit_diffusion_model
    from comfyui_lowbit.nodes.ops import lowbit_modules

    sd, _, _ = nl.nunchaku_tiny_flux(seed=0, rank=16)
    src = str(tmp_path / "svdq-int4_r16-flux.1-tiny.safetensors")
    save_file(sd, src, metadata=nl.metadata())
    converted = str(tmp_path / "converted.safetensors")
    assert cli.main(["convert-nunchaku", src, converted]) == 0

    g = torch.Generator().manual_seed(1)
    inputs = dict(x=torch.randn(1, 16, 8, 8, generator=g), timestep=torch.tensor([0.7]),
                  context=torch.randn(1, 8, 128, generator=g), y=torch.randn(1, 768, generator=g),
                  guidance=torch.tensor([3.5]))
    outs = []
    for path in (src, converted):
        patcher = load_lowbit_diffusion_model(path)
        dm = patcher.model.diffusion_model
        quant = lowbit_modules(dm)
        assert len(quant) == 26
        lin2 = quant["single_blocks.0.linear2"]
        assert lin2._options["act_unsigned"] and lin2._options["act_unsigned_from"] == 256
        assert tuple(lin2.weight_shape) == (256, 1280)
        with torch.no_grad():
            outs.append(dm(**inputs))
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_loader_names_unsupported_nunchaku_files(comfy, tmp_path):
    import nunchaku_layout as nl

    from comfyui_lowbit.nodes.loaders import load_lowbit_diffusion_model

    sd, _, _ = nl.nunchaku_tiny_flux(seed=0, rank=16)
    path = str(tmp_path / "svdq-fp4_r32-flux.1-tiny.safetensors")
    save_file(sd, path, metadata=nl.metadata(weight_dtype="fp4_e2m1_all"))
    with pytest.raises(ValueError, match="NVFP4.*supported: Nunchaku SVDQuant INT4 FLUX"):
        load_lowbit_diffusion_model(path)


@pytest.mark.parametrize("variant", ["fill-dev", "depth-dev"])
def test_loader_takes_nunchaku_fill_and_depth_files(comfy, tmp_path, variant):
    """Nunchaku's Fill / Depth (and Canny, Depth's shapes) files load as ComfyUI's FLUX with the wider img_in
    (Fill is ComfyUI's FluxInpaint model, 96 input channels) and write the plain 16-channel latent."""
    import nunchaku_layout as nl
    from tiny_models import TINY_FLUX_CONFIG

    from comfyui_lowbit.nodes.loaders import load_lowbit_diffusion_model

    cfg = {**TINY_FLUX_CONFIG, **nl.VARIANTS[variant]}
    sd, _, _ = nl.nunchaku_tiny_flux(seed=0, rank=16, config=cfg)
    src = str(tmp_path / f"svdq-int4_r16-flux.1-{variant}.safetensors")
    save_file(sd, src, metadata=nl.metadata(cfg))
    patcher = load_lowbit_diffusion_model(src)
    unet = patcher.model.model_config.unet_config
    assert (unet["in_channels"], unet["out_channels"]) == (cfg["in_channels"] // 4, 16)
    assert type(patcher.model.model_config).__name__ == ("FluxInpaint" if variant == "fill-dev" else "Flux")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out = patcher.model.diffusion_model(x=torch.randn(1, cfg["in_channels"] // 4, 8, 8, generator=g),
                                            timestep=torch.tensor([0.7]), context=torch.randn(1, 8, 128, generator=g),
                                            y=torch.randn(1, 768, generator=g), guidance=torch.tensor([3.5]))
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all()
