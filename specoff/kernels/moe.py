"""Fused mixture-of-experts feed-forward (Mixtral, Qwen3-MoE), in two grouped-GEMM launches.

Implements the sparse MoE block of Mixtral (arXiv 2401.04088, section 2.1):
``y = sum_j w_j * SwiGLU_e(x)`` over the top-k experts ``e`` a router picks per token, with
``SwiGLU_e(x) = (silu(x W1_e^T) * (x W3_e^T)) W2_e^T`` (Shazeer, arXiv 2002.05202).

The kernel follows vLLM's fused_moe: the (token, expert) pairs are sorted by expert and each
expert's group is padded to a multiple of BLOCK_M, so one program multiplies BLOCK_M rows
by one expert's weights. The sort is done with torch ops on the device (no host sync), so a
fixed token count captures in a CUDA graph. Launch 1 computes ``silu(gate) * up`` into an
intermediate [N*top_k, I]; launch 2 multiplies by W2 and the routing weight; a sum over
top_k returns to token order.

Weight layout: ``w13`` [E, 2I, D] (rows :I gate = HF w1, rows I: up = HF w3), ``w2`` [E, D, I].
Launch parameters come from JSON files in ``configs/`` (written by tools/tune_kernels.py),
keyed by (E, N_out, K, dtype, device) and looked up by nearest token count.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Optional

import torch

import triton
import triton.language as tl

from .launch import launcher as _launcher

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a Triton without host-side descriptors
    TensorDescriptor = None

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


@triton.jit
def _tile(num_padded, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program, in grouped order: GROUP_M row blocks walk
    the columns together, so neighbouring programs share weight tiles in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_padded, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + ((pid % num_pid_in_group) % group_size_m), (pid % num_pid_in_group) // group_size_m


@triton.jit
def _moe_gemm_kernel(
    # pointers
    a_ptr, w_ptr, out_ptr, topk_weights_ptr, sorted_pairs_ptr, block_expert_ptr,
    # sizes
    num_pairs, num_padded, N, K, top_k,
    # strides
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
    # meta-parameters
    GATED: tl.constexpr,  # out = silu(a @ w[:N].T) * (a @ w[N:2N].T)
    A_PER_TOKEN: tl.constexpr,  # row of `a` is pair // top_k (x), else pair (intermediate)
    WEIGHTED: tl.constexpr,  # scale each row by its routing weight
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dot instead of tf32
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SHRINK: tl.constexpr = False,  # a block whose second half holds no pair computes its first half only
):
    """One BLOCK_M x BLOCK_N tile of out[pair] = a[row(pair)] @ w[expert(block)].T.

    SHRINK: a group's pairs fill its blocks from the front, so a block whose middle row is
    padding is its group's last and holds at most BLOCK_M / 2 pairs: it runs the product of
    its first BLOCK_M / 2 rows (half the tensor-core work of the padded tile, the same
    weight tile, in the same launch)."""
    pid_m, pid_n = _tile(num_padded, N, BLOCK_M, BLOCK_N, GROUP_M)

    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:  # padding block past the last expert's group
        return
    row0 = pid_m * BLOCK_M
    half = False  # a compile-time False without SHRINK: the one-size product only
    if SHRINK:
        half = tl.load(sorted_pairs_ptr + row0 + BLOCK_M // 2) >= num_pairs
    if half:
        _moe_gemm_rows(a_ptr, w_ptr, out_ptr, topk_weights_ptr, sorted_pairs_ptr, expert, row0, pid_n,
                       num_pairs, N, K, top_k, stride_am, stride_ak, stride_we, stride_wn, stride_wk,
                       stride_om, stride_on, GATED, A_PER_TOKEN, WEIGHTED, IEEE, BLOCK_M // 2, BLOCK_N, BLOCK_K)
    else:
        _moe_gemm_rows(a_ptr, w_ptr, out_ptr, topk_weights_ptr, sorted_pairs_ptr, expert, row0, pid_n,
                       num_pairs, N, K, top_k, stride_am, stride_ak, stride_we, stride_wn, stride_wk,
                       stride_om, stride_on, GATED, A_PER_TOKEN, WEIGHTED, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _moe_gemm_rows(a_ptr, w_ptr, out_ptr, topk_weights_ptr, sorted_pairs_ptr, expert, row0, pid_n,
                   num_pairs, N, K, top_k, stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
                   GATED: tl.constexpr, A_PER_TOKEN: tl.constexpr, WEIGHTED: tl.constexpr, IEEE: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """_moe_gemm_kernel's tile of grouped rows [row0, row0 + ROWS) and column block pid_n."""
    offs_m = row0 + tl.arange(0, ROWS)
    pairs = tl.load(sorted_pairs_ptr + offs_m).to(tl.int64)
    row_valid = pairs < num_pairs
    if A_PER_TOKEN:
        a_rows = pairs // top_k
    else:
        a_rows = pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrap columns past N so weight loads need no mask; those columns are never stored.
    offs_wn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + expert * stride_we + offs_wn[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_valid[:, None] & (offs_k[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        if GATED:
            w_up = tl.load(w_ptrs + N * stride_wn, mask=offs_k[:, None] < k_left, other=0.0)
            if IEEE:
                acc_up = tl.dot(a, w_up, acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(a, w_up, acc_up)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    if WEIGHTED:
        route_w = tl.load(topk_weights_ptr + pairs, mask=row_valid, other=0.0)
        acc = acc * route_w[:, None]
    out_ptrs = out_ptr + pairs[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & (offs_n[None, :] < N))


@triton.jit
def _moe_gemm_tma_kernel(
    # tensor descriptors (TMA on Hopper): a [num_padded, K] rows in grouped order, w [E * W_ROWS, K]
    a_desc, w_desc,
    # pointers
    out_ptr, topk_weights_ptr, sorted_pairs_ptr, block_expert_ptr,
    # sizes
    num_pairs, num_padded, N, K, W_ROWS,
    # strides
    stride_om, stride_on,
    # meta-parameters
    GATED: tl.constexpr,  # out = silu(a @ w[:N].T) * (a @ w[N:2N].T) of the block's expert
    OUT_SORTED: tl.constexpr,  # out row = grouped row (the down launch's input); else the pair
    WEIGHTED: tl.constexpr,  # scale each row by its routing weight
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dot instead of tf32
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ONE_DOT: tl.constexpr = False,  # GATED: w_desc is w13 as [E, 2, I, K]; gate and up tiles in one load and one product
):
    """_moe_gemm_kernel with its activations already in grouped order: both operands are
    whole tiles of 2-D tensors, loaded by tensor descriptors (the copy engine's TMA on Hopper,
    no per-row address arithmetic; past K and past the last row they read zeros)."""
    pid_m, pid_n = _tile(num_padded, N, BLOCK_M, BLOCK_N, GROUP_M)

    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:  # padding block past the last expert's group
        return
    row0 = pid_m * BLOCK_M
    # Columns past N read the next rows of w (the up half, the next expert, or zeros past
    # the end): never stored.
    w_row = expert * W_ROWS + pid_n * BLOCK_N
    if ONE_DOT:  # [gate tile; up tile] as one 2·BLOCK_N-wide product (half the MMA instructions)
        acc2 = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([row0, k0 * BLOCK_K])
            w = w_desc.load([expert, 0, pid_n * BLOCK_N, k0 * BLOCK_K]).reshape(2 * BLOCK_N, BLOCK_K)
            if IEEE:
                acc2 = tl.dot(a, w.T, acc2, input_precision="ieee")
            else:
                acc2 = tl.dot(a, w.T, acc2)
        gate, up = tl.split(tl.permute(acc2.reshape(BLOCK_M, 2, BLOCK_N), (0, 2, 1)))
        acc = gate * tl.sigmoid(gate) * up
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GATED:
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([row0, k0 * BLOCK_K])
            w = w_desc.load([w_row, k0 * BLOCK_K])
            if IEEE:
                acc = tl.dot(a, w.T, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w.T, acc)
            if GATED:
                w_up = w_desc.load([w_row + N, k0 * BLOCK_K])
                if IEEE:
                    acc_up = tl.dot(a, w_up.T, acc_up, input_precision="ieee")
                else:
                    acc_up = tl.dot(a, w_up.T, acc_up)
        if GATED:
            acc = acc * tl.sigmoid(acc) * acc_up
    offs_m = row0 + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + offs_m).to(tl.int64)
    row_valid = pairs < num_pairs
    if WEIGHTED:
        route_w = tl.load(topk_weights_ptr + pairs, mask=row_valid, other=0.0)
        acc = acc * route_w[:, None]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if OUT_SORTED:  # padding rows too (token 0's product, never stored later): the next launch reads no garbage
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=offs_n[None, :] < N)
    else:
        out_ptrs = out_ptr + pairs[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & (offs_n[None, :] < N))


@triton.jit
def _moe_align_kernel(
    # pointers
    topk_ids_ptr, sorted_pairs_ptr, block_expert_ptr,
    # sizes
    num_pairs, num_padded, num_experts,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """moe_align in one program: per-expert counts, padded offsets, then each pair's slot.

    A pair's slot is its expert's padded start plus the number of earlier pairs of that
    expert (a running count over chunks plus a cumulative sum of one-hot rows within one),
    so the order within a group is the pair order, as in the stable argsort of moe_align.
    """
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for p0 in range(0, num_pairs, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, 0)
    padded_start = padded_end - padded

    for r0 in range(0, num_padded, BLOCK_P):  # every row a padding row until a pair lands there
        offs = r0 + tl.arange(0, BLOCK_P)
        tl.store(sorted_pairs_ptr + offs, tl.full((BLOCK_P,), 0, tl.int32) + num_pairs, mask=offs < num_padded)
    num_blocks = num_padded // BLOCK_M
    for k0 in range(0, num_blocks, BLOCK_P):
        blocks = k0 + tl.arange(0, BLOCK_P)
        # The group holding row blocks * BLOCK_M: how many groups end at or before it.
        expert = tl.sum((padded_end[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32), 1)
        tl.store(block_expert_ptr + blocks, tl.where(expert < num_experts, expert, -1), mask=blocks < num_blocks)
    tl.debug_barrier()  # the padding fill above lands before the pairs below overwrite it

    seen = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for p0 in range(0, num_pairs, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # (P, E)
        rank = tl.sum(tl.cumsum(onehot, 0) * onehot, 1) - 1  # earlier pairs of the same expert in this chunk
        slot = tl.sum(onehot * (padded_start + seen)[None, :], 1) + rank
        # A pair of no expert here (id -1: routed to experts another call computes) has no row.
        tl.store(sorted_pairs_ptr + slot, offs, mask=(offs < num_pairs) & (ids >= 0))
        seen += tl.sum(onehot, 0)


# ---------------------------------------------------------------------------------------
# Launch configurations


def _default_config(E: int, N_out: int, K: int, num_tokens: int, top_k: int = 2,
                    dtype: torch.dtype = torch.bfloat16, max_shared: int = 1 << 30) -> dict:
    """Untuned fallback, by rows per expert (what one expert's weight tile is reused over).

    Few rows: weight-bandwidth bound, narrow tiles until ~1024 programs keep HBM busy. Many
    rows: tensor-core bound, 128x128 tiles of 8 warps (two wgmma warpgroups) four stages deep
    (192 KB of shared memory for the gated launch on Hopper). Stages shrink to fit max_shared.
    """
    pairs = num_tokens * top_k
    rows_per_expert = max(1, pairs // E)
    if rows_per_expert <= 16:
        active_experts = min(E, pairs)
        block_n = 64
        while block_n > 16 and active_experts * N_out // block_n < 1024:
            block_n //= 2
        cfg = dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=256 if block_n == 16 else 128, GROUP_M=1,
                   num_warps=4, num_stages=4)
    elif rows_per_expert <= 64:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    elif rows_per_expert < 256:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    if dtype == torch.float32:  # twice the bytes per tile: halve K to stay in shared memory
        cfg["BLOCK_K"] //= 2
    elem = 4 if dtype == torch.float32 else 2
    while cfg["num_stages"] > 2 and cfg["num_stages"] * shared_bytes_per_stage(cfg, elem, gated=True) > max_shared:
        cfg["num_stages"] -= 1
    return cfg


def shared_bytes_per_stage(cfg: dict, elem_size: int, gated: bool) -> int:
    """One pipeline stage's tiles: BLOCK_M x BLOCK_K of activations, one or two BLOCK_K x BLOCK_N of weights."""
    return (cfg["BLOCK_M"] * cfg["BLOCK_K"] + (2 if gated else 1) * cfg["BLOCK_K"] * cfg["BLOCK_N"]) * elem_size


@functools.lru_cache(maxsize=None)
def max_shared_memory(device: torch.device) -> int:
    """Shared memory one program may use (opt-in maximum); no limit in the CPU interpreter."""
    if device.type != "cuda":
        return 1 << 30
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024


def config_file_name(E: int, N_out: int, K: int, dtype: torch.dtype, device_name: str) -> str:
    dtype_name = str(dtype).replace("torch.", "")
    return f"E={E},N={N_out},K={K},device_name={device_name.replace(' ', '_')},dtype={dtype_name}.json"


@functools.lru_cache(maxsize=None)
def _load_configs(file_name: str, config_dir: str = CONFIG_DIR) -> Optional[dict]:
    path = os.path.join(config_dir, file_name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return {int(tokens): cfg for tokens, cfg in json.load(f).items()}


def get_config(E: int, N_out: int, K: int, dtype: torch.dtype, device_name: str, num_tokens: int,
               top_k: int = 2, max_shared: int = 1 << 30, config_dir: str = CONFIG_DIR) -> dict:
    """Launch parameters for a [tokens, K] x [E, N_out, K] grouped GEMM: the tuned file's in
    `config_dir` (specoff/kernels/configs) or the default."""
    configs = _load_configs(config_file_name(E, N_out, K, dtype, device_name), config_dir)
    if configs:
        return dict(configs[min(configs, key=lambda m: abs(m - num_tokens))])
    return _default_config(E, N_out, K, num_tokens, top_k, dtype, max_shared)


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device).replace(" ", "_")


# ---------------------------------------------------------------------------------------
# Routing and grouping (plain torch, on the device, no host sync)


def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    """Softmax over experts in float32, top-k; Mixtral renormalises, Qwen3-MoE if norm_topk_prob."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


def padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Host-side bound on the grouped rows: at most min(E, pairs) groups each waste block_m - 1."""
    return triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m


# One align program loops over the pairs; past this many the torch version's parallel sort
# should win.
FUSED_ALIGN_MAX_PAIRS = 4096


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Sort (token, expert) pairs by expert, each expert's group padded to a multiple of block_m.

    Returns sorted_pairs [num_padded] int32 (pair index token*top_k + j, or num_pairs for a
    padding row) and block_expert [num_padded // block_m] int32 (-1 past the last group).
    One Triton launch for up to FUSED_ALIGN_MAX_PAIRS pairs, else moe_align_torch: its ~25
    small kernels would be a large share of a few-token MoE, even in a CUDA graph.
    """
    num_pairs = topk_ids.numel()
    if num_pairs > FUSED_ALIGN_MAX_PAIRS:
        return moe_align_torch(topk_ids, num_experts, block_m)
    topk_ids = topk_ids.contiguous()  # read as a flat [num_pairs] array
    num_padded = padded_rows(num_pairs, num_experts, block_m)
    sorted_pairs = torch.empty((num_padded,), dtype=torch.int32, device=topk_ids.device)
    block_expert = torch.empty((num_padded // block_m,), dtype=torch.int32, device=topk_ids.device)
    block_e = triton.next_power_of_2(num_experts)
    block_p = max(16, min(1024, 8192 // block_e, triton.next_power_of_2(max(num_pairs, num_padded // block_m))))
    _launcher(_moe_align_kernel, topk_ids)[(1,)](
        topk_ids, sorted_pairs, block_expert,
        num_pairs, num_padded, num_experts,
        BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_E=block_e, num_warps=8 if block_p * block_e >= 4096 else 4,
    )
    return sorted_pairs, block_expert


def moe_align_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """moe_align in plain torch ops on the device (stable argsort, no host sync)."""
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    num_padded = padded_rows(num_pairs, num_experts, block_m)
    # Pairs of no expert here (id -1) count in an extra group E that gets no rows.
    flat = torch.where(flat >= 0, flat, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    # The extra group gets no rows (a zero joined on, not an indexed store of a host
    # scalar: that is a host→device copy, refused inside a CUDA graph capture).
    padded_counts = torch.cat([(counts[:num_experts] + block_m - 1) // block_m * block_m,
                               counts.new_zeros(1)])
    padded_end = torch.cumsum(padded_counts, 0)
    order = torch.argsort(flat, stable=True)  # pair indices grouped by expert
    sorted_experts = flat[order]
    rank = torch.arange(num_pairs, device=flat.device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
    dest = (padded_end - padded_counts)[sorted_experts] + rank
    dest = torch.where(sorted_experts < num_experts, dest, num_padded)  # → the spare row
    sorted_pairs = torch.full((num_padded + 1,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))
    sorted_pairs = sorted_pairs[:num_padded]
    padded_end = padded_end[:num_experts]
    block_starts = torch.arange(0, num_padded, block_m, device=flat.device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert


# ---------------------------------------------------------------------------------------
# Wrapper


def _launch_gemm(a, w, out, topk_weights, sorted_pairs, block_expert, num_pairs, top_k, cfg, *,
                 gated: bool, a_per_token: bool, weighted: bool):
    N = w.shape[1] // 2 if gated else w.shape[1]
    K = w.shape[2]
    num_padded = sorted_pairs.numel()
    grid = (triton.cdiv(num_padded, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _launcher(_moe_gemm_kernel, a)[grid](
        a, w, out, topk_weights, sorted_pairs, block_expert,
        num_pairs, num_padded, N, K, top_k,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        GATED=gated, A_PER_TOKEN=a_per_token, WEIGHTED=weighted, IEEE=a.dtype == torch.float32,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        SHRINK=bool(cfg.get("SHRINK")) and cfg["BLOCK_M"] >= 32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _check(x, w13, w2, topk_weights, topk_ids):
    N, D = x.shape
    E, two_I, D13 = w13.shape
    assert D13 == D and two_I % 2 == 0, f"w13 {tuple(w13.shape)} does not match x {tuple(x.shape)}"
    assert tuple(w2.shape) == (E, D, two_I // 2), f"w2 {tuple(w2.shape)} != {(E, D, two_I // 2)}"
    assert topk_weights.shape == topk_ids.shape and topk_ids.shape[0] == N
    assert x.dtype == w13.dtype == w2.dtype, "x and weights must share a dtype"
    assert w13.stride(2) == 1 and w2.stride(2) == 1, "weights must be contiguous along K"


def _tensor_descriptor():
    return TensorDescriptor


def _aligned(t: torch.Tensor, *strides: int) -> bool:
    return t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in strides)


def tma_usable(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether the descriptor launches can run here: a Hopper-or-newer GPU (or the
    interpreter), eager mode (tracing keeps the pointer kernels), weights whose experts
    stack into one 2-D tensor each and rows of 16-byte multiples (a descriptor's rule)."""
    if _tensor_descriptor() is None:
        return False
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        return False
    if x.device.type == "cuda":
        if torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif os.environ.get("TRITON_INTERPRET") != "1":
        return False
    for w in (w13, w2):
        if w.stride(2) != 1 or w.stride(0) != w.shape[1] * w.stride(1) or not _aligned(w, w.stride(1)):
            return False
    return x.shape[1] * x.element_size() % 16 == 0 and w2.shape[2] * w2.element_size() % 16 == 0


def _launch_gemm_tma(a, w, out, topk_weights, sorted_pairs, block_expert, num_pairs, cfg, *,
                     gated: bool, out_sorted: bool, weighted: bool):
    """_launch_gemm over `a` already in grouped order (row r holds sorted pair r's input)."""
    descriptor = _tensor_descriptor()
    E, W_ROWS, K = w.shape
    N = W_ROWS // 2 if gated else W_ROWS
    num_padded = sorted_pairs.numel()
    one_dot = gated and bool(cfg.get("ONE_DOT"))
    a_desc = descriptor(a, [num_padded, K], [a.stride(0), 1], [cfg["BLOCK_M"], cfg["BLOCK_K"]])
    if one_dot:  # w13 as [E, 2, I, K]: a tile's gate and up rows in one box (zeros past I)
        w_desc = descriptor(w, [E, 2, N, K], [w.stride(0), N * w.stride(1), w.stride(1), 1],
                            [1, 2, cfg["BLOCK_N"], cfg["BLOCK_K"]])
    else:
        w_desc = descriptor(w, [E * W_ROWS, K], [w.stride(1), 1], [cfg["BLOCK_N"], cfg["BLOCK_K"]])
    grid = (triton.cdiv(num_padded, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _moe_gemm_tma_kernel[grid](
        a_desc, w_desc, out, topk_weights, sorted_pairs, block_expert,
        num_pairs, num_padded, N, K, W_ROWS, out.stride(0), out.stride(1),
        GATED=gated, OUT_SORTED=out_sorted, WEIGHTED=weighted, IEEE=a.dtype == torch.float32,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        ONE_DOT=one_dot, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def grouped_rows(x: torch.Tensor, sorted_pairs: torch.Tensor, num_pairs: int, top_k: int) -> torch.Tensor:
    """x's rows in grouped order, [num_padded, D] (a padding row repeats token 0: computed, never stored)."""
    rows = torch.where(sorted_pairs < num_pairs, sorted_pairs // top_k, 0)
    return x.index_select(0, rows)


def _fused_moe_into(x, w13, w2, topk_weights, topk_ids, out, gate_up_config=None, down_config=None,
                    partial: bool = False, descriptors: bool = True):
    """fused_moe into `out`; the configs replace the tuned ones. `descriptors`: the descriptor
    launches where the gate-up config says "TMA" (tools/tune_kernels.py writes it where they
    timed faster) and they can run here; False: the pointer kernels always."""
    N, D = x.shape
    E, I = w13.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    num_pairs = N * top_k
    name, max_shared = device_name(x.device), max_shared_memory(x.device)
    cfg1 = gate_up_config or get_config(E, 2 * I, D, x.dtype, name, N, top_k, max_shared)
    cfg2 = dict(down_config or get_config(E, D, I, x.dtype, name, N, top_k, max_shared))
    cfg2["BLOCK_M"] = cfg1["BLOCK_M"]  # both launches share one grouping
    sorted_pairs, block_expert = moe_align(topk_ids, E, cfg1["BLOCK_M"])
    route_w = topk_weights.reshape(-1).float().contiguous()
    # Pairs of experts not in w13 (partial) get no row of the weighted outputs: zero them.
    down = (torch.zeros if partial else torch.empty)((num_pairs, D), dtype=x.dtype, device=x.device)
    if descriptors and cfg1.get("TMA") and tma_usable(x, w13, w2):
        # Both launches by descriptors: x gathered into grouped order once (a copy of
        # num_padded rows), the intermediate kept in that order for the second launch.
        hidden = torch.empty((sorted_pairs.numel(), I), dtype=x.dtype, device=x.device)
        _launch_gemm_tma(grouped_rows(x, sorted_pairs, num_pairs, top_k), w13, hidden, route_w, sorted_pairs,
                         block_expert, num_pairs, cfg1, gated=True, out_sorted=True, weighted=False)
        _launch_gemm_tma(hidden, w2, down, route_w, sorted_pairs, block_expert, num_pairs, cfg2,
                         gated=False, out_sorted=False, weighted=True)
        return torch.sum(down.view(N, top_k, D), dim=1, out=out)
    hidden = torch.empty((num_pairs, I), dtype=x.dtype, device=x.device)  # silu(gate) * up
    _launch_gemm(x, w13, hidden, route_w, sorted_pairs, block_expert, num_pairs, top_k, cfg1,
                 gated=True, a_per_token=True, weighted=False)
    _launch_gemm(hidden, w2, down, route_w, sorted_pairs, block_expert, num_pairs, top_k, cfg2,
                 gated=False, a_per_token=False, weighted=True)
    torch.sum(down.view(N, top_k, D), dim=1, out=out)
    return out


def _register_op():
    """specoff::fused_moe as a torch op: traceable by torch.compile(fullgraph=True)."""
    # Under TRITON_INTERPRET wrap_triton returns the bare kernel, invisible to tracing: stay opaque.
    if hasattr(torch.library, "triton_op") and os.environ.get("TRITON_INTERPRET") != "1":
        @torch.library.triton_op("specoff::fused_moe", mutates_args=())
        def fused_moe_op(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                         topk_ids: torch.Tensor, descriptors: bool = True) -> torch.Tensor:
            return _fused_moe_into(x, w13, w2, topk_weights, topk_ids, torch.empty_like(x),
                                   descriptors=descriptors)
        return fused_moe_op

    @torch.library.custom_op("specoff::fused_moe", mutates_args=())
    def fused_moe_op(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, descriptors: bool = True) -> torch.Tensor:
        return _fused_moe_into(x, w13, w2, topk_weights, topk_ids, torch.empty_like(x), descriptors=descriptors)

    @fused_moe_op.register_fake
    def _(x, w13, w2, topk_weights, topk_ids, descriptors=True):
        return torch.empty_like(x)
    return fused_moe_op


_fused_moe_op = _register_op()


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, out: Optional[torch.Tensor] = None, *,
              experts_from: Optional[int] = None, descriptors: bool = True,
              configs: Optional[tuple] = None) -> torch.Tensor:
    """out[n] = sum_j topk_weights[n, j] * SwiGLU_{topk_ids[n, j]}(x[n]); x [N, D] -> [N, D].

    With `out` (a preallocated [N, D] buffer) the kernels run eagerly into it; without, the
    registered op `torch.ops.specoff.fused_moe` runs (what torch.compile traces).
    `experts_from=f`: w13 / w2 hold experts [f, f + E) of a larger set (a layer streamed in
    pieces); the sum runs over the pairs routed to those only (eager kernels).
    `descriptors`: tensor-descriptor launches where the tuned config says so (False: never);
    `configs`: (gate-up, down) launch configs replacing the tuned ones (eager kernels).
    """
    _check(x, w13, w2, topk_weights, topk_ids)
    gate_up_config, down_config = configs or (None, None)
    if experts_from is not None:
        E = w13.shape[0]
        local = torch.where((topk_ids >= experts_from) & (topk_ids < experts_from + E),
                            topk_ids - experts_from, -1)
        return _fused_moe_into(x, w13, w2, topk_weights, local, torch.empty_like(x) if out is None else out,
                               gate_up_config, down_config, partial=True, descriptors=descriptors)
    if out is None and configs is None:
        return _fused_moe_op(x, w13, w2, topk_weights, topk_ids, descriptors)
    out = torch.empty_like(x) if out is None else out
    assert out.shape == x.shape and out.dtype == x.dtype
    return _fused_moe_into(x, w13, w2, topk_weights, topk_ids, out, gate_up_config, down_config,
                           descriptors=descriptors)


def fused_moe_ref(x, w13, w2, topk_weights, topk_ids):
    """Plain torch, float32, loop over experts (what HF MixtralSparseMoeBlock computes)."""
    I = w2.shape[2]
    xf = x.float()
    out = torch.zeros_like(xf)
    for e in range(w13.shape[0]):
        token, slot = torch.where(topk_ids == e)
        if token.numel() == 0:
            continue
        w13_e = w13[e].float()
        gate, up = xf[token] @ w13_e[:I].T, xf[token] @ w13_e[I:].T
        y = (torch.nn.functional.silu(gate) * up) @ w2[e].float().T
        out.index_add_(0, token, y * topk_weights[token, slot, None].float())
    return out.to(x.dtype)
