"""Tune the fused-MoE launch parameters offline on a GPU and write specoff/kernels/configs/*.json.

For each token count, every BLOCK_M that suits the rows per expert is tried with a grid of
(BLOCK_N, BLOCK_K, GROUP_M, warps, stages) for each of the two grouped GEMMs (gate-up:
N_out = 2I, K = D; down: N_out = D, K = I); the BLOCK_M with the lowest summed time wins (both
launches share one grouping). Each candidate is timed as CUDA-graph replays, so the host
time an eager launch costs does not drown the device-time differences. All
candidates are compiled first by a pool of worker processes (Triton's on-disk cache), which
turns ~10 minutes of serial compiling into well under one.

The files are keyed like vLLM's: E, N_out, K, device name, dtype; moe.get_config picks the
entry with the nearest token count. Entries of token counts not tuned in this run are kept.
Their names hold '=' and ','; --copy-to DIR also writes each as moe-<n>.json holding its real
name, which --install-from DIR puts back.

    python3 tools/tune_kernels.py --shape mixtral-8x7b --medium [--tokens 1 8 16 64 256 1024 1280]
    python3 tools/tune_kernels.py --D 4096 --I 14336 --E 8 --top-k 2 --quick
    python3 tools/tune_kernels.py --attention          # time verify_attention tile shapes, print a table
    python3 tools/tune_kernels.py --install-from DIR   # configs copied back from a GPU machine
    python3 tools/tune_kernels.py --resources          # no GPU: registers/spills/shared memory for sm_90
"""
from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import multiprocessing
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from specoff.kernels import moe  # noqa: E402

SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
BLOCK_MS = (16, 32, 64, 128)


def search_space(mode: str, rows_per_expert: float) -> dict:
    """Candidate values for one token count; BLOCK_M from rows/8 to 2 x rows per expert."""
    block_ms = [m for m in BLOCK_MS if rows_per_expert / 8 <= m <= 2 * rows_per_expert] or [16]
    if mode == "quick":
        return dict(BLOCK_M=[m for m in block_ms if m in (16, 64)] or [16], BLOCK_N=[64, 128], BLOCK_K=[64, 128],
                    GROUP_M=[8], num_warps=[4, 8], num_stages=[3, 4])
    if mode == "medium" and rows_per_expert <= 8:  # weight-bandwidth bound: narrow, deep tiles
        return dict(BLOCK_M=[16], BLOCK_N=[16, 32, 64, 128], BLOCK_K=[128, 256], GROUP_M=[1], num_warps=[4],
                    num_stages=[3, 4, 5])
    if mode == "medium":
        return dict(BLOCK_M=block_ms, BLOCK_N=[64, 128, 256], BLOCK_K=[64, 128], GROUP_M=[8], num_warps=[4, 8],
                    num_stages=[3, 4, 5])
    return dict(BLOCK_M=list(BLOCK_MS), BLOCK_N=[32, 64, 128, 256], BLOCK_K=[64, 128, 256], GROUP_M=[1, 8, 32],
                num_warps=[4, 8], num_stages=[2, 3, 4, 5])


def candidates(space: dict, block_m: int, gated: bool, elem_size: int, max_shared: int):
    """The configs of one BLOCK_M that fit in shared memory and keep the accumulators in registers."""
    for bn, bk, gm, nw, ns in itertools.product(space["BLOCK_N"], space["BLOCK_K"], space["GROUP_M"],
                                                space["num_warps"], space["num_stages"]):
        cfg = dict(BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=nw, num_stages=ns)
        if ns * moe.shared_bytes_per_stage(cfg, elem_size, gated) > max_shared:
            continue
        if (2 if gated else 1) * block_m * bn // (32 * nw) > 128:  # fp32 accumulators per thread
            continue
        yield cfg


# ---------------------------------------------------------------------------------------
# Compiling in parallel


