"""Time the Triton kernels against their references and the fastest plain-torch compositions.

Prints one markdown table: median time eager (triton.testing.do_bench) and as CUDA-graph
replays, TFLOP/s and GB/s, the share of the measured HBM read bandwidth, and the speed-up
over the torch baseline. Shapes are Mixtral-8x7B's and Qwen3-30B-A3B's. The `fused` section
times RMSNorm (alone and with the residual add before it), rotary embedding and SwiGLU at the
decode shapes of a Mistral-7B draft against the torch compositions they replace. The `draft`
section times that draft's decode step (random bf16 weights) as one CUDA-graph replay against
the time to read its weights once at the measured bandwidth. The `prefill` section times the
attention of prompts packed in one row (segmented chains) against SDPA over them padded.

    python3 tools/bench_kernels.py [--only moe|attention|prefill|fused|skinny|draft] [--no-ref] [--json out.json]

Needs a CUDA GPU. tests/benchmarks/test_bench_kernels.py imports the cases and baselines below.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from specoff.kernels.attention import attention_mask, verify_attention, verify_attention_ref  # noqa: E402
from specoff.kernels.fused import (add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref, rope, rope_ref,  # noqa: E402
                                   silu_mul, silu_mul_ref)
from specoff.kernels.moe import fused_moe, fused_moe_ref, moe_route  # noqa: E402

# name: (hidden D, intermediate I, experts E, top_k) and (heads H, kv heads KV, head_dim)
MOE_SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}
ATTN_SHAPES = {"mixtral-8x7b": (32, 8, 128), "qwen3-30b-a3b": (32, 4, 128)}
MOE_TOKENS = (1, 8, 64, 256, 1280)
# (rows B, new tokens T, prefix length, tree?)
ATTN_CASES = ((64, 1, 4096, False), (64, 5, 4096, False), (1, 256, 4096, True), (8, 64, 2048, True),
              (1, 1024, 4096, True))
# Packed prefill (prompts one after another in one row, each attending within itself): a
# refill round's ~12 HumanEval-like prompts and a first prefill of 144.
PREFILL_PROMPTS = (12, 144)
DRAFT_BATCHES = (1, 4, 16)
DRAFT_PREFIX = 256  # cached tokens per row (the cache's length: SDPA reads all of it, masked)


# ---------------------------------------------------------------------------------------
# Inputs


def moe_inputs(shape: str, tokens: int, dtype=torch.bfloat16, seed=0, weights=None):
    D, I, E, top_k = MOE_SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if weights is None:
        w13 = torch.randn(E, 2 * I, D, device="cuda", dtype=dtype, generator=gen) * D**-0.5
        w2 = torch.randn(E, D, I, device="cuda", dtype=dtype, generator=gen) * I**-0.5
        weights = (w13, w2)
    x = torch.randn(tokens, D, device="cuda", dtype=dtype, generator=gen)
    logits = torch.randn(tokens, E, device="cuda", generator=gen)
    topk_weights, topk_ids = moe_route(logits, top_k, renormalize=True)
    return x, *weights, topk_weights, topk_ids


def moe_cost(x, w13, w2, topk_ids):
    """(flops, bytes): weights of the experts actually used, read once, plus activations."""
    pairs = topk_ids.numel()
    D, I = w2.shape[1], w2.shape[2]
    active = torch.unique(topk_ids).numel()
    flops = 2 * pairs * 3 * I * D
    bytes_ = active * 3 * I * D * w13.element_size() + 2 * x.numel() * x.element_size()
    return flops, bytes_


def attention_inputs(shape: str, B: int, T: int, prefix: int, tree: bool, dtype=torch.bfloat16, seed=0):
    H, KV, hd = ATTN_SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    S = prefix + T
    q = torch.randn(B, T, H, hd, device="cuda", dtype=dtype, generator=gen)
    k_cache = torch.randn(B, KV, S, hd, device="cuda", dtype=dtype, generator=gen)
    v_cache = torch.randn(B, KV, S, hd, device="cuda", dtype=dtype, generator=gen)
    lengths = torch.full((B,), prefix, device="cuda", dtype=torch.int64)
    tree_mask = None
    if tree:
        parent = [torch.randint(0, max(j, 1), (B,), generator=torch.Generator().manual_seed(seed + j))
                  for j in range(T)]
        mask = torch.zeros(B, T, T, dtype=torch.bool)
        for j in range(T):
            mask[:, j, j] = True
            if j > 0:
                mask[:, j] |= mask[torch.arange(B), parent[j]]
        tree_mask = mask.cuda()
    return q, k_cache, v_cache, lengths, tree_mask


def packed_prefill_inputs(shape: str, prompts: int, dtype=torch.bfloat16, seed=0, device="cuda"):
    """q [1, N, H, hd], K/V [1, KV, N, hd] and seg_start [1, N] for `prompts` prompts of
    HumanEval-like lengths (40-340 tokens, seeded) packed in one row; and the lengths."""
    H, KV, hd = ATTN_SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(40, 341, (prompts,), generator=gen)
    starts = torch.cumsum(lengths, 0) - lengths
    seg_start = torch.repeat_interleave(starts, lengths)[None].to(device)
    N = int(lengths.sum())
    q = torch.randn(1, N, H, hd, generator=gen).to(device, dtype)
    k = torch.randn(1, KV, N, hd, generator=gen).to(device, dtype)
    v = torch.randn(1, KV, N, hd, generator=gen).to(device, dtype)
    return q, k, v, seg_start, lengths.tolist()


def packed_prefill_padded(q, k, v, lengths):
    """The same prompts padded to the longest, (B, H, T, hd) and (B, KV, T, hd): what plain
    SDPA (causal, no mask) runs on."""
    B, T = len(lengths), max(lengths)
    H, KV, hd = q.shape[2], k.shape[1], q.shape[3]
    qp = q.new_zeros(B, H, T, hd)
    kp, vp = k.new_zeros(B, KV, T, hd), v.new_zeros(B, KV, T, hd)
    at = 0
    for b, n in enumerate(lengths):
        qp[b, :, :n] = q[0, at:at + n].transpose(0, 1)
        kp[b, :, :n], vp[b, :, :n] = k[0, :, at:at + n], v[0, :, at:at + n]
        at += n
    return qp, kp, vp


def packed_prefill_cost(q, k, lengths):
    """(flops, bytes): each prompt's causal half of QK^T and PV; K, V and q read once."""
    H, hd = q.shape[2], q.shape[3]
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    flops = 4 * pairs * H * hd
    bytes_ = 2 * k.numel() * k.element_size() + 2 * q.numel() * q.element_size()
    return flops, bytes_


