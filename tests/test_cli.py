"""tools/generate.py end to end, and its one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, env_cache=None):
    env = None
    if env_cache is not None:
        import os
        env = dict(os.environ, SPECOFF_CACHE=str(env_cache))
    return subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)


def test_runs_on_a_checkpoint_with_every_prompt_source(make_checkpoint, tmp_path):
    path = make_checkpoint("mixtral")
    lines = tmp_path / "prompts.txt"
    lines.write_text("def add(a, b):\n\nclass Foo:\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": "import os"}) + "\n")
    out = tmp_path / "out.json"
    r = cli("--target", path, "--prompt", "hello", "--prompts-file", lines, "--prompts-file", jsonl,
            "--max-new-tokens", 5, "--json", out, "--dtype", "float32", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert [len(o["token_ids"]) <= 5 for o in data["outputs"]] == [True] * 4
    assert data["stats"]["rows"] == 4
    assert data["stats"]["tokens"] == sum(len(o["token_ids"]) for o in data["outputs"])
    assert "tokens/s" in r.stdout.splitlines()[-1]
    r = cli("--target", path, "--prompts-file", lines, "--dataset", "humaneval", "--limit", 3,
            "--max-new-tokens", 4, "--json", out, "--temperature", 0.7, "--top-p", 0.9,
            "--top-k", 20, "--seed", 3)
    assert r.returncode == 0, r.stderr
    outputs = json.loads(out.read_text())["outputs"]
    assert len(outputs) == 3 and outputs[2]["prompt_token_ids"][:1] == [0]
    r = cli("--target", path, "--prompt", "def", "--offload", "on", "--max-new-tokens", 4)
    assert r.returncode == 0, r.stderr
    assert "| streamed" in r.stdout.splitlines()[-1]
    assert all(o["finish_reason"] in ("stop", "length") for o in outputs)


def test_speculative_run(tmp_path, tokenizer):
    from specoff.bench.synthetic import make_upcycled_pair

    draft, target = make_upcycled_pair(tmp_path, 0.2, tokenizer=tokenizer)
    out = tmp_path / "spec.json"
    r = cli("--target", target, "--draft", draft, "--dataset", "humaneval", "--limit", 5,
            "--max-new-tokens", 12, "--draft-len", 3, "--json", out, "--ignore-eos")
    assert r.returncode == 0, r.stderr
    last = r.stdout.splitlines()[-1]
    assert "acceptance" in last and "tokens/row/pass" in last and "γ 3" in last
    stats = json.loads(out.read_text())["stats"]
    assert stats["tokens"] == 60 and 0 <= stats["acceptance_rate"] <= 1
    tree = tmp_path / "tree.json"
    r = cli("--target", target, "--draft", draft, "--prompt", "def f(x):", "--max-new-tokens", 12,
            "--spec", "tree", "--tree-budget", 16, "--json", tree, "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert "tree 16 nodes, learned ranks" in r.stdout.splitlines()[-1]
    r = cli("--target", target, "--draft", draft, "--prompt", "def f(x):", "--max-new-tokens", 12,
            "--spec", "tree", "--tree-budget", 16, "--tree-scores", "draft", "--json", tree,
            "--ignore-eos", "--set", "growth_tokens=64", "--set", "spec.tree_budget=8")
    assert r.returncode == 0, r.stderr
    assert "tree 8 nodes, draft ranks" in r.stdout.splitlines()[-1]  # --set after the flags
    stats = json.loads(tree.read_text())["stats"]
    assert stats["tree_scores"] == "draft" and stats["options"]["spec"]["growth_tokens"] == 64
    r = cli("--target", target, "--draft", draft, "--prompt", "def f(x):", "--max-new-tokens", 24,
            "--spec", "tree", "--tree-budget", "auto", "--json", tree, "--ignore-eos")
    assert r.returncode == 0, r.stderr
    stats = json.loads(tree.read_text())["stats"]
    assert stats["tree_budgets"][:2] == [64, 16] and stats["tree_budget"] in (16, 32, 64)
    assert f"tree {stats['tree_budget']} nodes" in r.stdout.splitlines()[-1]
    plain = tmp_path / "plain.json"
    assert cli("--target", target, "--dataset", "humaneval", "--limit", 5, "--max-new-tokens", 12,
               "--json", plain, "--ignore-eos").returncode == 0
    tokens = [o["token_ids"] for o in json.loads(out.read_text())["outputs"]]
    assert tokens == [o["token_ids"] for o in json.loads(plain.read_text())["outputs"]]
    fp8 = tmp_path / "fp8.json"  # the draft's weights in float8: the same tokens
    r = cli("--target", target, "--draft", draft, "--dataset", "humaneval", "--limit", 5,
            "--max-new-tokens", 12, "--draft-len", 3, "--draft-quant", "fp8", "--json", fp8,
            "--ignore-eos", "--max-rows", 2)
    assert r.returncode == 0, r.stderr
    assert [o["token_ids"] for o in json.loads(fp8.read_text())["outputs"]] == tokens
    assert json.loads(fp8.read_text())["stats"]["plan"]["rows_per_pass"] <= 2


def test_default_runs_without_a_target(tmp_path):
    from specoff import demo

    r = cli("--max-new-tokens", 8, "--quiet", env_cache=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "rows 8 | tokens" in r.stdout
    # The shipped demo pair when it is installed (tests/test_demo.py), else the random model.
    assert (tmp_path / "default-tiny-mixtral-v1" / "config.json").is_file() != demo.available()
    r = cli("--max-new-tokens", 4, "--prompt", "def", env_cache=tmp_path)  # reuses the cache
    assert r.returncode == 0 and "rows 1 |" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--target", "/no/such/folder"], "error: --target /no/such/folder is not a folder"),
    (["--prompts-file", "/no/such/file"], "error: prompts file /no/such/file does not exist"),
    (["--max-new-tokens", "0"], "error: max_new_tokens must be a positive integer"),
    (["--dtype", "int4"], "error: dtype 'int4' is not supported"),
    (["--limit", "0"], "error: --limit must be at least 1"),
    (["--draft", "/no/draft"], "error: --draft /no/draft is not a folder"),
    (["--draft-len", "many"], "error: --draft-len takes a number or auto"),
    (["--max-rows", "0"], "error: --max-rows must be at least 1"),
    (["--tree-budget", "lots"], "error: --tree-budget takes a number or auto"),
    (["--gpu-memory", "24GiB", "--device", "cpu"], "error: gpu_memory applies to a CUDA device"),
    (["--set", "kernels.pdl"], "error: --set kernels.pdl: give NAME=VALUE"),
    (["--set", "no_such=1"], "error: --set no_such=1: no option named 'no_such'"),
    (["--set", "joint_tail=maybe"], "error: --set joint_tail=maybe: option spec.joint_tail takes"),
])
def test_bad_input_is_one_line(args, message, make_checkpoint, tmp_path):
    if "--target" not in args:
        args = ["--target", str(make_checkpoint("llama"))] + args
    r = cli(*args, env_cache=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(message), r.stderr
    assert "Traceback" not in r.stderr


def test_unsupported_family_is_one_line(make_checkpoint, tmp_path):
    import shutil
    path = tmp_path / "gpt2"
    shutil.copytree(make_checkpoint("llama"), path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    r = cli("--target", path)
    assert r.returncode == 2 and "model_type 'gpt2' is not supported" in r.stderr
    assert "Traceback" not in r.stderr
