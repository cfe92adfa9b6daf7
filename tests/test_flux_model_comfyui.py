"""flux_model matches ComfyUI's own Flux (comfy/ldm/flux) on the same weights and inputs.

    COMFYUI_PATH=/work/comfyui /work/cvenv/bin/python -m pytest -q tests/test_flux_model_comfyui.py
"""
import os
import sys

import pytest
import torch
from tiny_models import TINY_FLUX_CONFIG, tiny_flux_state_dict

from comfyui_lowbit.flux_model import flux_from_state_dict, make_inputs

COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY, reason="COMFYUI_PATH is not set (point it at a ComfyUI 0.29.0 checkout)")]


@pytest.mark.parametrize("guidance", [True, False])
def test_matches_comfyui_flux(guidance):
    if COMFY not in sys.path:
        sys.path.insert(0, COMFY)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    cfg = dict(TINY_FLUX_CONFIG, guidance_embed=guidance)
    sd = tiny_flux_state_dict(0, dtype=torch.float32, guidance_embed=guidance)
    ours = flux_from_state_dict(sd, cfg)
    theirs = Flux(dtype=torch.float32, operations=comfy.ops.disable_weight_init, out_channels=64, patch_size=1,
                  txt_ids_dims=[], **cfg)
    # ComfyUI names the RMSNorm parameter `weight` (BFL: `scale`) and converts on load
    theirs.load_state_dict({k[:-len("scale")] + "weight" if k.endswith(".scale") else k: v for k, v in sd.items()})
    inp = make_inputs(cfg, height=4, width=6, txt_len=5, dtype=torch.float32, seed=2)
    with torch.no_grad():
        a = ours(**inp)
        b = theirs.forward_orig(inp["img"], inp["img_ids"], inp["txt"], inp["txt_ids"], inp["timesteps"], inp["y"],
                                inp["guidance"])
    assert a.shape == b.shape == (1, 24, 64)
    assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item()
