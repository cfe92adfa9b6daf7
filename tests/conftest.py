"""Shared pytest behaviour: tests marked `gpu` skip unless torch sees a CUDA (or ROCm) device; torch runs
on one CPU thread (the tests use small tensors, and on a busy 2-core machine multi-threaded SVDs of small
matrices spin and run ~50x slower)."""
import os
import sys

import pytest
import torch

torch.set_num_threads(1)
COMFY = os.environ.get("COMFYUI_PATH")


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI (COMFYUI_PATH) imported in this process, CPU only; test modules using it skip without it."""
    if not COMFY:
        pytest.skip("COMFYUI_PATH is not set (point it at a ComfyUI 0.29.0 checkout)")
    if COMFY not in sys.path:
        sys.path.insert(0, COMFY)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.model_management
    import comfy.ops
    import comfy.sd

    return comfy


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