def attention_cost(q, k_cache, lengths):
    """(flops, bytes): K and V of every visible key read once, q read and out written once."""
    B, T, H, hd = q.shape
    KV = k_cache.shape[1]
    keys = int((lengths + T).sum())
    bytes_ = 2 * keys * KV * hd * k_cache.element_size() + 2 * q.numel() * q.element_size()
    flops = 4 * keys * T * H * hd
    return flops, bytes_


# ---------------------------------------------------------------------------------------
# Plain-torch baselines (the fastest compositions we could write; they may sync the host)


def moe_torch_grouped(x, w13, w2, topk_weights, topk_ids):
    """Sort pairs by expert, one torch.mm per used expert on its contiguous group."""
    N, D = x.shape
    top_k = topk_ids.shape[1]
    I = w2.shape[2]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()  # host sync: group sizes
    xs = x[order // top_k]
    ys = torch.empty_like(xs)
    start = 0
    for e, count in enumerate(counts):
        if count:
            h = torch.mm(xs[start:start + count], w13[e].t())  # (count, 2I)
            ys[start:start + count] = torch.mm(torch.nn.functional.silu(h[:, :I]) * h[:, I:], w2[e].t())
            start += count
    ys *= topk_weights.reshape(-1)[order, None].to(x.dtype)
    out = torch.empty_like(ys)
    out[order] = ys
    return out.view(N, top_k, D).sum(1)


def attention_sdpa(q, k_cache, v_cache, mask):
    """SDPA over the whole cache with a boolean mask built beforehand (GQA without copies)."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache, v_cache, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------
# Table


def _time_ms(fn):
    """Eager: host launch cost included, as a caller without CUDA graphs sees it."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def _graph_ms(fn):
    """Replays of a CUDA graph of fn: device time alone, as the engine's captured steps see it."""
    import triton.testing

    fn()  # compile outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median")


# the draft's (Mistral-7B) products at decode: name -> (N, K)
SKINNY_SHAPES = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336),
                 "head": (32000, 4096)}
SKINNY_ROWS = (1, 4, 16)


