"""The benchmark suite must not rot: a CPU smoke run of every scenario of tools/bench.py at toy
sizes, the σ-for-α helper, and the pieces the suite leans on (in-place σ changes, peers that
run the very weights specoff runs)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import specoff
from specoff.offload import refill
from specoff.bench.synthetic import pair_configs, sigma_for_acceptance, upcycled_pair

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_tool", ROOT / "tools" / "bench.py")
bench = sys.modules["bench_tool"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

PNG = b"\x89PNG\r\n\x1a\n"
PLOTTED = ["throughput", "interactive", "sweep-budget", "sweep-rows", "sweep-gamma", "sweep-sigma"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    records = bench.main(["--tiny", "--scenario", "all", "--out", str(out), "--quiet"])
    return out, records


def jsonl(out: Path, scenario: str):
    return [json.loads(line) for line in (out / f"{scenario}.jsonl").read_text().splitlines()]


def test_every_scenario_writes_json_lines_plots_and_a_table(run, capsys):
    out, records = run
    assert set(records) == set(bench.SCENARIOS)
    for scenario in bench.SCENARIOS:
        rows = jsonl(out, scenario)
        assert rows == json.loads(json.dumps(records[scenario], default=str))
        assert all(r["status"] in ("ok", "skipped") for r in rows), [r["note"] for r in rows]
        assert all(r["scenario"] == scenario and r["device_name"] == "cpu" for r in rows)
        table = (out / f"{scenario}.md").read_text()
        assert table.startswith(f"### {scenario}")
    for scenario in PLOTTED:
        assert all(r["status"] == "ok" for r in records[scenario]), scenario
        assert "| config | engine |" in (out / f"{scenario}.md").read_text()
        for kind in ("tokens_per_second", "pass_breakdown", "acceptance"):
            assert (out / f"{scenario}-{kind}.png").read_bytes()[:8] == PNG
    for scenario in ("interactive", "sweep-budget", "sweep-rows", "sweep-gamma", "sweep-sigma"):
        assert (out / f"{scenario}-{'budget' if scenario == 'interactive' else 'sweep'}.png").is_file()


def test_interactive_runs_are_warmed_and_built_for_their_batch(run):
    """A short run first for each speculative shape of the interactive scenario and each
    specoff engine and config of the throughput one (one-time compiles and captures stay out
    of their figures), none for the peers; and the pair built for the batch's rows, as the
    command line builds it for its prompts."""
    _, records = run
    spec = [r for r in records["interactive"] if r["engine"].startswith("specoff")]
    shapes = {(r["engine"], r["batch"], str(r.get("tree_budget")), r.get("draft_len"),
               r.get("tree_scores")) for r in spec}
    assert sum(r["warmup_seconds"] is not None for r in spec) == len(shapes) > 0
    ours = [r for r in records["throughput"] if r["engine"].startswith("specoff") and r["status"] == "ok"]
    assert ours and all(r["warmup_seconds"] > 0 for r in ours)
    # Triton compiles are counted where kernels compile (not under the CPU's interpreter)
    assert all("triton_compiles" in r and "warmup_triton_compiles" in r for r in ours)
    assert all(r.get("warmup_seconds") is None for r in records["throughput"]
               if not r["engine"].startswith("specoff"))
    # each batch's own build: the weights leave room for its rows, not --rows
    assert all(r["build_rows"] == r["batch"] for r in records["interactive"] if r["status"] == "ok")


def test_throughput_rows_are_sane(run):
    out, records = run
    rows = records["throughput"]
    main = [r for r in rows if r["config"] == "humaneval x6"]
    assert {r["engine"] for r in main} == {
        "specoff-offload", "specoff-offload-group", "specoff-chain-serial",
        "specoff-chain-interleaved", "specoff-chain", "specoff-tree", "specoff-auto",
        "hf-accelerate", "hf-accelerate-pinned", "hf-assisted"}
    assert {r["config"] for r in rows} == {"humaneval x6", "long-48 x6"}
    for r in rows:
        assert r["tokens_per_second"] > 0 and r["tokens"] > 0
        assert 0 < r["sigma"] and abs(r["alpha_calibrated"] - 0.7) <= 0.05
        assert r["copy_gbps"] > 0 and r["peak_host_bytes"] > 0 and r["wall_seconds"] > 0
        if r["engine"].startswith("specoff"):
            assert r["tokens"] == r["stats"]["tokens"]
            assert r["stream_bytes_per_pass"] > 0 and r["plan"]["offload"]
            assert r["bound_tokens_per_second"] > 0
            assert r["fraction_of_bound"] == pytest.approx(r["tokens_per_second"] / r["bound_tokens_per_second"])
            if r["bound_is_limit"]:
                assert r["bound_tokens_per_second"] >= r["tokens_per_second"]
        if r["engine"] in ("specoff-chain-serial", "specoff-chain-interleaved", "specoff-chain",
                           "specoff-tree"):
            assert 0.0 <= r["acceptance_rate"] <= 1.0 and r["tokens_per_pass"] >= 1.0
            assert sum(r["accepted_histogram"]) == r["stats"]["row_passes"]
    long_rows = [r for r in rows if r["config"] == "long-48 x6" and r["engine"].startswith("specoff")]
    assert all(r["prompt_tokens_max"] == 48 for r in long_rows)
    by = {r["engine"]: r for r in main}
    assert by["specoff-chain-interleaved"]["tokens"] == 8 * 6  # 2 x rows prompts, all returned
    assert by["specoff-offload"]["tokens"] == 4 * 6
    assert by["specoff-offload-group"]["tokens"] == 2 * 6  # the rows of one of two groups
    assert by["specoff-chain"]["tokens"] == 8 * 6  # every prompt, rows refilled
    assert by["specoff-auto"]["tokens"] == 8 * 6  # the queue, whatever the planner picked
    assert by["hf-accelerate-pinned"]["matches_specoff"] is True  # same weights, same tokens
    assert by["hf-accelerate"]["layers_measured"] == 1 and by["hf-accelerate"]["scale"] == 2.0
    assert by["hf-assisted"]["rows"] == 1 and by["hf-assisted"]["tokens_per_pass"] >= 1.0


def test_interactive_and_sweeps(run):
    _, records = run
    trees = [r for r in records["interactive"] if r["engine"] == "specoff-tree"]
    assert {(r["batch"], r["tree_budget"], r["tree_scores"]) for r in trees} == {
        (b, n, s) for b in (1, 3) for n in (4, "auto") for s in ("learned", "draft")}
    assert all(bench.setting(r).endswith("draft scores") == (r["tree_scores"] == "draft")
               for r in trees)
    assert all(isinstance(r["tree_budget_final"], int) for r in trees)
    assert all(r["draft_seconds_per_round"] > 0 and r["target_pass_seconds"] > 0 for r in trees)
    sigma = {r["alpha"]: r for r in records["sweep-sigma"] if r["engine"] == "specoff-chain-interleaved"}
    assert sigma[0.9]["sigma"] < sigma[0.5]["sigma"]
    assert sigma[0.9]["acceptance_rate"] > sigma[0.5]["acceptance_rate"]  # the weights did change
    assert {r["rows"] for r in records["sweep-rows"]} == {2, 4}
    gammas = {r["gamma"]: r for r in records["sweep-gamma"] if r["engine"] == "specoff-chain-interleaved"}
    assert gammas["2"]["draft_len_final"] == 2 and gammas["auto"]["draft_len_final"] >= 1
    assert {r["budget_gib"] for r in records["sweep-budget"]} == {8.0, 24.0}
    assert not any(r["budget_applied"] for r in records["sweep-budget"])  # a CPU has no budget
    # the tree engine (what spec=None runs where the target streams) in both sweeps
    for scenario in ("sweep-budget", "sweep-rows"):
        trees = [r for r in records[scenario] if r["engine"] == "specoff-tree"]
        assert trees and all(r["status"] == "ok" and r["tree_budget"] == "auto" for r in trees)


def test_time_limit_skips_what_does_not_fit(tmp_path):
    records = bench.main(["--tiny", "--scenario", "interactive", "--out", str(tmp_path), "--quiet",
                          "--time-limit", "1"])
    rows = records["interactive"]
    assert rows and all(r["status"] == "skipped" and "time limit" in r["note"] for r in rows)
    assert len(jsonl(tmp_path, "interactive")) == len(rows)


def test_engines_and_configs_select_runs(tmp_path):
    records = bench.main(["--tiny", "--scenario", "interactive", "--out", str(tmp_path), "--quiet",
                          "--engines", "specoff-chain", "--configs", "batch 1"])
    rows = records["interactive"]
    assert rows and {(r["engine"], r["config"]) for r in rows} == {("specoff-chain", "batch 1")}
    assert all(r["status"] == "ok" for r in rows)


def test_set_options_a_run(tmp_path):
    """--set NAME=VALUE: an EngineOptions field for the run's LLMs, recorded in every row; a
    name or value the options do not take is refused before anything runs."""
    records = bench.main(["--tiny", "--scenario", "interactive", "--out", str(tmp_path), "--quiet",
                          "--engines", "specoff-tree", "--configs", "batch 1",
                          "--set", "growth_tokens=64", "--set", "kernels.pdl=off"])
    rows = records["interactive"]
    assert rows and all(r["status"] == "ok" and r["options"]["spec"]["growth_tokens"] == 64
                        and r["options"]["kernels"]["pdl"] is False for r in rows)
    with pytest.raises(SystemExit, match="no option named 'spec.no_such'"):
        bench.main(["--tiny", "--out", str(tmp_path), "--set", "spec.no_such=1"])
    with pytest.raises(SystemExit, match="joint_tail takes 'auto' or 'on' or 'off', not 'maybe'"):
        bench.main(["--tiny", "--out", str(tmp_path), "--set", "joint_tail=maybe"])


def test_offload_group_takes_the_interleaved_runs_group(tmp_path):
    """specoff-offload-group after specoff-chain-interleaved: one group's rows as that run
    had them, and the table's × offload column holds the ratio at equal rows a pass."""
    records = bench.main(["--tiny", "--scenario", "throughput", "--out", str(tmp_path), "--quiet",
                          "--engines", "specoff-chain-interleaved,specoff-offload-group",
                          "--configs", "humaneval"])
    rows = {r["engine"]: r for r in records["throughput"]}
    inter, group = rows["specoff-chain-interleaved"], rows["specoff-offload-group"]
    assert inter["status"] == group["status"] == "ok" and inter["groups"] == 2
    assert group["rows"] == inter["rows"]
    line = next(x for x in (tmp_path / "throughput.md").read_text().splitlines()
                if "specoff-chain-interleaved" in x)
    ratio = inter["tokens_per_second"] / group["tokens_per_second"]
    steady = inter["steady_tokens_per_second"] / group["steady_tokens_per_second"]
    assert inter["steady_fraction_of_bound"] == pytest.approx(
        inter["steady_tokens_per_second"] / inter["bound_tokens_per_second"])
    assert f"| {ratio:.2f} (steady {steady:.2f}) |" in line


