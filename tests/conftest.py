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


def dtype_cases(cpu_cases, gpu_cases):
    """pytest params of kernel cases × dtypes: fp32/fp16 on any device (the interpreter gets
    bf16 wrong), bf16 too on the GPU cases, which carry the gpu marker."""
    for case in cpu_cases:
        for dtype in (torch.float32, torch.float16):
            yield pytest.param(*case, dtype, id=f"{case}-{dtype}")
    for case in gpu_cases:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            yield pytest.param(*case, dtype, marks=gpu, id=f"gpu-{case}-{dtype}")


def rel_err(out, ref):
    """Largest absolute error over the output's scale (NaN if anything is NaN)."""
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


FAMILIES = ["llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe"]


@pytest.fixture(scope="session")
def tokenizer():
    from specoff.bench.synthetic import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tokenizer):
    """make_checkpoint(family, **config) -> folder of a tiny random HF checkpoint (cached)."""
    from specoff.bench.synthetic import make_tiny_checkpoint

    made = {}

    def make(family, **kw):
        key = (family, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(family)
            made[key] = make_tiny_checkpoint(family, out, tokenizer=tokenizer, **kw)
        return made[key]

    return make


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tokenizer):
    """pairs(sigma, **config) -> (draft_dir, target_dir): a tiny upcycled pair (cached)."""
    from specoff.bench.synthetic import make_upcycled_pair

    made = {}

    def pair(sigma, family="mistral", **kw):
        key = (sigma, family, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = make_upcycled_pair(tmp_path_factory.mktemp("pair"), sigma,
                                           draft_family=family, tokenizer=tokenizer, **kw)
        return made[key]
    return pair


def without_tokenizers(folders, tmp_path):
    """Copies of checkpoint folders with no tokenizer files (token-id prompts only)."""
    import shutil

    copies = []
    for i, src in enumerate(folders):
        dst = tmp_path / f"copy{i}"
        shutil.copytree(src, dst)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (dst / f).unlink()
        copies.append(dst)
    return copies


def same_distribution(outs_a, outs_b, min_count=20):
    """Chi-square p-value that two sets of generations share one distribution of sequences."""
    from scipy.stats import chi2_contingency

    a = [tuple(o.token_ids) for o in outs_a]
    b = [tuple(o.token_ids) for o in outs_b]
    common = sorted(k for k in set(a) | set(b) if a.count(k) + b.count(k) >= min_count)
    assert len(common) >= 5, "too few distinct sequences for a chi-square test"
    return chi2_contingency([[a.count(k) for k in common], [b.count(k) for k in common]]).pvalue
