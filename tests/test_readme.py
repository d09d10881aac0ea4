"""The README's commands must run: CI runs exactly its test command, and every results row
names a runnable step of tools/gpu_session.sh, which `gpu_session.sh readme` reruns."""
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    test_command = next(line for line in README.splitlines()
                        if line.startswith("pip install") and "pytest" in line)
    ci_commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_commands == [test_command]


def _steps() -> set:
    """The step names tools/gpu_session.sh's case statement handles."""
    script = (ROOT / "tools" / "gpu_session.sh").read_text()
    body = script[script.index("case $step in"):script.rindex("esac")]
    return set(re.findall(r"^ {8}([a-z0-9-]+)\)", body, re.M))


def _results_rows() -> list:
    """The README's results table: (workload, reproduce command) a row."""
    section = README[README.index("## Results"):]
    section = section[:section.index("\n## ", 1)]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    head = [cell.strip() for cell in lines[0].strip("|").split("|")]
    column = head.index("reproduce")
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == len(head), line
        rows.append((cells[0], cells[column].strip("`")))
    return rows


def test_every_results_row_reproduces_with_a_step_that_exists():
    rows = _results_rows()
    assert 6 <= len(rows) <= 10
    steps = _steps()
    for workload, command in rows:
        match = re.fullmatch(r"((?:[A-Z_]+=\S+ )*)bash tools/gpu_session\.sh ([a-z0-9-]+)", command)
        assert match, f"{workload}: {command!r} is not a gpu_session.sh step"
        assert match.group(2) in steps, f"{workload}: no step {match.group(2)!r}"


def test_readme_step_reruns_exactly_the_results_rows(tmp_path):
    """DRY=1 lists the readme step's runs: one for each distinct command of the results
    table, each in its own folder, none with a per-run limit unless LIMIT is given, and a
    variable set in the caller's environment (ENGINES) does not leak into them."""
    env = dict(os.environ, DRY="1", OUT=str(tmp_path), ENGINES="leaks-if-not-unset")
    out = subprocess.run(["bash", str(ROOT / "tools" / "gpu_session.sh"), "readme"], env=env,
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    runs = [line for line in out.splitlines() if "tools/gpu_session.sh" in line]
    dirs = [re.search(r"OUT=(\S+)", r).group(1) for r in runs]
    assert len(set(dirs)) == len(runs) and all(d.startswith(str(tmp_path)) for d in dirs)
    assert all("LIMIT=0" in r and "leaks" not in r for r in runs)
    listed = [re.sub(r"OUT=\S+ LIMIT=\S+ ", "", r).strip() for r in runs]
    commands = [command for _, command in _results_rows()]
    assert sorted(listed) == sorted(set(commands))


def test_every_gpu_session_command_in_the_readme_names_a_step():
    steps = _steps()
    assert "tools/gpu_session.sh readme" in README
    for step in re.findall(r"tools/gpu_session\.sh ((?:[a-z0-9-]+ ?)+)", README):
        for s in step.split():
            assert s in steps, f"the README runs gpu_session.sh step {s!r}, which does not exist"