def bench_skinny(hbm: float, sweep: bool = False):
    """The few-rows kernel (kernels/skinny.py) against torch's dense product at the draft's
    decode shapes, graph times; with `sweep` also a small grid of tiles and K slices for 1
    and 16 rows, the fastest printed beside the default's. Each time is a product's share
    of a graph that multiplies by as many copies of the weight as fill 4× the L2 cache in
    turn: a weight replayed alone stays partly in L2 and times faster than inside a step."""
    import itertools

    from specoff.kernels import skinny
    from specoff.kernels.launch import num_sms

    rows = []
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    for name, (N, K) in SKINNY_SHAPES.items():
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
        ws = [w] + [w.clone() for _ in range(-(-4 * l2 // (2 * N * K)) - 1)]  # 4x L2 in all

        def each(call):  # one product's graph time, the weights taken in turn
            return _graph_ms(lambda: [call(wi) for wi in ws]) / len(ws)

        for M in SKINNY_ROWS:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            got, ref = skinny.skinny_linear(x, w).float(), skinny.skinny_linear_ref(x, w).float()
            assert ((got - ref).norm() / ref.norm()).item() < 1e-2, f"skinny_linear wrong at {name}, {M} rows"
            t_torch = each(lambda w: torch.mm(x, w.t(), out=out))
            t = each(lambda w: skinny._skinny_into(x, w, None, out))
            cfg = skinny.config(M, N, K, num_sms(w.device))
            row = dict(kernel="skinny_linear", shape=f"mistral-7b {name} {N}x{K}", case=f"rows={M} split={cfg['SPLIT_K']}",
                       ms=t, graph_ms=t, torch_ms=t_torch, torch_graph_ms=t_torch, ref_ms=float("nan"),
                       tflops=2 * M * N * K / t / 1e9, gbps=N * K * 2 / t / 1e6, hbm_share=N * K * 2 / t / 1e6 / hbm)
            if sweep and M in (1, 16):
                best = (t, "default")
                for bn, bk, stages, split in itertools.product((32, 64, 128), (128, 256), (4,), (1, 2, 4, 8)):
                    c = dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=stages)
                    try:
                        skinny._skinny_into(x, w, None, out, c)
                        torch.cuda.synchronize()
                        tc = each(lambda w: skinny._skinny_into(x, w, None, out, c))
                    except Exception:  # too big for this GPU's shared memory
                        continue
                    best = min(best, (tc, f"N{bn} K{bk} s{stages} split{split}"))
                row.update(best_ms=best[0], best_config=best[1])
                row["case"] += f" (best {best[1]}: {best[0]:.4f} ms, {N * K * 2 / best[0] / 1e6:.0f} GB/s)"
            rows.append(row)
            print_row(row)
            fused_case = None
            if name == "w13":  # the gate-up product with the SwiGLU in its epilogue against torch's product + silu_mul
                from specoff.kernels.fused import silu_mul

                act = torch.empty(M, N // 2, device="cuda", dtype=torch.bfloat16)
                t_torch = each(lambda w: silu_mul(torch.mm(x, w.t(), out=out), out=act))
                t = each(lambda w: skinny._skinny_into(x, w, None, act, swiglu=True))
                fused_case = f"rows={M} swiglu (product + silu_mul)"
            elif name == "wqkv":  # the norm inside the product (folded weight) against the norm's launch + the product
                from specoff.kernels.fused import rms_norm

                ones = torch.ones(K, device="cuda", dtype=torch.bfloat16)
                normed = torch.empty_like(x)
                t_torch = each(lambda w: torch.mm(rms_norm(x, ones, 1e-5, out=normed), w.t(), out=out))
                t = each(lambda w: skinny._skinny_into(x, w, None, out, rms_eps=1e-5))
                fused_case = f"rows={M} rms (rms_norm + product)"
            elif name == "w2":  # the down product adding the block's skip against torch's product + add
                skip = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
                total = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
                t_torch = each(lambda w: torch.add(skip, torch.mm(x, w.t(), out=out), out=total))
                t = each(lambda w: skinny._skinny_into(x, w, None, total, residual=skip))
                fused_case = f"rows={M} residual (product + add)"
            if fused_case:
                row = dict(row, case=fused_case, ms=t, graph_ms=t, torch_ms=t_torch, torch_graph_ms=t_torch,
                           tflops=2 * M * N * K / t / 1e9, gbps=N * K * 2 / t / 1e6, hbm_share=N * K * 2 / t / 1e6 / hbm)
                row.pop("best_ms", None), row.pop("best_config", None)
                rows.append(row)
                print_row(row)
        torch.cuda.empty_cache()
    return rows


def bench_moe(with_ref: bool, hbm: float):
    rows = []
    for shape in MOE_SHAPES:
        weights = None
        for tokens in MOE_TOKENS:
            x, w13, w2, topk_weights, topk_ids = moe_inputs(shape, tokens, weights=weights)
            weights = (w13, w2)
            flops, bytes_ = moe_cost(x, w13, w2, topk_ids)
            out = torch.empty_like(x)
            kernel = lambda: fused_moe(x, w13, w2, topk_weights, topk_ids, out=out)  # noqa: E731
            t_kernel, t_graph = _time_ms(kernel), _graph_ms(kernel)
            t_torch = _time_ms(lambda: moe_torch_grouped(x, w13, w2, topk_weights, topk_ids))  # host sync: no graph
            t_ref = _time_ms(lambda: fused_moe_ref(x, w13, w2, topk_weights, topk_ids)) if with_ref else float("nan")
            rows.append(dict(kernel="fused_moe", shape=shape, case=f"tokens={tokens}", ms=t_kernel,
                             graph_ms=t_graph, torch_ms=t_torch, torch_graph_ms=float("nan"), ref_ms=t_ref,
                             tflops=flops / t_graph / 1e9, gbps=bytes_ / t_graph / 1e6,
                             hbm_share=bytes_ / t_graph / 1e6 / hbm))
            print_row(rows[-1])
        del weights
        torch.cuda.empty_cache()
    return rows


def bench_attention(with_ref: bool, hbm: float):
    rows = []
    for shape in ATTN_SHAPES:
        for B, T, prefix, tree in ATTN_CASES:
            rows.append(attention_row(shape, B, T, prefix, tree, with_ref, hbm))
            print_row(rows[-1])
            torch.cuda.empty_cache()
    return rows


def attention_row(shape, B, T, prefix, tree, with_ref, hbm):
    q, k_cache, v_cache, lengths, tree_mask = attention_inputs(shape, B, T, prefix, tree)
    S = k_cache.shape[2]
    flops, bytes_ = attention_cost(q, k_cache, lengths)
    mask = attention_mask(lengths, T, S, tree_mask)[:, None]  # (B, 1, T, S)
    out = torch.empty_like(q)
    kernel = lambda: verify_attention(q, k_cache, v_cache, lengths, tree_mask, kv_len=S, out=out)  # noqa: E731
    t_kernel, t_graph = _time_ms(kernel), _graph_ms(kernel)
    sdpa = lambda: attention_sdpa(q, k_cache, v_cache, mask)  # noqa: E731
    t_torch, t_torch_graph = _time_ms(sdpa), _graph_ms(sdpa)
    t_ref = (_time_ms(lambda: verify_attention_ref(q, k_cache, v_cache, lengths, tree_mask))
             if with_ref else float("nan"))
    case = f"B={B} T={T} prefix={prefix} {'tree' if tree else 'chain'}"
    return dict(kernel="verify_attention", shape=shape, case=case, ms=t_kernel, graph_ms=t_graph, torch_ms=t_torch,
                torch_graph_ms=t_torch_graph, ref_ms=t_ref, tflops=flops / t_graph / 1e9,
                gbps=bytes_ / t_graph / 1e6, hbm_share=bytes_ / t_graph / 1e6 / hbm)


def bench_packed_prefill(hbm: float):
    """Prefill attention of packed prompts (the verification kernel's segmented chains)
    against SDPA over the same prompts padded to the longest (causal: flash, no mask)."""
    rows = []
    for shape in ATTN_SHAPES:
        for n in PREFILL_PROMPTS:
            q, k, v, seg_start, lengths = packed_prefill_inputs(shape, n)
            flops, bytes_ = packed_prefill_cost(q, k, lengths)
            zero, out, N = torch.zeros(1, dtype=torch.long, device="cuda"), torch.empty_like(q), q.shape[1]
            kernel = lambda: verify_attention(q, k, v, zero, kv_len=N, out=out, seg_start=seg_start)  # noqa: E731
            qp, kp, vp = packed_prefill_padded(q, k, v, lengths)
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                qp, kp, vp, is_causal=True, enable_gqa=True)
            t_graph = _graph_ms(kernel)
            rows.append(dict(kernel="packed_prefill_attention", shape=shape,
                             case=f"{n} prompts, {N} tokens", ms=_time_ms(kernel), graph_ms=t_graph,
                             torch_ms=_time_ms(sdpa), torch_graph_ms=_graph_ms(sdpa), ref_ms=float("nan"),
                             tflops=flops / t_graph / 1e9, gbps=bytes_ / t_graph / 1e6,
                             hbm_share=bytes_ / t_graph / 1e6 / hbm))
            print_row(rows[-1])
            torch.cuda.empty_cache()
    return rows


def bench_fused(hbm: float):
    """Each fused element-wise kernel against its torch composition (the `*_ref`, what the decoder
    runs without it) at a Mistral-7B draft's decode shapes, one token a row, bf16.

    A few hundred KB a launch: launch-bound, so the graph columns are the ones that count.
    """
    from specoff.config import ModelConfig
    from specoff.bench.synthetic import MISTRAL_7B

    cfg = ModelConfig.from_dict(MISTRAL_7B)
    D, H, KV, hd, eps = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    rows = []
    for B in DRAFT_BATCHES:
        gen = torch.Generator(device="cuda").manual_seed(B)
        x = torch.randn(B, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        weight = (1 + 0.1 * torch.randn(D, device="cuda", generator=gen)).to(torch.bfloat16)
        qkv = torch.randn(B, 1, (H + 2 * KV) * hd, device="cuda", dtype=torch.bfloat16, generator=gen)
        q = qkv[..., :H * hd].view(B, 1, H, hd)  # views of the fused projection, as in the decoder
        k = qkv[..., H * hd:(H + KV) * hd].view(B, 1, KV, hd)
        cos = torch.rand(B, 1, 1, hd, device="cuda", generator=gen).to(torch.bfloat16)
        sin = torch.rand(B, 1, 1, hd, device="cuda", generator=gen).to(torch.bfloat16)
        gate_up = torch.randn(B, 1, 2 * cfg.intermediate_size, device="cuda", dtype=torch.bfloat16, generator=gen)
        residual = torch.randn(B, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        cases = {  # name: (kernel, torch composition, elements read and written)
            "rms_norm": (lambda: rms_norm(x, weight, eps), lambda: rms_norm_ref(x, weight, eps), 2 * x.numel() + D),
            # x and residual read, h and the norm written
            "add_rms_norm": (lambda: add_rms_norm(x, residual, weight, eps),
                             lambda: add_rms_norm_ref(x, residual, weight, eps), 4 * x.numel() + D),
            "rope": (lambda: rope(q, k, cos, sin), lambda: rope_ref(q, k, cos, sin),
                     2 * (q.numel() + k.numel() + cos.numel())),
            "silu_mul": (lambda: silu_mul(gate_up), lambda: silu_mul_ref(gate_up), 3 * gate_up.numel() // 2),
        }
        for name, (kernel, composition, elements) in cases.items():
            bytes_ = 2 * elements
            t_graph = _graph_ms(kernel)
            rows.append(dict(kernel=name, shape="mistral-7b", case=f"B={B}", ms=_time_ms(kernel), graph_ms=t_graph,
                             torch_ms=_time_ms(composition), torch_graph_ms=_graph_ms(composition),
                             ref_ms=float("nan"), tflops=float("nan"), gbps=bytes_ / t_graph / 1e6,
                             hbm_share=bytes_ / t_graph / 1e6 / hbm))
            print_row(rows[-1])
    return rows


# ---------------------------------------------------------------------------------------
# Draft decode step and the HBM ceiling


@triton.jit
def _read_kernel(src_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Each program sums its own stripes of src (grid-strided, so many loads stay in flight)
    and writes one float: the device's read rate with nothing else to do."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(src_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, 0))


def hbm_bandwidth_gbps(gib: int = 2) -> float:
    """Device-memory read bandwidth over `gib` GiB, as CUDA-graph replays: the best of torch's
    max-reduction and a striped Triton read at a few block sizes and grid widths (both read
    every byte and write next to nothing). A device-to-device copy's read + write figure and
    torch's reduction each come out below what the read-bound kernels here reach, so neither
    alone is the ceiling."""
    from specoff.kernels.launch import num_sms

    src = torch.randn(gib << 29, device="cuda", dtype=torch.bfloat16)  # gib GiB of bf16
    best = _graph_ms(lambda: src.amax())
    for block, warps in ((4096, 8), (8192, 8), (16384, 16)):
        for per_sm in (1, 2, 4, 8):
            programs = num_sms(src.device) * per_sm
            out = torch.empty(programs, device="cuda", dtype=torch.float32)
            launch = lambda: _read_kernel[(programs,)](src, out, src.numel(), BLOCK=block, num_warps=warps)  # noqa: E731
            best = min(best, _graph_ms(launch))
    return src.numel() * src.element_size() / best / 1e6


def draft_model():
    """Mistral-7B-shaped decoder on the GPU with seeded random bf16 weights (nothing read from disk)."""
    from specoff.config import ModelConfig
    from specoff.bench.synthetic import MISTRAL_7B, random_source
    from specoff.weights import load_model

    cfg = ModelConfig.from_dict(MISTRAL_7B)
    return load_model(None, device="cuda", dtype="bfloat16", source=random_source(cfg, 0, "cuda"), config=cfg)


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: every parameter but the embedding table (B rows of it)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        total -= model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    return total


def capture(step) -> "torch.cuda.CUDAGraph":
    """step() captured as one CUDA graph (after two warm-up calls on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()  # warm up: compile kernels, pick cuBLAS algorithms outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def one_graph_replay_ms(step, replays: int = 30, graph=None) -> float:
    """Capture step() as one CUDA graph (or take `graph`); median time of single replays
    (launch included)."""
    graph = graph or capture(step)
    for _ in range(3):
        graph.replay()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench_draft(hbm: float, compile_step: bool = False):
    """One greedy decode step of every row (forward at its next position, argmax) per replay.

    The cache does not advance between replays, so each one rewrites the same K/V slot and
    reads the same DRAFT_PREFIX keys. With compile_step the step is also traced by
    torch.compile (Inductor fuses the norms, rotary and SwiGLU element-wise ops into a few
    kernels a layer) and that is captured as one graph: a minute or more of compiling.
    """
    model = draft_model()
    weights = weight_bytes_per_step(model)
    floor_ms = weights / hbm / 1e6
    rows = []
    current = model.kernels
    # the current options' rows first (where they fold the norms, as the engine's draft does
    # by default: first of the folded ones), then every decode fusion off; the few-rows
    # products (kernels/skinny.py) with the cache write in the rotary launch; each of
    # programmatic dependent launch and the rotary + write + attention launch on top, then
    # both; then (it rewrites the weights, so last) the norms folded into the products
    # (Transformer.fold_norms): alone and with both, each with its norms' sums of squares
    # handed on by the products before and, with both, without (each product squaring its input)
    base = replace(current, skinny_products=True, fused_cache_write=True, pdl=False, fused_rope_attention=False,
                   squares_from_products=True)
    off = replace(base, skinny_products=False, fused_cache_write=False, step_kernels=False)
    both = replace(base, pdl=True, fused_rope_attention=True)
    combos = [(current, current.fold_draft_norms), (off, False), (base, False), (replace(base, pdl=True), False),
              (replace(base, fused_rope_attention=True), False), (both, False),
              (base, True), (both, True), (replace(both, squares_from_products=False), True)]
    if os.environ.get("DRAFT_COMBOS") == "current":  # the current options' rows alone
        combos = combos[:1]
    for options, fold in sorted(dict.fromkeys(combos), key=lambda c: c[1]):
        model.use_kernels(options)
        if fold:
            model.fold_norms()
        for B in DRAFT_BATCHES:
            rows.append(draft_row(model, B, weights, floor_ms, hbm))
            rows[-1]["case"] += (f" skinny {on(options.skinny_products)}, cache write {on(options.fused_cache_write)}"
                                 f", pdl {on(options.pdl)}, rope+attention {on(options.fused_rope_attention)}"
                                 + ((", norms folded" + ("" if options.squares_from_products else " (own squares)"))
                                    if fold else ""))
            print_row(rows[-1])
            torch.cuda.empty_cache()

    def variant(label, **fields):
        """The current options with `fields` replaced, a row each batch."""
        model.use_kernels(replace(current, **fields))
        try:
            for B in DRAFT_BATCHES:
                rows.append(draft_row(model, B, weights, floor_ms, hbm))
                rows[-1]["case"] += f" options as set, {label}"
                print_row(rows[-1])
        finally:
            model.use_kernels(current)

    variant("embedding, rotary tables and argmax through torch", step_kernels=False)
    # DRAFT_TILES="4096x4096:BLOCK_N=32,SPLIT_K=2;6144x4096:SPLIT_K=2": each product's tile
    # choices replaced in turn (KernelOptions.skinny_tiles), a row each batch.
    for spec in filter(None, os.environ.get("DRAFT_TILES", "").split(";")):
        shape, _, entries = spec.partition(":")
        N, K = map(int, shape.split("x"))
        replaced = tuple((k, int(v)) for k, v in (e.split("=") for e in entries.split(",")))
        variant(f"{N}x{K} products with {dict(replaced)}", skinny_tiles=(((N, K), replaced),))
    model.use_kernels(current)
    if compile_step:
        rows.append(draft_row(model, DRAFT_BATCHES[-1], weights, floor_ms, hbm, compiled=True))
        print_row(rows[-1])
    print(f"draft: {weights / 1e9:.2f} GB of weights a step, {floor_ms:.3f} ms to read them at {hbm:.0f} GB/s; "
          "one-graph step / floor: " + ", ".join(f"{r['case']} {r['over_floor']:.2f}x" for r in rows)
          + " (goal <= 1.3x at batch <= 16)", flush=True)
    return rows


def on(flag: bool) -> str:
    return "on" if flag else "off"


def draft_step(model, B: int, compiled: bool = False):
    """A greedy decode step of B rows at position DRAFT_PREFIX - 1 (the closure), and its cache."""
    from specoff.kernels.step import argmax_rows

    cache = model.new_cache(B, DRAFT_PREFIX)
    cache.lengths.fill_(DRAFT_PREFIX - 1)
    ids = torch.randint(3, model.config.vocab_size, (B, 1), device="cuda")
    next_ids = torch.empty(B, 1, dtype=torch.long, device="cuda")

    def forward(ids):
        # the greedy pick as the throughput pipeline's draft makes it (kernels.step)
        logits = model(ids, cache)[:, -1]
        return (argmax_rows(logits) if model.kernels.step_kernels else logits.argmax(-1))[:, None]  # (B, 1)

    forward = torch.compile(forward, fullgraph=True, dynamic=False) if compiled else forward

    def step():
        next_ids.copy_(forward(ids))

    return step, cache


def profiled_launches(run, steps: int):
    """torch.profiler over `steps` calls of run(): the kernels of one call in launch order
    (names), each one's own device time (ms, the mean over the calls) and what each adds to
    the call's span (its end minus the previous kernel's end: with programmatic launches a
    kernel starts before the last one ends, so own times overlap and these sum to the span).
    None where the profiler saw no kernels or the calls launched unlike kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    launches = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                      key=lambda e: e.time_range.start)
    n = len(launches) // steps
    names = [e.name for e in launches[:n]]
    if n == 0 or len(launches) != n * steps or any(launches[s * n + i].name != names[i]
                                                   for s in range(steps) for i in range(n)):
        return None
    calls = [launches[s * n:(s + 1) * n] for s in range(steps)]
    own = [sum(c[i].time_range.elapsed_us() for c in calls) / steps / 1e3 for i in range(n)]
    adds = [sum(c[i].time_range.end - (c[i - 1].time_range.end if i else c[0].time_range.start) for c in calls)
            / steps / 1e3 for i in range(n)]
    return names, own, adds


def profile_draft(hbm: float, steps: int = 10):
    """Where the draft's step goes, at batch 1 and 16, then with the norms folded
    (Transformer.fold_norms, last: it rewrites the weights): each kernel's own device time
    a step (torch.profiler over eager steps with PDL off), and inside the step's CUDA graph
    with the current options what each kernel adds to the replay's span (with PDL the
    launches overlap; where the profiler sees no kernels inside graphs, only the first)."""
    model = draft_model()
    current = model.kernels
    floor_ms = weight_bytes_per_step(model) / hbm / 1e6
    rows = []
    for fold in (False, True):
        if fold:
            model.fold_norms()
        for B in (DRAFT_BATCHES[0], DRAFT_BATCHES[-1]):
            step, _ = draft_step(model, B)
            with torch.inference_mode():
                graph = capture(step)
                graph_ms = one_graph_replay_ms(step, graph=graph)
                in_graph = profiled_launches(graph.replay, steps)
                model.use_kernels(replace(current, pdl=False))
                try:
                    for _ in range(3):
                        step()
                    torch.cuda.synchronize()
                    eager = profiled_launches(step, steps)
                finally:
                    model.use_kernels(current)
            assert eager is not None, "the profiler saw no kernels, or the steps launched unlike kernels"
            names, own, _ = eager
            total = sum(own)
            case = f"B={B}" + (", norms folded" if fold else "")
            print(f"\ndraft step {case}: one graph {graph_ms:.3f} ms ({graph_ms / floor_ms:.2f}x the "
                  f"{floor_ms:.3f} ms read), its {len(names)} kernels {total:.3f} ms a step (PDL off, eager), "
                  f"the rest {graph_ms - total:.3f} ms")
            row = dict(kernel="draft_profile", case=case, graph_ms=graph_ms, floor_ms=floor_ms,
                       kernels_ms=total, launches=names, launch_ms=own)
            eager_rows = layer_pattern(names, own, len(model.layers))
            graph_rows = None
            if in_graph is not None and in_graph[0] == names:
                graph_rows = layer_pattern(names, in_graph[2], len(model.layers))
                row.update(graph_span_ms=sum(in_graph[2]), graph_launch_ms=in_graph[1], graph_adds_ms=in_graph[2])
                print(f"in the graph (PDL {on(current.pdl)}): span {sum(in_graph[2]):.3f} ms, each kernel's "
                      "end minus the last one's in the second column")
            elif in_graph is not None:
                print("in the graph: the profiler saw other kernels than the eager step's (not shown)")
            else:
                print("in the graph: the profiler saw no kernels inside the replays")
            print("| kernel (in launch order; a layer's summed over the layers) | launches | ms a step | share "
                  "| adds in the graph (ms) |\n| --- | ---: | ---: | ---: | ---: |")
            for k, (name, count, t) in enumerate(eager_rows):
                added = f"{graph_rows[k][2]:.4f}" if graph_rows else "–"
                print(f"| {name[:100]} | {count} | {t:.4f} | {100 * t / total:.1f}% | {added} |")
            rows.append(row)
            torch.cuda.empty_cache()
    return rows


def layer_pattern(names, ms, layers: int):
    """(name, launches, ms) of a step's launches, those of the `layers` repeats of one layer's
    pattern (found as the longest run of launches that repeats `layers` times in a row: a
    longer one would need more layers) summed position by position, the launches before and
    after them as they come."""
    n = len(names)
    for period in range(n // layers, 0, -1):
        for first in range(n - layers * period + 1):
            if all(names[first + i * period + j] == names[first + j] for i in range(layers) for j in range(period)):
                out = [(names[i], 1, ms[i]) for i in range(first)]
                out += [(f"layer: {names[first + j]}", layers,
                         sum(ms[first + i * period + j] for i in range(layers))) for j in range(period)]
                end = first + layers * period
                return out + [(names[i], 1, ms[i]) for i in range(end, n)]
    return [(name, 1, t) for name, t in zip(names, ms)]


def draft_row(model, B: int, weights: int, floor_ms: float, hbm: float, compiled: bool = False) -> dict:
    step, cache = draft_step(model, B, compiled)
    with torch.inference_mode():
        t_eager = _time_ms(step)
        t_graph = one_graph_replay_ms(step)
    kv_bytes = 2 * cache.k.numel() * cache.k.element_size()
    case = f"B={B} prefix={DRAFT_PREFIX}" + (" compiled" if compiled else "")
    return dict(kernel="draft_step", shape="mistral-7b", case=case,
                ms=t_eager, graph_ms=t_graph, torch_ms=t_eager, torch_graph_ms=float("nan"), ref_ms=float("nan"),
                tflops=weights * B / t_graph / 1e9,  # 2 flops per bf16 parameter (2 bytes) per row
                gbps=(weights + kv_bytes) / t_graph / 1e6, hbm_share=weights / t_graph / 1e6 / hbm,
                weight_gb=weights / 1e9, kv_gb=kv_bytes / 1e9, floor_ms=floor_ms, over_floor=t_graph / floor_ms)


def print_header(hbm: float):
    print(f"ms are medians; 'graph' = CUDA-graph replay (device time). TFLOP/s and GB/s use the kernel's graph "
          f"time; % HBM = GB/s over the measured read bandwidth, {hbm:.0f} GB/s (draft: its weights alone); "
          "× torch = best torch time (eager or graph) / kernel graph time (draft: eager step / one-graph step).")
    print("| kernel | shape | case | kernel ms | kernel graph ms | torch ms | torch graph ms | ref ms "
          "| TFLOP/s | GB/s | % HBM | × torch |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)


def print_row(r):
    best_torch = min(t for t in (r["torch_ms"], r["torch_graph_ms"]) if not math.isnan(t))
    print(f"| {r['kernel']} | {r['shape']} | {r['case']} | {r['ms']:.4f} | {r['graph_ms']:.4f} | "
          f"{r['torch_ms']:.4f} | {r['torch_graph_ms']:.4f} | {r['ref_ms']:.3f} | {r['tflops']:.1f} | "
          f"{r['gbps']:.0f} | {100 * r['hbm_share']:.0f}% | {best_torch / r['graph_ms']:.2f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["moe", "attention", "prefill", "fused", "draft", "skinny", "draft-profile"],
                        help="one group of rows; draft-profile (never in the full run): the draft step's "
                             "kernels, each one's device time a step")
    parser.add_argument("--skinny-sweep", action="store_true",
                        help="the few-rows kernel's rows also search a small grid of tiles and K slices")
    parser.add_argument("--no-ref", action="store_true", help="skip the slow float32 references")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--draft-compile", action="store_true",
                        help="also time the torch.compile'd draft step (a minute or more of compiling)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels needs a CUDA GPU")
    import triton

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    hbm = hbm_bandwidth_gbps()
    torch.cuda.empty_cache()
    print_header(hbm)  # rows print as they are measured
    rows = []
    if args.only in (None, "moe"):
        rows += bench_moe(not args.no_ref, hbm)
    if args.only in (None, "attention"):
        rows += bench_attention(not args.no_ref, hbm)
    if args.only in (None, "prefill"):
        rows += bench_packed_prefill(hbm)
    if args.only in (None, "fused"):
        rows += bench_fused(hbm)
    if args.only in (None, "skinny"):
        rows += bench_skinny(hbm, args.skinny_sweep)
    if args.only in (None, "draft"):
        rows += bench_draft(hbm, args.draft_compile)
    if args.only == "draft-profile":
        rows += profile_draft(hbm)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(hbm_gbps=hbm, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
