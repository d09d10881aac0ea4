"""Shared test setup: the `gpu` marker skips without CUDA; Triton runs in its interpreter on CPU."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit runs, so kernels execute on the CPU in CI.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
