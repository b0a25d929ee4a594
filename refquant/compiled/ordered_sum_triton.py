"""Routed rows added onto their tokens' sums in a fixed order, as one Triton kernel (CUDA only):
refquant.hf.experts_loop.add_rows_in_order for the fused experts' loop on a GPU.

Why a kernel: the loop must add each token's expert outputs in ascending expert order, each
addition rounded, as transformers' eager loop does with an index_add_ per expert. Without this
kernel the loop keeps every routed row's output until the layer ends and adds them one top-k slot
at a time (a buffer of routed rows x hidden: 128 MiB for 4096 tokens at top-8 of a 2048-wide
layer), or makes an index_add_ per expert (a launch each). This kernel adds a group of experts'
rows as soon as the group has them, in one launch, and keeps nothing.

Step for step what add_rows_in_order computes: for each token and block of columns, the sums'
values; then for j = 0 .. TOP_K - 1, where the row table[j, token] lies in the group's rows
first_row .. end_row - 1 (read from `span` on the device), that row of `rows` added: both in
fp32, the sum rounded to the sums' dtype (nearest, ties to even), as torch adds two bf16 or fp16
tensors (fp32: the one rounding). A row outside the range leaves the value as it is (no addition
of a zero). tests/test_experts_ordered_sum.py holds it
to add_rows_in_order bit for bit on CUDA.

Launched through refquant's direct launch (triton_launch.DirectLaunch: Triton's launcher alone,
~a third of `kernel[grid](...)`'s host time, the loop making one a group). It keys a compiled
kernel on each int's exact value, so the group's first and end rows, which change at every call,
are not ints of the launch: the loop writes every group's pair into one device tensor a layer and
hands the kernel its group's pair, whose address takes a few values only.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .triton_launch import DirectLaunch

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
NUM_WARPS = 4
MAX_BLOCK = 1024  # columns a program adds


@triton.jit
def _add_rows_in_order_kernel(sums_ptr, rows_ptr, table_ptr, span_ptr, out_ptr, tokens, width,
                              TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    program = tl.program_id(0)
    first_row = tl.load(span_ptr).to(tl.int64)
    end_row = tl.load(span_ptr + 1).to(tl.int64)
    blocks = tl.cdiv(width, BLOCK)
    token = program // blocks
    columns = (program % blocks) * BLOCK + tl.arange(0, BLOCK)
    inside = columns < width
    at = token.to(tl.int64) * width + columns
    total = tl.load(sums_ptr + at, mask=inside)
    for j in tl.static_range(TOP_K):
        row = tl.load(table_ptr + j * tokens + token).to(tl.int64)
        taken = (row >= first_row) & (row < end_row)
        value = tl.load(rows_ptr + (row - first_row) * width + columns, mask=inside & taken, other=0.0)
        added = (total.to(tl.float32) + value.to(tl.float32)).to(total.dtype)
        total = tl.where(taken, added, total)
    tl.store(out_ptr + at, total, mask=inside)


@functools.cache
def _launch(top_k: int, block: int) -> DirectLaunch:
    return DirectLaunch(_add_rows_in_order_kernel, {"TOP_K": top_k, "BLOCK": block}, NUM_WARPS, outputs=("out_ptr",))


def add_rows_in_order(sums: torch.Tensor, rows: torch.Tensor, table: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """refquant.hf.experts_loop.add_rows_in_order in one launch: sums (tokens, width) and rows
    (n, width) of one dtype of DTYPES on one CUDA device, table (top_k, tokens) int32 or int64
    row numbers there, span the int64 pair (first row, first row + n) there. Returns a new tensor."""
    tokens, width = sums.shape
    if rows.shape[0] == 0 or sums.numel() == 0:
        return sums.clone()
    sums, rows, table = sums.contiguous(), rows.contiguous(), table.contiguous()
    if span.dtype != torch.int64 or span.shape != (2,) or not span.is_contiguous() or span.device != sums.device:
        raise ValueError(f"add_rows_in_order: span must be a contiguous int64 pair on {sums.device}, got "
                         f"{span.dtype} of shape {tuple(span.shape)} on {span.device}.")
    out = torch.empty_like(sums)
    block = min(MAX_BLOCK, 1 << (width - 1).bit_length())  # the next power of two
    programs = tokens * -(-width // block)
    _launch(table.shape[0], block).launch(programs, (sums, rows, table, span, out, tokens, width))
    return out