def test_replot_puts_runs_together(tmp_path):
    """--replot: rows of two runs in one table and plots, ratios taken within a run only."""
    first, second = tmp_path / "a", tmp_path / "b"
    bench.main(["--tiny", "--scenario", "sweep-budget", "--out", str(first), "--quiet",
                "--budgets", "1", "--engines", "specoff-offload"])
    bench.main(["--tiny", "--scenario", "sweep-budget", "--out", str(second), "--quiet",
                "--budgets", "2", "--engines", "specoff-tree,specoff-offload"])
    records = bench.main(["--replot", str(first / "sweep-budget.jsonl"),
                          str(second / "sweep-budget.jsonl"), "--out", str(tmp_path / "all")])
    rows = records["sweep-budget"]
    assert len({r["run_id"] for r in rows}) == 2 and len(rows) == 3
    text = (tmp_path / "all" / "sweep-budget.md").read_text()
    runs, flatness = text.split("Flatness against the largest budget")
    assert "runs " in runs and runs.count("| specoff-offload |") == 2
    assert (tmp_path / "all" / "sweep-budget-tokens_per_second.png").exists()
    assert "| 2 GiB |" in flatness and "| 1 GiB |" in flatness


def test_budget_flatness_against_the_bus_cap():
    """Each budget's best engine against the largest budget's, beside the cap the bytes a
    pass set (bytes a pass as measured at 48 and 12 GiB: 69.7 GB and 90.0)."""
    row = lambda b, engine, tps, nbytes, **kw: dict(  # noqa: E731
        status="ok", budget_gib=b, engine=engine, tokens_per_second=tps,
        stream_bytes_per_pass=nbytes, **kw)
    text = bench.budget_flatness([
        row(48, "specoff-tree", 267.2, 69.66e9, speculated=True),
        row(48, "specoff-offload", 128.3, 69.66e9, speculated=False),
        row(12, "specoff-tree", 104.8, 92.88e9, speculated=True, draft_quant="fp8"),
        row(12, "specoff-offload", 183.3, 89.98e9, speculated=False, draft_quant="fp8"),
        dict(status="skipped", budget_gib=8, engine="specoff-tree")])
    lines = text.splitlines()
    assert lines[2].startswith("| 48 GiB | 267.2 | specoff-tree | 100 | 100 | 69.7 |")
    # the target alone is the best at 12 GiB (no draft note: it did not speculate); 69% of
    # 48 GiB's best against a cap of 69.66 / 89.98 = 77%; each engine against its own 48 GiB
    # figure beside it
    assert lines[3] == ("| 12 GiB | 183.3 | specoff-offload | 69 | 77 | 90.0 "
                        "| specoff-offload 143%, specoff-tree 39% |")
    assert len(lines) == 4 and bench.budget_flatness([]) == ""


