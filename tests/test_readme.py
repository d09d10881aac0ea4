"""CI must run exactly the test command the README gives users."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_command = next(line for line in readme.splitlines()
                        if line.startswith("pip install") and "pytest" in line)
    ci_commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_commands == [test_command]


def _steps() -> set:
    """The step names tools/gpu_session.sh's case statement handles."""
    import re
    script = (ROOT / "tools" / "gpu_session.sh").read_text()
    body = script[script.index("case $step in"):script.rindex("esac")]
    return set(re.findall(r"^ {8}([a-z0-9-]+)\)", body, re.M))


def test_readme_step_lists_a_known_step_for_every_results_row(tmp_path):
    """`bash tools/gpu_session.sh readme` reruns the README's results table: DRY=1 lists its
    runs, each a step the script has, each in its own folder; and every gpu_session.sh
    command the README shows names a step that exists."""
    import os
    import re
    import subprocess
    env = dict(os.environ, DRY="1", OUT=str(tmp_path), ENGINES="leaks-if-not-unset")
    out = subprocess.run(["bash", str(ROOT / "tools" / "gpu_session.sh"), "readme"], env=env,
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    runs = [line for line in out.splitlines() if "tools/gpu_session.sh" in line]
    steps = _steps()
    assert len(runs) >= 14
    dirs = [re.search(r"OUT=(\S+)", r).group(1) for r in runs]
    assert len(set(dirs)) == len(runs) and all(d.startswith(str(tmp_path)) for d in dirs)
    for r in runs:
        assert r.split()[-1] in steps, r
        assert "LIMIT=0" in r  # no per-run limit unless LIMIT is given
    readme = (ROOT / "README.md").read_text()
    assert "tools/gpu_session.sh readme" in readme
    for step in re.findall(r"tools/gpu_session\.sh ((?:[a-z0-9-]+ ?)+)", readme):
        for s in step.split():
            assert s in steps, f"the README runs gpu_session.sh step {s!r}, which does not exist"
