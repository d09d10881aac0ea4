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


# Kernel tests: per-dtype tolerances relative to the output's scale.
TOL = {torch.float32: 1e-3, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu


def rel_err(out, ref):
    """Largest absolute error over the output's scale (NaN if anything is NaN)."""
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


FAMILIES = ["llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe"]


@pytest.fixture(scope="session")
def tokenizer():
    from specoff.synthetic import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tokenizer):
    """make_checkpoint(family, **config) -> folder of a tiny random HF checkpoint (cached)."""
    from specoff.synthetic import make_tiny_checkpoint

    made = {}

    def make(family, **kw):
        key = (family, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(family)
            made[key] = make_tiny_checkpoint(family, out, tokenizer=tokenizer, **kw)
        return made[key]

    return make