def test_draft_grid_builds_the_pair_for_an_fp8_draft(tmp_path):
    """--draft-grid fp8: the pair built on the float8 grid, said in every row and the header."""
    records = bench.main(["--tiny", "--scenario", "interactive", "--out", str(tmp_path), "--quiet",
                          "--engines", "specoff-tree", "--configs", "batch 1",
                          "--draft-grid", "fp8", "--draft-quant", "fp8"])
    rows = records["interactive"]
    assert rows and all(r["status"] == "ok" and r["draft_grid"] == "fp8"
                        and r["draft_quant"] == "fp8" for r in rows)
    assert "float8 grid" in (tmp_path / "interactive.md").read_text()


def test_auto_engine_runs_what_the_planner_picks(run):
    """specoff-auto: the defaults a user gets (spec=None, generate(speculate=None)); its rows
    say what the planner picked."""
    _, records = run
    autos = [r for name in ("throughput", "sweep-budget") for r in records[name]
             if r["engine"] == "specoff-auto" and r["status"] == "ok"]
    assert autos and all(isinstance(r["speculated"], bool) for r in autos)
    text = (run[0] / "sweep-budget.md").read_text()
    assert "| specoff-auto | picked " in text


def test_engines_run_in_the_order_given(tmp_path):
    """--engines orders the runs within each config (a time limit cuts the last ones)."""
    records = bench.main(["--tiny", "--scenario", "throughput", "--out", str(tmp_path), "--quiet",
                          "--engines", "specoff-tree,specoff-offload", "--new-tokens", "3,2",
                          "--configs", "humaneval"])
    options = records["throughput"][0]["options"]  # the options each row ran with
    assert options["cache"]["segment_draft_cache"] == "auto" and "segment_host_cache" in options["cache"]
    assert [(r["config"], r["engine"]) for r in records["throughput"]] == [
        ("humaneval x3", "specoff-tree"), ("humaneval x3", "specoff-offload"),
        ("humaneval x2", "specoff-tree"), ("humaneval x2", "specoff-offload")]


