"""Shared pytest behaviour: tests marked `gpu` skip unless torch sees a CUDA (or ROCm) device; torch runs
on one CPU thread (the tests use small tensors, and on a busy 2-core machine multi-threaded SVDs of small
matrices spin and run ~50x slower)."""
import pytest
import torch

if not torch.cuda.is_available():
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