class GemmLaunch:
    """Everything one grouped-GEMM launch specialises on, with the tensors as dtypes: the
    pointer kernel, or (tma) the descriptor kernel over `a` in grouped order."""

    def __init__(self, a, w, out, route_w, sorted_pairs, block_expert, num_pairs, top_k, cfg, gated, tma=False):
        self.gated, self.tma = gated, tma
        self.cfg = dict(cfg, TMA=1) if tma else dict(cfg)
        N = w.shape[1] // 2 if gated else w.shape[1]
        self.dtypes = (a.dtype, w.dtype, out.dtype, route_w.dtype, sorted_pairs.dtype, block_expert.dtype)
        self.one_dot = tma and gated and bool(cfg.get("ONE_DOT"))
        if tma:  # descriptors (shape, strides, block) of a [num_padded, K] and w, then the kernel's ints
            E, rows, K = w.shape
            w_desc = (([E, 2, rows // 2, K], [w.stride(0), rows // 2 * w.stride(1), w.stride(1), 1],
                       [1, 2, cfg["BLOCK_N"], cfg["BLOCK_K"]]) if self.one_dot else
                      ([E * rows, K], [w.stride(1), 1], [cfg["BLOCK_N"], cfg["BLOCK_K"]]))
            self.descs = (([sorted_pairs.numel(), K], [a.stride(0), 1], [cfg["BLOCK_M"], cfg["BLOCK_K"]]), w_desc)
            self.ints = (num_pairs, sorted_pairs.numel(), N, w.shape[2], w.shape[1], out.stride(0), out.stride(1))
        else:
            self.ints = (num_pairs, sorted_pairs.numel(), N, w.shape[2], top_k,
                         a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1))
        self.ieee = a.dtype == torch.float32

    def key(self):
        return (self.gated, self.tma, self.ints, self.dtypes, tuple(sorted(self.cfg.items())))

    def warmup(self):
        cfg = self.cfg
        tiles = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
                     num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], grid=(1,))
        if self.tma:  # descriptors over stand-in tensors of the right dtype (Triton's MockTensor)
            from triton.runtime.jit import MockTensor

            descriptor = moe._tensor_descriptor()
            descs = [descriptor(MockTensor(dtype), *d) for dtype, d in zip(self.dtypes[:2], self.descs)]
            return moe._moe_gemm_tma_kernel.warmup(
                *descs, *self.dtypes[2:], *self.ints,
                GATED=self.gated, OUT_SORTED=self.gated, WEIGHTED=not self.gated, IEEE=self.ieee,
                ONE_DOT=self.one_dot, **tiles)
        return moe._moe_gemm_kernel.warmup(
            *self.dtypes, *self.ints,
            GATED=self.gated, A_PER_TOKEN=self.gated, WEIGHTED=not self.gated, IEEE=self.ieee, **tiles)


def _compile_in_worker(launch: GemmLaunch) -> bool:
    try:
        launch.warmup()
        return True
    except Exception:  # too big for this GPU: the timing loop skips it too
        return False


def precompile(launches, workers: int):
    """Compile every launch into Triton's on-disk cache in `workers` processes; the timing loop then loads."""
    unique = {l.key(): l for l in launches}
    t0 = time.time()
    ctx = multiprocessing.get_context("spawn")  # CUDA is initialised here: no fork
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        ok = sum(pool.map(_compile_in_worker, unique.values(), chunksize=1))
    print(f"compiled {ok}/{len(unique)} kernels in {time.time() - t0:.0f} s with {workers} processes", flush=True)


# ---------------------------------------------------------------------------------------
# Timing


def graph_ms(fn, target_ms: float = 4.0, replays: int = 5) -> float:
    """Median device time of fn from replays of a CUDA graph of several calls; inf if it cannot run."""
    try:
        fn()  # compile or load outside the capture
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
        torch.cuda.synchronize()
        calls = max(1, min(200, int(target_ms / max(start.elapsed_time(end) / 3, 1e-3))))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()  # warm
        times = []
        for _ in range(replays):
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / calls)
        return sorted(times)[len(times) // 2]
    except Exception:  # out of shared memory / registers for this tile: not a candidate
        torch.cuda.synchronize()
        return float("inf")


def tune_inputs(D, I, E, top_k, dtype, tokens, weights):
    w13, w2 = weights
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, D, device="cuda", dtype=dtype, generator=gen)
    topk_weights, topk_ids = moe.moe_route(torch.randn(tokens, E, device="cuda", generator=gen), top_k, True)
    pairs = tokens * top_k
    route_w = topk_weights.reshape(-1).contiguous()
    hidden = torch.empty(pairs, I, device="cuda", dtype=dtype)
    down = torch.empty(pairs, D, device="cuda", dtype=dtype)
    return x, w13, w2, topk_weights, topk_ids, route_w, hidden, down