def test_offload_alone_builds_the_target_without_the_draft(tmp_path, monkeypatch):
    """--offload-alone (the offload issue's benchmark): specoff-offload and the plain peer run
    on the target alone, the speculative engines on the pair; --peer-experts reaches
    transformers' config (its experts implementation)."""
    from specoff.bench import baselines

    seen = []
    hf_model = baselines.hf_model
    monkeypatch.setattr(baselines, "hf_model", lambda *a, **k: seen.append(k.get("experts")) or hf_model(*a, **k))
    records = bench.main(["--tiny", "--scenario", "throughput", "--out", str(tmp_path), "--quiet",
                          "--engines", "specoff-offload,hf-accelerate,specoff-chain",
                          "--new-tokens", "3", "--configs", "humaneval", "--offload-alone",
                          "--peer-experts", "eager"])
    rows = {r["engine"]: r for r in records["throughput"]}
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["specoff-offload"]["with_draft"] is False and rows["hf-accelerate"]["with_draft"] is False
    assert rows["specoff-chain"]["with_draft"] is True
    assert seen == ["eager"]


def test_text_ids_without_a_tokenizer():
    ids = bench.text_ids("def add(a, b):\n    return a + b\n", 512)
    assert len(ids) == 8 and all(3 <= i < 512 for i in ids)  # 32 bytes, 4 per id
    assert bench.text_ids("def add(a, b):\n    return a + b\n", 512) == ids


def tiny_pair():
    return pair_configs(*bench.TINY_PAIRS["mixtral"][:2])


def test_sigma_for_acceptance_hits_the_request():
    draft_cfg, target_cfg = tiny_pair()
    sigma, alpha = sigma_for_acceptance(0.7, draft_cfg, target_cfg, "cpu", seed=0)
    assert abs(alpha - 0.7) <= 0.05 and sigma > 0
    # The engine sees the same rate: chain speculation with γ = 1 accepts a draft token
    # exactly when the target's argmax agrees.
    draft, target = upcycled_pair(draft_cfg, target_cfg, sigma, 0, "cpu")
    llm = specoff.LLM(target, draft=draft, device="cpu", spec="chain", draft_len=1, interleave=False)
    prompts = torch.randint(3, 512, (32, 32), generator=torch.Generator().manual_seed(5)).tolist()
    llm.generate(prompts, specoff.SamplingParams(max_new_tokens=16, ignore_eos=True))
    assert abs(llm.last_stats.acceptance_rate - alpha) <= 0.1


