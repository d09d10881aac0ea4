"""The demo pair: tools/train_demo_pair.py end to end at toy size, and the pair shipped in
specoff/demo (those tests skip while it is absent)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import specoff
from specoff import demo

ROOT = Path(__file__).resolve().parent.parent
SIZE_LIMIT = 24_000_000
shipped = pytest.mark.skipif(not demo.available(),
                             reason="the trained demo pair is not in specoff/demo yet "
                                    "(python tools/train_demo_pair.py writes it)")


@torch.inference_mode()
def assert_same_logits(folder: Path, text: str) -> None:
    """specoff and transformers load the folder with the same tokens and logits (fp32)."""
    ids = AutoTokenizer.from_pretrained(str(folder))(text)["input_ids"]
    assert ids == specoff.load_tokenizer(folder)(text)["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ours = specoff.load_model(folder, device="cpu", dtype="float32")
    expect, got = ref(torch.tensor([ids])).logits, ours(torch.tensor([ids]))
    err, scale = (got - expect).abs().max(), expect.abs().max()
    assert err <= 1e-4 * scale, f"{folder.name}: max abs error {err:.3g} for logit scale {scale:.3g}"


def assert_speculation_equals_target(target: Path, draft: Path, prompts, new_tokens: int) -> None:
    params = specoff.SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    expect = [o.token_ids for o in
              specoff.LLM(target, device="cpu", dtype="float32").generate(prompts, params)]
    for kw in (dict(spec="chain", draft_len=4), dict(spec="tree", tree_budget=64)):
        llm = specoff.LLM(target, draft=draft, device="cpu", dtype="float32", **kw)
        got = [o.token_ids for o in llm.generate(prompts, params)]
        assert got == expect, f"{kw}: speculative greedy output differs from the target's"
        assert 0 <= llm.last_stats.acceptance_rate <= 1


def train_demo_pair(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "train_demo_pair.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_tiny_training_run(tmp_path):
    out, bundle = tmp_path / "demo", tmp_path / "bundle"
    r = train_demo_pair("--tiny", "--out", out, "--bundle", bundle)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    # The bundle (3 files, for a machine that sends few files back) unpacks to the same pair.
    assert sorted(f.name for f in bundle.iterdir()) == ["draft.safetensors", "rest.tar", "target.safetensors"]
    assert train_demo_pair("--unbundle", bundle, "--out", tmp_path / "copy").returncode == 0
    for f in out.rglob("*"):
        if f.is_file():
            assert f.read_bytes() == (tmp_path / "copy" / f.relative_to(out)).read_bytes(), f
    manifest = json.loads((out / "manifest.json").read_text())
    train = {f["path"] for f in manifest["training_files"]}
    held = {f["path"] for f in manifest["held_out_files"]}
    assert train and held and not train & held
    assert all(demo.is_held_out(p) for p in held) and not any(demo.is_held_out(p) for p in train)
    assert manifest["bytes"]["total"] <= SIZE_LIMIT
    assert manifest["target"]["steps"] > 0 and manifest["draft"]["steps"] > 0
    assert 0 <= manifest["heldout"]["alpha"] <= 1
    for name, family in (("target", "mixtral"), ("draft", "llama")):
        config = json.loads((out / name / "config.json").read_text())
        assert config["model_type"] == family
        assert config.get("dtype", config.get("torch_dtype")) == "float16"
        assert_same_logits(out / name, demo.DEFAULT_PROMPT)
    assert_speculation_equals_target(out / "target", out / "draft", [demo.DEFAULT_PROMPT], 8)


def test_held_out_modules_exist_and_are_never_trained_on():
    held = demo.held_out_files()
    names = {p.relative_to(demo.stdlib_root()).as_posix() for p in held}
    for module in demo.HELD_OUT:  # every listed module is in this interpreter's stdlib
        assert any(n == module or n.startswith(module) for n in names), module
    assert not names & set(demo.training_files())


@shipped
def test_shipped_pair_loads_in_specoff_and_transformers():
    target, draft = specoff.ModelConfig.from_hf(demo.target_dir()), specoff.ModelConfig.from_hf(demo.draft_dir())
    assert target.family == "mixtral" and target.n_experts >= 4 and target.top_k == 2
    assert draft.family in ("llama", "qwen3") and draft.vocab_size == target.vocab_size <= 8192
    size = sum(f.stat().st_size for d in (demo.target_dir(), demo.draft_dir())
               for f in d.rglob("*") if f.is_file())
    assert size <= SIZE_LIMIT
    prompt = demo.humaneval_prompts(1)[0]
    for folder in (demo.target_dir(), demo.draft_dir()):
        assert_same_logits(folder, prompt)


@shipped
def test_shipped_speculation_equals_target():
    assert_speculation_equals_target(demo.target_dir(), demo.draft_dir(),
                                     demo.humaneval_prompts(3), 32)


@shipped
def test_shipped_alpha_on_held_out_text():
    stated = demo.manifest()["heldout"]["alpha"]  # what the training script measured (the README quotes it)
    tokenizer = specoff.load_tokenizer(demo.target_dir())
    windows = demo.held_out_windows(tokenizer, demo.ALPHA_TOKENS)
    measured = demo.teacher_forced(specoff.load_model(demo.target_dir(), device="cpu", dtype="float32"),
                                   specoff.load_model(demo.draft_dir(), device="cpu", dtype="float32"),
                                   windows)
    assert measured["alpha"] >= stated - 0.05, (measured, stated)


@shipped
def test_default_command_line_runs_the_shipped_pair(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), "--max-new-tokens", "16",
                        "--limit", "2"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, SPECOFF_CACHE=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert "demo pair" in r.stderr and "acceptance" in r.stdout.splitlines()[-1]
    assert not (tmp_path / "default-tiny-mixtral-v1").exists()