def layouts(tokens, top_k, E, x, w13, w2, tma: bool):
    """The launch layouts to try: the pointer kernels, and the descriptor kernels where they
    can run and rows are more than the weight-bound few (≤ 8 an expert: the gather of x
    into grouped order would be paid for nothing)."""
    return (False, True) if tma and tokens * top_k / E > 8 and moe.tma_usable(x, w13, w2) else (False,)


def operands(gated, tma, x, w13, w2, hidden, down, sorted_pairs, num_pairs, top_k):
    """(a, w, out) of one launch; descriptor launches read x in grouped order and keep the
    intermediate in that order ([num_padded, I])."""
    if not tma:
        return (x, w13, hidden) if gated else (hidden, w2, down)
    grouped_hidden = torch.empty(sorted_pairs.numel(), hidden.shape[1], device=x.device, dtype=x.dtype)
    if gated:
        return moe.grouped_rows(x, sorted_pairs, num_pairs, top_k), w13, grouped_hidden
    return grouped_hidden.normal_(), w2, down


def plan_tokens(D, I, E, top_k, dtype, tokens, mode, weights, max_shared, tma=True):
    """[(block_m, sorted_pairs, block_expert, [(gated, tma, [GemmLaunch])])] for one token count."""
    x, w13, w2, _, topk_ids, route_w, hidden, down = tune_inputs(D, I, E, top_k, dtype, tokens, weights)
    space = search_space(mode, tokens * top_k / E)
    elem = torch.finfo(dtype).bits // 8
    plan = []
    for block_m in space["BLOCK_M"]:
        sorted_pairs, block_expert = moe.moe_align(topk_ids, E, block_m)
        gemms = []
        for by_descriptor in layouts(tokens, top_k, E, x, w13, w2, tma):
            for gated in (True, False):
                a, w, out = operands(gated, by_descriptor, x, w13, w2, hidden, down, sorted_pairs, tokens * top_k, top_k)
                cfgs = list(candidates(space, block_m, gated, elem, max_shared))
                if by_descriptor and gated:  # the gate and up tiles also as one box and one product
                    cfgs += [dict(cfg, ONE_DOT=1) for cfg in cfgs]
                launches = [GemmLaunch(a, w, out, route_w, sorted_pairs, block_expert, tokens * top_k, top_k, cfg,
                                       gated, by_descriptor) for cfg in cfgs]
                gemms.append((gated, by_descriptor, launches))
        plan.append((block_m, sorted_pairs, block_expert, gemms))
    return plan


def tune_tokens(D, I, E, top_k, dtype, tokens, plan, weights):
    """(summed ms, gate_up cfg, down cfg): the fastest pair of one BLOCK_M and one layout
    (both launches pointer kernels, or both descriptor kernels: they share the intermediate)."""
    x, w13, w2, _, _, route_w, hidden, down = tune_inputs(D, I, E, top_k, dtype, tokens, weights)
    best = None
    for block_m, sorted_pairs, block_expert, gemms in plan:
        per_layout = {}
        for gated, by_descriptor, launches in gemms:
            a, w, out = operands(gated, by_descriptor, x, w13, w2, hidden, down, sorted_pairs, tokens * top_k, top_k)
            results = []
            for launch in launches:
                cfg = launch.cfg
                if by_descriptor:
                    run = lambda: moe._launch_gemm_tma(a, w, out, route_w, sorted_pairs, block_expert,  # noqa: E731
                                                       tokens * top_k, cfg, gated=gated, out_sorted=gated,
                                                       weighted=not gated)
                else:
                    run = lambda: moe._launch_gemm(a, w, out, route_w, sorted_pairs, block_expert,  # noqa: E731
                                                   tokens * top_k, top_k, cfg, gated=gated, a_per_token=gated,
                                                   weighted=not gated)
                results.append((graph_ms(run), cfg))
            per_layout.setdefault(by_descriptor, []).append(
                min(results, key=lambda r: r[0]) if results else (float("inf"), None))
        for by_descriptor, (gate_up, down_) in per_layout.items():
            total = gate_up[0] + down_[0]
            # The descriptor layout also pays the gather of x into grouped order: timed once.
            extra = graph_ms(lambda: moe.grouped_rows(x, sorted_pairs, tokens * top_k, top_k)) if by_descriptor else 0.0
            print(f"  tokens={tokens} BLOCK_M={block_m} {'descriptors' if by_descriptor else 'pointers'}: "
                  f"gate_up {gate_up[0]:.4f} ms, down {down_[0]:.4f} ms"
                  + (f", gather {extra:.4f} ms" if by_descriptor else ""), flush=True)
            if best is None or total + extra < best[0]:
                best = (total + extra, gate_up[1], down_[1])
    return best