def test_refill_changes_sigma_in_place():
    draft_cfg, target_cfg = tiny_pair()
    prompts = torch.randint(3, 512, (3, 10), generator=torch.Generator().manual_seed(1)).tolist()
    params = specoff.SamplingParams(max_new_tokens=6, ignore_eos=True)

    def greedy(llm):
        return [o.token_ids for o in llm.generate(prompts, params, speculate=False)]

    fresh = greedy(specoff.LLM(upcycled_pair(draft_cfg, target_cfg, 2.0, 0, "cpu")[1], device="cpu",
                               offload=True))
    llm = specoff.LLM(upcycled_pair(draft_cfg, target_cfg, 0.0, 0, "cpu")[1], device="cpu", offload=True)
    before = greedy(llm)
    refill(llm.model, upcycled_pair(draft_cfg, target_cfg, 2.0, 0, "cpu")[1].source)
    assert greedy(llm) == fresh != before


def test_profile_pass_summarises_streams_and_copy_gaps():
    """tools/profile_pass.py: per-stream busy time and copy bytes, the weight stream's idle
    gaps, from a chrome trace; its CPU smoke run completes."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import profile_pass

    ev = lambda cat, name, ts, dur, stream, nbytes=0: dict(  # noqa: E731
        cat=cat, name=name, ts=ts, dur=dur, args=dict(stream=stream, bytes=nbytes))
    trace = {"traceEvents": [
        ev("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 0, 100, 13, 1000),
        ev("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 150, 100, 13, 1000),  # 50 us idle
        ev("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 400, 100, 13, 1000),  # 150 us idle
        ev("kernel", "fused_moe", 100, 60, 7), ev("kernel", "sdpa", 120, 60, 7),  # overlap
        ev("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 200, 10, 7, 64),
        dict(cat="cpu_op", name="aten::mm", ts=0, dur=5)]}
    s = profile_pass.summarize(trace)
    assert s["copy_stream"] == "13" and s["span_seconds"] == pytest.approx(500e-6)
    assert s["streams"]["13"]["h2d_bytes"] == 3000 and s["streams"]["13"]["busy_seconds"] == pytest.approx(300e-6)
    assert s["streams"]["7"]["busy_seconds"] == pytest.approx(90e-6)  # the union of 100–180 and 200–210
    assert s["streams"]["7"]["d2h_bytes"] == 64 and s["streams"]["7"]["kernels"] == 2
    assert s["copy_stream_idle_seconds"] == pytest.approx(200e-6)
    assert s["copy_stream_gaps"][0]["seconds"] == pytest.approx(150e-6)
    # each stream's operations by total time, largest first
    assert [op["op"] for op in s["streams"]["7"]["top"]] == ["fused_moe", "sdpa", "Memcpy DtoH (Device -> Pinned)"]
    assert s["streams"]["7"]["top"][0]["seconds"] == pytest.approx(60e-6)
    out = profile_pass.main(["--tiny"])
    assert out["passes"] >= 1 and out["streams"] == {}
    out = profile_pass.main(["--tiny", "--spec", "tree", "--tree-budget", "4"])
    assert out["passes"] >= 1 and out["rounds"] == out["passes"] and out["draft_seconds"] > 0
    rows = profile_pass.main(["--tiny", "--spec", "tree", "--compare", "spec.growth_tokens=4,512"])
    assert [r["value"] for r in rows["compare"]] == ["4", "512"] * 2
    with pytest.raises(SystemExit, match="no option named 'nowhere.growth_tokens'"):
        profile_pass.main(["--tiny", "--set", "nowhere.growth_tokens=1"])
    with pytest.raises(SystemExit, match="draft_prefill_stream takes bool, not 'maybe'"):
        profile_pass.main(["--tiny", "--compare", "draft_prefill_stream=on,maybe"])
    # --syncs: the host's waits for the device by the specoff lines that called them (none
    # on the CPU); a site names the innermost specoff frames, the caller last
    out = profile_pass.main(["--tiny", "--syncs"])
    assert out["passes"] >= 1 and out["syncs"] == 0 and out["sites"] == []
    from traceback import FrameSummary
    stack = [FrameSummary("/x/tools/profile_pass.py", 9, "main"),
             FrameSummary("/x/specoff/speculation/chain_scheduler.py", 477, "_commit"),
             FrameSummary("/x/specoff/kvcache.py", 271, "assign"),
             FrameSummary("/x/torch/_tensor.py", 5, "tolist")]
    assert profile_pass.sync_site(stack) == "kvcache.py:271 assign < chain_scheduler.py:477 _commit"
    assert profile_pass.sync_site(stack[:1]) == "(outside specoff)"
    rows = profile_pass.main(["--tiny", "--offload-only", "--compare", "kernels.chain_attention=on,off"])
    assert [r["value"] for r in rows["compare"]] == ["on", "off", "on", "off"]
    assert all(r["passes"] >= 1 and r["pass_seconds"] > 0 for r in rows["compare"])
    with pytest.raises(SystemExit, match="no option"):
        profile_pass.main(["--tiny", "--set", "NOT_AN_OPTION=1"])
    with pytest.raises(SystemExit, match="not NAME=VALUE"):
        profile_pass.main(["--tiny", "--set", "kernels.pdl"])


def test_time_estimate_plans_other_budgets():
    """A run at another GPU budget is estimated with that budget's rows (fewer rows, more
    passes) and a rebuild; a budget the pair cannot fit leaves the offload run to the target
    alone. Planner arithmetic only: the real-size configs, no weights."""
    from types import SimpleNamespace

    from specoff.planner import parse_bytes, plan_weights, weight_reserve
    from specoff.options import EngineOptions
    from specoff.bench.synthetic import MISTRAL_7B, MIXTRAL_8X7B

    draft, target = pair_configs(MISTRAL_7B, MIXTRAL_8X7B)
    dtype, at = torch.bfloat16, parse_bytes("24GiB")
    weights = plan_weights(target, dtype, at, offload=True,
                           reserve=weight_reserve(target, dtype, at, 164, draft))
    fake = SimpleNamespace(args=SimpleNamespace(rows=164), cuda=True, pass_seconds=2.0,
                           llm=SimpleNamespace(weight_plan=weights, draft_config=draft,
                                               options=EngineOptions()),
                           llm_key=("24GiB", True, False, "on", None, 164), target_cfg=target,
                           draft_cfg=draft, dtype=dtype, built=dict(profile=None, seconds=20.0),
                           draft_quants=[None])
    prompts = [[1] * 113] * 327 + [[1] * 340]

    def job(engine, gpu_memory):
        return SimpleNamespace(engine=engine, params=dict(
            prompts=prompts, new_tokens=32, max_rows=328, gpu_memory=gpu_memory, offload="on",
            draft_len=4))

    rows24, _, build24 = bench.rebuild_estimate(fake, job("specoff-chain", "24GiB"))
    rows16, _, build16 = bench.rebuild_estimate(fake, job("specoff-chain", "16GiB"))
    assert build24 == 0 and build16 > 20.0  # the built pair, or a rebuild
    assert 0 < rows16 < rows24 <= 328
    assert bench.estimate(fake, job("specoff-chain", "16GiB")) > 3 * bench.estimate(
        fake, job("specoff-chain", "24GiB"))
    assert bench.rebuild_estimate(fake, job("specoff-chain", "12GiB"))[0] is None  # no fit
    assert bench.rebuild_estimate(fake, job("specoff-offload", "12GiB"))[0] > 0  # target alone
    fp8 = job("specoff-chain", "24GiB")
    fp8.params["draft_quant"] = "fp8"  # another draft: a rebuild, and more rows
    rows8, _, build8 = bench.rebuild_estimate(fake, fp8)
    assert build8 > 20.0 and rows8 > rows24


def test_qwen3_moe_pair_runs_and_transformers_agrees(tmp_path):
    """--pair picks the families: the Qwen3-MoE pair's toy twin through specoff's engines and
    transformers' own Qwen3-MoE classes on the same weights, with the same greedy tokens."""
    records = bench.main(["--tiny", "--pair", "qwen3-30b-a3b", "--scenario", "throughput",
                          "--configs", "humaneval", "--engines",
                          "specoff-offload,specoff-chain,hf-accelerate-pinned",
                          "--out", str(tmp_path), "--quiet"])
    rows = records["throughput"]
    assert [r["status"] for r in rows] == ["ok"] * 3, [r["note"] for r in rows]
    assert {r["pair"] for r in rows} == {"tiny qwen3/qwen3-moe"}
    pinned = next(r for r in rows if r["engine"] == "hf-accelerate-pinned")
    assert pinned["matches_specoff"] is True
    chain = next(r for r in rows if r["engine"] == "specoff-chain")
    assert chain["tokens_per_pass"] > 1


