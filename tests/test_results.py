"""tools/results.py turns benchmark records into docs/results.md: tables with each run's
commit, machine and command, ratios within one run, and one clear line for bad input."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("results_tool", ROOT / "tools" / "results.py")
results = sys.modules["results_tool"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results)


def bench_row(engine, tokens_per_second, run_id="20990101T000000Z", **extra):
    """A row with the keys tools/bench.py writes that the tables read."""
    row = dict(run_id=run_id, scenario="throughput", config="humaneval x32", engine=engine,
               status="ok", device_name="NVIDIA H200", torch="2.11.0", pair="toy pair",
               command="tools/bench.py --scenario throughput --new-tokens 32",
               gpu_memory="24GiB", rows=164, tokens_per_second=tokens_per_second,
               steady_tokens_per_second=None, predicted_tokens_per_second=tokens_per_second * 1.1,
               tokens_per_pass=None, target_pass_seconds=1.712, copy_seconds_per_pass=1.696,
               fraction_of_bound=0.98, peak_gpu_bytes=20 * 2**30, tree_budget=16,
               tree_budget_final=None, draft_quant=None, commit="abc1234",
               reproduce="ENGINES=specoff-offload,specoff-tree bash tools/gpu_session.sh issue4")
    row.update(extra)
    return row


def write_lines(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def figures(tmp_path):
    folder = tmp_path / "figures"
    folder.mkdir()
    write_lines(folder / "1-throughput.jsonl", [
        {"section": "Throughput at 24 GiB", "about": "The toy pair, 164 prompts."},
        bench_row("specoff-offload", 94.6),
        bench_row("specoff-tree", 236.5, tokens_per_pass=3.81),
        bench_row("specoff-tree", 1.0, status="skipped"),
        bench_row("specoff-offload", 50.0, run_id="20990101T010000Z"),  # another run: no ratio
    ])
    write_lines(folder / "2-kernels.jsonl", [
        dict(kernel="fused_moe", shape="mixtral-8x7b", case="tokens=64", graph_ms=0.5,
             torch_ms=1.0, torch_graph_ms=None, gbps=4000.0, hbm_share=0.9, run_id="moe-run",
             commit="def5678", machine="NVIDIA H200 host", reproduce="bash tools/gpu_session.sh kernel-goals"),
    ])
    return folder


def test_tables_carry_figures_ratios_within_a_run_and_provenance(figures, tmp_path):
    out = tmp_path / "docs" / "results.md"
    assert results.main(["--figures", str(figures), "--out", str(out), "--no-plots"]) == 0
    text = out.read_text()
    assert text.startswith("# Results")
    assert "## Throughput at 24 GiB" in text and "The toy pair, 164 prompts." in text
    tree = next(line for line in text.splitlines() if "| specoff-tree |" in line)
    assert "| 236.5 |" in tree and "2.50× specoff-offload" in tree and "| 3.81 |" in tree
    assert "| budget 16 |" in tree and "| 98 |" in tree and "| 20.00 |" in tree
    other = next(line for line in text.splitlines() if "20990101T010000Z" in line and "|" in line)
    assert "| 50.0 |" in other and "×" not in other  # its baseline ran in another run
    assert "1 row(s) of these runs skipped or failed" in text
    assert ("- `20990101T000000Z`: commit abc1234, NVIDIA H200, torch 2.11.0; rerun: "
            "`ENGINES=specoff-offload,specoff-tree bash tools/gpu_session.sh issue4`; ran: "
            "`python tools/bench.py --scenario throughput --new-tokens 32`") in text
    assert text.index("## Throughput") < text.index("## 2-kernels")  # files in name order
    moe = next(line for line in text.splitlines() if line.startswith("| fused_moe"))
    assert "| 0.5000 | 1.0000 | 2.00 | 4000 | 90 |" in moe
    assert "- `moe-run`: commit def5678, NVIDIA H200 host" in text
    assert not list(out.parent.glob(".*.tmp"))  # written through a temporary file, renamed


def test_plots_where_matplotlib_is_installed(figures, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "results.md"
    assert results.main(["--figures", str(figures), "--out", str(out)]) == 0
    pngs = sorted(p.relative_to(figures).as_posix() for p in figures.rglob("*.png"))
    assert pngs == ["1-throughput/throughput-tokens_per_second.png", "2-kernels/kernels-times_torch.png"]
    assert "](figures/1-throughput/throughput-tokens_per_second.png)" in out.read_text()


@pytest.mark.parametrize("content, message", [
    ('{"scenario": "throughput", "config": "x", "engine": "e", "status": "ok"}\n{oops\n',
     ":2: not JSON"),
    ("[1, 2]\n", ":1: a line must be a JSON object, not list"),
    ('{"tokens_per_second": 3}\n', ":1: neither a bench row"),
    ('{"scenario": "throughput", "engine": "e", "status": "ok"}\n', ":1: a bench row without config"),
])
def test_a_malformed_line_is_one_clear_error(tmp_path, capsys, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    out = tmp_path / "results.md"
    assert results.main(["--figures", str(tmp_path), "--out", str(out), "--no-plots"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'bad.jsonl'}") and message in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_missing_input_is_one_clear_error(tmp_path, capsys):
    assert results.main(["--figures", str(tmp_path / "nowhere"), "--no-plots",
                         "--out", str(tmp_path / "r.md")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nowhere'}: no such folder"
    assert results.main(["--add", str(tmp_path / "run.jsonl"), "--into", "x",
                         "--figures", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'run.jsonl'}: no such file"


def test_add_keeps_a_runs_rows_with_their_provenance(tmp_path):
    run = write_lines(tmp_path / "throughput.jsonl", [
        dict(bench_row("specoff-offload", 90.0, run_id="A"), settings={"big": 1}, options={}, stats={}),
        bench_row("specoff-tree", 200.0, run_id="B"),
    ])
    kernels = tmp_path / "kernels.json"  # bench_kernels --json: NaN where a time was not taken
    kernels.write_text('{"hbm_gbps": 4486.9, "rows": [{"kernel": "fused_moe", "shape": "s", '
                       '"case": "tokens=1", "graph_ms": 0.2, "torch_ms": 0.8, "torch_graph_ms": NaN}]}')
    figures = tmp_path / "figures"
    common = ["--figures", str(figures), "--commit", "0123abc", "--machine", "an H200 host"]
    assert results.main(["--add", str(run), "--into", "t", "--runs", "A", "--section", "T"] + common) == 0
    assert results.main(["--add", str(kernels), "--into", "t", "--run-id", "k1"] + common) == 0
    records = [json.loads(line) for line in (figures / "t.jsonl").read_text().splitlines()]
    assert records[0] == {"section": "T"}
    row, kernel = records[1:]
    assert row["run_id"] == "A" and row["commit"] == "0123abc" and row["machine"] == "an H200 host"
    assert not {"settings", "options", "stats"} & set(row)
    assert kernel["torch_graph_ms"] is None and kernel["hbm_gbps"] == 4486.9
    assert kernel["run_id"] == "k1" and kernel["commit"] == "0123abc"