# ---------------------------------------------------------------------------------------
# Attention tile shapes (a table to read, nothing written)


def tune_attention():
    from bench_kernels import ATTN_SHAPES, attention_inputs  # tools/ is on sys.path when run as a script

    from specoff.kernels.attention import _verify_attention_into, launch_config

    cases = [(1, 256, 4096, True), (8, 64, 2048, True), (1, 1024, 4096, True), (64, 5, 4096, False)]
    tile = lambda bq, bn, nw, ns: dict(BLOCK_Q=bq, BLOCK_N=bn, num_warps=nw, num_stages=ns)  # noqa: E731
    tree_variants = [tile(128, 64, 8, 3), tile(128, 64, 8, 2), tile(128, 64, 8, 4), tile(128, 32, 8, 3),
                     tile(128, 128, 8, 2), tile(64, 64, 4, 2), tile(64, 64, 4, 3), tile(64, 128, 4, 2),
                     tile(64, 64, 8, 3)]
    chain_variants = [tile(32, 64, 4, 2), tile(32, 64, 4, 3), tile(64, 64, 4, 2), tile(64, 64, 8, 2)]
    print("| shape | case | default config | default ms | best variant | best ms | next best |")
    print("| --- | --- | --- | ---: | --- | ---: | --- |", flush=True)
    for shape, (H, KV, hd) in ATTN_SHAPES.items():
        for B, T, prefix, tree in cases:
            q, k_cache, v_cache, lengths, tree_mask = attention_inputs(shape, B, T, prefix, tree)
            S = k_cache.shape[2]
            out = torch.empty_like(q)
            default = launch_config(B, KV, T, H // KV, hd, S, q.device)
            default_ms = graph_ms(lambda: _verify_attention_into(q, k_cache, v_cache, lengths, tree_mask,
                                                                 hd**-0.5, S, out))
            results = []
            for variant in tree_variants if tree else chain_variants:
                for splits in sorted({1, 2, 3, 4, 6, 8, default["num_splits"]}):
                    cfg = dict(variant, num_splits=splits)
                    ms = graph_ms(lambda: _verify_attention_into(q, k_cache, v_cache, lengths, tree_mask,
                                                                 hd**-0.5, S, out, config=cfg))
                    results.append((ms, cfg))
            results.sort(key=lambda r: r[0])
            keys = ("BLOCK_Q", "BLOCK_N", "num_warps", "num_stages", "num_splits")
            show = lambda c: "/".join(str(c[k]) for k in keys)  # noqa: E731
            runners_up = ", ".join(f"{show(c)} {t:.4f}" for t, c in results[1:4])
            print(f"| {shape} | B={B} T={T} prefix={prefix} {'tree' if tree else 'chain'} | {show(default)} | "
                  f"{default_ms:.4f} | {show(results[0][1])} | {results[0][0]:.4f} | {runners_up} |", flush=True)
    print("(configs as BLOCK_Q/BLOCK_N/num_warps/num_stages/num_splits; CUDA-graph replay medians)")


# ---------------------------------------------------------------------------------------
# Compiler resource report (no GPU needed)


def compile_for(kernel, args: dict, num_warps: int, num_stages: int, capability: int = 90):
    """Compile `kernel` for sm_<capability> on any machine: args maps each parameter to a type
    ('*bf16', 'i32', ...; a '/16' suffix marks an int divisible by 16, as Triton specialises
    one at launch) or to a constexpr value (ints equal to 1 are constexprs at launch too)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = args[param.name]
        if isinstance(value, str):
            signature[param.name] = value.split("/")[0]
            if value.startswith("*") or value.endswith("/16"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def resources(compiled) -> str:
    """Registers, spill stack and shared memory of a compiled kernel (cuobjdump), wgmma or mma.sync."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "no mma"
    regs, stack = found.groups() if found else ("?", "?")
    return f"{regs} registers, {stack} B stack, {compiled.metadata.shared // 1024} KB shared, {mma}"


def resource_report():
    """The default launch configs of both kernels at Mixtral shapes, compiled for sm_90 here."""
    import triton

    from specoff.kernels import attention

    def strides(*names):
        return {n: "i32/16" for n in names}

    print(f"triton {triton.__version__}; a spill shows as stack > 0 (look for it inside the main loop)")
    D, I, E, top_k = SHAPES["mixtral-8x7b"]
    for tokens in (1, 8, 64, 256, 1280):
        for gated, (n_out, k) in ((True, (2 * I, D)), (False, (D, I))):
            cfg = moe._default_config(E, n_out, k, tokens, top_k, torch.bfloat16, 232448)
            args = dict(a_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", topk_weights_ptr="*fp32",
                        sorted_pairs_ptr="*i32", block_expert_ptr="*i32", num_pairs="i32", num_padded="i32/16",
                        N="i32/16", K="i32/16", top_k="i32", stride_ak=1, stride_wk=1, stride_on=1,
                        GATED=gated, A_PER_TOKEN=gated, WEIGHTED=not gated, IEEE=False, GROUP_M=cfg["GROUP_M"],
                        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                        **strides("stride_am", "stride_we", "stride_wn", "stride_om"))
            compiled = compile_for(moe._moe_gemm_kernel, args, cfg["num_warps"], cfg["num_stages"])
            print(f"fused_moe tokens={tokens} {'gate_up' if gated else 'down'} {cfg}: {resources(compiled)}")
            if tokens < 256:
                continue
            bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
            args = dict(a_desc=f"tensordesc<bf16[{bm},{bk}]>", w_desc=f"tensordesc<bf16[{bn},{bk}]>", out_ptr="*bf16",
                        topk_weights_ptr="*fp32", sorted_pairs_ptr="*i32", block_expert_ptr="*i32",
                        num_pairs="i32", num_padded="i32/16", N="i32/16", K="i32/16", W_ROWS="i32/16",
                        stride_om="i32/16", stride_on=1, GATED=gated, OUT_SORTED=gated, WEIGHTED=not gated,
                        IEEE=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"])
            for one_dot in (False, True) if gated else (False,):
                if one_dot:
                    args["w_desc"] = f"tensordesc<bf16[1,2,{bn},{bk}]>"
                compiled = compile_for(moe._moe_gemm_tma_kernel, dict(args, ONE_DOT=one_dot), cfg["num_warps"],
                                       cfg["num_stages"])
                ptx = compiled.asm["ptx"]
                print(f"fused_moe tokens={tokens} {'gate_up' if gated else 'down'} by descriptors"
                      f"{', one product' if one_dot else ''}: {resources(compiled)}, "
                      f"{'TMA' if 'cp.async.bulk.tensor' in ptx else 'no TMA'}, "
                      f"{ptx.count('wgmma.mma_async')} wgmma instructions")
    num_sms, attention._num_sms = attention._num_sms, lambda device: 132  # a Hopper GPU's, even without a GPU
    shared, moe.max_shared_memory = moe.max_shared_memory, lambda device: 232448
    for (H, KV, hd), B, T, tree in (((32, 8, 128), 64, 1, False), ((32, 8, 128), 64, 5, False),
                                     ((32, 4, 128), 64, 5, False), ((32, 8, 128), 1, 256, True),
                                     ((32, 8, 128), 1, 1024, True)):
        cfg = attention.launch_config(B, KV, T, H // KV, hd, 4096 + T, torch.device("cuda"), elem_size=2)
        rope = not tree and T * (H // KV) <= 32  # a chain in one query block: the fused rotary too
        args = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", lengths_ptr="*i64",
                    tree_ptr="*i1" if tree else "*i64", seg_ptr="*i64", row_ptr="*i64", out_ptr="*bf16",
                    part_o_ptr="*fp32", part_lse_ptr="*fp32", qkv_ptr="*bf16", cos_ptr="*bf16", sin_ptr="*bf16",
                    pos_ptr="*i64", T="i32", N="i32", kv_heads="i32", num_splits="i32", keys_per_split="i32/16",
                    qk_scale="fp32", S="i32", half="i32/16",
                    stride_mj=1, G=H // KV, HEAD_DIM=hd, HAS_TREE=tree, SEGMENTED=False, SPLIT=cfg["num_splits"] > 1, IEEE=False,
                    WHOLE_TILES=cfg["WHOLE_TILES"], ROW_START=False, ROPE_WRITE=rope, BLOCK_G=H // KV, BLOCK_HALF=hd // 2,
                    USE_PDL=False,
                    BLOCK_Q=cfg["BLOCK_Q"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=hd,
                    **strides("stride_xb", "stride_xt", "stride_cb", "stride_ct", "stride_pb", "stride_pt"),
                    **strides("stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kh", "stride_ks",
                              "stride_vb", "stride_vh", "stride_vs", "stride_mb", "stride_mt", "stride_sb",
                              "stride_st", "stride_ob",
                              "stride_ot", "stride_oh"))
        shown = {k: cfg[k] for k in ("BLOCK_Q", "BLOCK_N", "num_warps", "num_stages", "num_splits")}
        for q_regs in (False, True) if rope else (False,):  # the rotated queries through scratch / in registers
            compiled = compile_for(attention._verify_attention_kernel, dict(args, Q_REGS=q_regs), cfg["num_warps"],
                                   cfg["num_stages"])
            print(f"verify_attention G={H // KV} B={B} T={T} {'tree' if tree else 'chain'}"
                  f"{' + rope' if rope else ''}{' (queries in registers)' if q_regs else ''} {shown}: {resources(compiled)}")
    attention._num_sms, moe.max_shared_memory = num_sms, shared


# ---------------------------------------------------------------------------------------
# Files


def write_tables(tables: dict, out_dir: str, copy_to: str | None, replace: bool):
    """tables: file name -> {tokens: cfg}; merged into existing files unless replace."""
    os.makedirs(out_dir, exist_ok=True)
    for i, (name, table) in enumerate(sorted(tables.items())):
        path = os.path.join(out_dir, name)
        merged = {}
        if os.path.exists(path) and not replace:
            with open(path) as f:
                merged = {int(t): cfg for t, cfg in json.load(f).items()}
        merged.update(table)
        text = json.dumps({str(t): merged[t] for t in sorted(merged)}, indent=1)
        with open(path, "w") as f:
            f.write(text + "\n")
        print(f"wrote {path}\n{text}", flush=True)
        if copy_to:
            os.makedirs(copy_to, exist_ok=True)
            with open(os.path.join(copy_to, f"moe-{i}.json"), "w") as f:
                json.dump({"file_name": name, "table": {str(t): merged[t] for t in sorted(merged)}}, f, indent=1)


def install_from(folder: str, out_dir: str):
    for entry in sorted(os.listdir(folder)):
        if entry.startswith("moe-") and entry.endswith(".json"):
            with open(os.path.join(folder, entry)) as f:
                copy = json.load(f)
            with open(os.path.join(out_dir, copy["file_name"]), "w") as f:
                f.write(json.dumps(copy["table"], indent=1) + "\n")
            print("installed", os.path.join(out_dir, copy["file_name"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES))
    parser.add_argument("--D", type=int)
    parser.add_argument("--I", type=int)
    parser.add_argument("--E", type=int)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 16, 64, 256, 1024, 1280])
    space = parser.add_mutually_exclusive_group()
    space.add_argument("--quick", action="store_true", help="a small search space (about a minute)")
    space.add_argument("--medium", action="store_true",
                       help="BLOCK_M to 128, BLOCK_N to 256, 3-5 stages (a few minutes for 7 token counts)")
    parser.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)),
                        help="compiling processes")
    parser.add_argument("--out-dir", default=moe.CONFIG_DIR)
    parser.add_argument("--replace", action="store_true", help="drop entries of token counts not tuned now")
    parser.add_argument("--copy-to", help="also write moe-<n>.json copies with plain names here")
    parser.add_argument("--install-from", help="write the configs copied by --copy-to into --out-dir and stop")
    parser.add_argument("--no-tma", action="store_true",
                        help="pointer kernels only (by default descriptor launches compete past 8 rows an expert)")
    parser.add_argument("--attention", action="store_true", help="time verify_attention tile shapes instead")
    parser.add_argument("--resources", action="store_true",
                        help="compile the default configs for sm_90 (no GPU needed): registers, spills, shared memory")
    args = parser.parse_args()
    if args.install_from:
        return install_from(args.install_from, args.out_dir)
    if args.resources:
        return resource_report()
    if not torch.cuda.is_available():
        sys.exit("tune_kernels needs a CUDA GPU")
    if args.attention:
        return tune_attention()
    D, I, E, top_k = SHAPES[args.shape] if args.shape else (args.D, args.I, args.E, args.top_k)
    dtype = DTYPES[args.dtype]
    mode = "quick" if args.quick else "medium" if args.medium else "full"
    device = moe.device_name(torch.device("cuda"))
    max_shared = moe.max_shared_memory(torch.device("cuda"))
    t0 = time.time()
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(E, 2 * I, D, device="cuda", dtype=dtype, generator=gen) * D**-0.5
    w2 = torch.randn(E, D, I, device="cuda", dtype=dtype, generator=gen) * I**-0.5
    plans = {tokens: plan_tokens(D, I, E, top_k, dtype, tokens, mode, (w13, w2), max_shared, tma=not args.no_tma)
             for tokens in args.tokens}
    launches = [l for plan in plans.values() for _, _, _, gemms in plan for _, _, ls in gemms for l in ls]
    print(f"{len(launches)} candidate launches over tokens {args.tokens} ({mode} space)", flush=True)
    if args.workers > 1:
        try:
            precompile(launches, args.workers)
        except Exception as err:  # compile serially in the timing loop instead
            print(f"parallel compile failed ({err!r}); compiling as we go", flush=True)
    gate_up, down = {}, {}
    print("| tokens | tuned ms | default ms | gate_up | down |")
    for tokens in args.tokens:
        ms, cfg1, cfg2 = tune_tokens(D, I, E, top_k, dtype, tokens, plans[tokens], (w13, w2))
        if cfg1 is None or cfg2 is None or ms == float("inf"):
            print(f"| {tokens} | no candidate ran: not written |", flush=True)
            continue
        x, _, _, topk_weights, topk_ids, _, _, _ = tune_inputs(D, I, E, top_k, dtype, tokens, (w13, w2))
        defaults = (moe._default_config(E, 2 * I, D, tokens, top_k, dtype, max_shared),
                    moe._default_config(E, D, I, tokens, top_k, dtype, max_shared))
        out = torch.empty_like(x)
        default_ms = graph_ms(lambda: moe._fused_moe_into(x, w13, w2, topk_weights, topk_ids, out, *defaults))
        tuned_ms = graph_ms(lambda: moe._fused_moe_into(x, w13, w2, topk_weights, topk_ids, out, cfg1, cfg2))
        if not cfg1.get("TMA") and cfg1["BLOCK_M"] >= 32:
            # The same tiles with SHRINK (groups' last blocks of at most half a block of pairs
            # multiply that half only): strictly less tensor-core work, kept unless slower (the
            # short graphs here run at boost clock, where that work hides; sustained calls show it).
            shrunk = dict(cfg1, SHRINK=1), dict(cfg2, SHRINK=1)
            shrunk_ms = graph_ms(lambda: moe._fused_moe_into(x, w13, w2, topk_weights, topk_ids, out, *shrunk))
            print(f"  tokens={tokens} shrunk blocks: {shrunk_ms:.4f} ms against {tuned_ms:.4f}", flush=True)
            if shrunk_ms <= 1.005 * tuned_ms:
                (cfg1, cfg2), tuned_ms = shrunk, shrunk_ms  # the time of what is written
        moe._fused_moe_into(x, w13, w2, topk_weights, topk_ids, out, cfg1, cfg2)
        ref = moe.fused_moe_ref(x, w13, w2, topk_weights, topk_ids)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        if not err < 2e-2:  # a fast but wrong compile (seen with Triton 3.6's warp specialisation on sm_90)
            print(f"| {tokens} | {tuned_ms:.4f} | {default_ms:.4f} | computes wrong values (relative error {err:.2g}): "
                  f"not written | {cfg1} | {cfg2} |", flush=True)
            continue
        print(f"| {tokens} | {tuned_ms:.4f} | {default_ms:.4f} | {cfg1} | {cfg2} |", flush=True)
        gate_up[tokens], down[tokens] = cfg1, cfg2
        # Written after each token count: a run cut short by a time limit keeps what it tuned.
        tables = {moe.config_file_name(E, 2 * I, D, dtype, device): gate_up,
                  moe.config_file_name(E, D, I, dtype, device): down}
        write_tables(tables, args.out_dir, args.copy_to, args.replace)
    print(f"tuning took {time.time() - t0:.0f} s (whole-op times are CUDA-graph replays)")


if __name__ == "__main__":
    main()