@pytest.mark.parametrize("name", list(bench.PAIRS))
def test_real_size_pairs_are_upcycled_pairs(name):
    """Every --pair is a valid upcycled pair at real size (shapes checked, no weights drawn)
    whose target fits a 128 GiB host once at its default depth."""
    from specoff.planner import ModelSizes

    draft_hf, target_hf, _, layers = bench.PAIRS[name]
    draft, target = pair_configs(draft_hf, target_hf, layers)
    upcycled_pair(draft, target, 0.01, device="cpu")  # raises on a mismatch
    assert target.is_moe and not draft.is_moe and layers <= target_hf["num_hidden_layers"]
    assert ModelSizes.of(target, torch.bfloat16).total < 100 * 2**30


# -- upcycled pairs on disk (tools/make_checkpoint.py --upcycle) --------------------------------

@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_upcycled_pair_on_disk_loads_in_specoff_and_transformers(family, tmp_path):
    """The folders hold the pair tools/bench.py builds in memory: the target's attention is the
    draft's, its experts the draft's feed-forward plus σ noise; specoff and transformers load
    them and decode the same greedy tokens."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from specoff.bench.synthetic import TINY_PAIRS, make_tokenizer, write_upcycled_pair

    draft_hf, target_hf, _ = TINY_PAIRS[family]
    sigma = 0.5
    draft, target, layers = write_upcycled_pair(tmp_path, draft_hf, target_hf, sigma,
                                                dtype=torch.float32, device="cpu",
                                                tokenizer=make_tokenizer())
    assert layers == target_hf["num_hidden_layers"]

    def tensors(folder):
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        out = {}
        for name, shard in index.items():
            with safe_open(str(folder / shard), "pt") as f:
                out[name] = f.get_tensor(name)
        return out

    d, t = tensors(draft), tensors(target)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(d[q], t[q]) and torch.equal(d["lm_head.weight"], t["lm_head.weight"])
    moe = "block_sparse_moe.experts.3.w1" if family == "mixtral" else "mlp.experts.3.gate_proj"
    dense, expert = d["model.layers.0.mlp.gate_proj.weight"], t[f"model.layers.0.{moe}.weight"]
    noise = (expert - dense).std() / dense.std()
    assert 0.8 * sigma < noise < 1.2 * sigma

    llm = specoff.LLM(target, draft=draft, device="cpu")
    ours = llm.generate(["def add(a, b):"], specoff.SamplingParams(max_new_tokens=8))[0]
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    ids = torch.tensor([ours.prompt_token_ids])
    theirs = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert theirs[0, ids.shape[1]:].tolist() == ours.token_ids


def test_upcycled_pair_takes_the_layers_the_disk_holds(tmp_path):
    from specoff.bench.synthetic import TINY_PAIRS, checkpoint_bytes, write_upcycled_pair

    draft_hf, target_hf, _ = TINY_PAIRS["mixtral"]
    target_hf = dict(target_hf, num_hidden_layers=6)
    one = sum(checkpoint_bytes(c, torch.float32) for c in pair_configs(draft_hf, target_hf, 1))
    two = sum(checkpoint_bytes(c, torch.float32) for c in pair_configs(draft_hf, target_hf, 2))
    room = int((one + 2 * (two - one)) / 0.95) + 1  # three layers' worth
    *_, layers = write_upcycled_pair(tmp_path / "a", draft_hf, target_hf, 0.1, dtype=torch.float32,
                                     device="cpu", disk_bytes=room)
    assert layers == 3
    cfg = json.loads((tmp_path / "a" / "target" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    with pytest.raises(ValueError, match="GiB free; the pair needs"):
        write_upcycled_pair(tmp_path / "b", draft_hf, target_hf, 0.1, dtype=torch.float32,
                            device="cpu", disk_bytes=one // 2)
    assert not (tmp_path / "b").exists()  # nothing half-written stays behind


def test_make_checkpoint_upcycle_command(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_checkpoint_tool",
                                                  ROOT / "tools" / "make_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "pair"
    assert tool.main(["--upcycle", "qwen3-30b-a3b", str(out), "--tiny", "--sigma", "0.2",
                      "--quiet"]) == 0
    assert "tiny qwen3/qwen3-moe pair at σ = 0.2" in capsys.readouterr().out
    assert (out / "draft" / "config.json").is_file() and (out / "target" / "tokenizer.json").is_file()
    assert tool.main(["--upcycle", "qwen3-30b-a3b", str(out), "--tiny", "--sigma", "0.2"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert tool.main(["--upcycle", "mixtral-8x7b", str(tmp_path / "x"), "--tiny"]) == 2
    assert "needs one of --sigma" in capsys.readouterr().err


def test_draft_quant_runs_the_speculative_engines_once_each(tmp_path):
    """--draft-quant none,fp8: the speculative engines run with a bf16 and a float8 draft, the
    float8 runs after the config's others (one LLM build each); the rest run once."""
    records = bench.main(["--tiny", "--scenario", "throughput", "--out", str(tmp_path), "--quiet",
                          "--engines", "specoff-tree,specoff-offload", "--new-tokens", "3",
                          "--configs", "humaneval", "--draft-quant", "none,fp8"])
    rows = records["throughput"]
    assert [(r["engine"], r["draft_quant"], r["status"]) for r in rows] == [
        ("specoff-tree", None, "ok"), ("specoff-offload", None, "ok"), ("specoff-tree", "fp8", "ok")]
    assert "fp8 draft" in bench.setting(rows[2]) and "fp8" not in bench.setting(rows[0])
    with pytest.raises(SystemExit, match="none and/or fp8"):
        bench.main(["--tiny", "--scenario", "throughput", "--out", str(tmp_path), "--quiet",
                    "--draft-quant", "int4"])


def test_profile_pass_finds_the_blocks_live_at_the_allocator_peak():
    """--memory-peak's replay of an allocator history: the peak counts what existed before
    (baseline, some of it freed during the run) and names the blocks live at that moment."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import profile_pass

    ours = [{"filename": "/x/specoff/spec/tree.py", "line": 7, "name": "grow"},
            {"filename": "/x/specoff/engine.py", "line": 9, "name": "generate"}]
    events = [dict(action="alloc", addr=1, size=100, frames=ours),
              dict(action="free_completed", addr=99, size=50, frames=[]),  # a baseline block
              dict(action="alloc", addr=2, size=300, frames=[]),
              dict(action="free_completed", addr=2, size=300, frames=[]),
              dict(action="alloc", addr=3, size=200, frames=ours),
              dict(action="alloc", addr=4, size=220, frames=ours[1:]),
              dict(action="free_completed", addr=1, size=100, frames=ours)]
    peak, blocks = profile_pass.peak_live_blocks(events, baseline=1000)
    assert peak == 1000 + 100 - 50 + 200 + 220
    assert sorted(b["addr"] for b in blocks) == [1, 3, 4]
    assert profile_pass.allocation_site(ours) == "tree.py:7 grow < engine.py:9 generate"
    assert profile_pass.allocation_site([]) == "(outside specoff)"


def test_a_pair_takes_the_layers_the_host_holds():
    """Mixtral-8x22B's 56 layers (281 GB in bf16) do not fit a 128 GiB host: the run builds as
    many as its free memory holds beside room for the caches; smaller pairs build all."""
    from specoff.config import ModelConfig

    per_layer = bench.ModelSizes.of(ModelConfig.from_dict(bench.PAIRS["mixtral-8x22b"][1]),
                                    torch.bfloat16).layer
    free = 120 << 30
    assert bench.layers_the_host_holds("mixtral-8x22b", free) == (free - bench.HOST_CACHE_ROOM) // per_layer
    assert bench.layers_the_host_holds("mixtral-8x22b", free) < 56
    assert bench.layers_the_host_holds("mixtral-8x22b", 1 << 40) == 56
    assert bench.layers_the_host_holds("mixtral-8x7b", free) == 32
    assert bench.layers_the_host_holds("mixtral-8x22b", None) == bench.PAIRS["mixtral-8x22b"][3]


def test_kernel_bench_groups_a_steps_launches_by_layer():
    """tools/bench_kernels.py's draft profile: a step's launches with the layers' repeated
    pattern summed position by position (a pattern with a kernel twice in a row is not
    mistaken for a shorter one), what comes before and after as it comes; no pattern, as
    launched."""
    spec = importlib.util.spec_from_file_location("bench_kernels_tool", ROOT / "tools" / "bench_kernels.py")
    kernels_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels_bench)
    layer = ["norm", "wqkv", "attention", "wo", "w13", "w2", "w2"]
    names = ["embed"] + layer * 3 + ["norm", "head"]
    ms = [float(i) for i in range(len(names))]
    got = kernels_bench.layer_pattern(names, ms, 3)
    assert got[0] == ("embed", 1, 0.0) and got[-2:] == [("norm", 1, 22.0), ("head", 1, 23.0)]
    assert [(name, count) for name, count, _ in got[1:-2]] == [(f"layer: {k}", 3) for k in layer]
    assert [t for _, _, t in got[1:-2]] == [sum(1.0 + j + 7 * i for i in range(3)) for j in range(7)]
    assert kernels_bench.layer_pattern(["a", "b"], [1.0, 2.0], 3) == [("a", 1, 1.0), ("b", 1, 2.0)]
