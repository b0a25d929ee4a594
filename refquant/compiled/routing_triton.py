"""The fused experts' routing as four small Triton kernels (CUDA only): what
refquant.hf.experts_loop._Routing computes with torch's sorts, for the loop on a GPU.

Why kernels: the loop needs, every layer, each expert's rows in the eager loop's order (by expert,
then top-k position, then token), each row's token and routing weight, the running row counts and
a table of each token's rows in ascending expert order. In torch that is a stable sort of the
routed ids, a search for the bounds, a sort of each token's rows and a dozen smaller steps: two
sorts of ~0.1-0.2 ms of host time each and about twenty launches a layer, in a forward bound by
the host. Here it is a counting sort in four launches through refquant's direct launch.

The slots are the routed (token, top-k position) pairs in position-major order, slot = position *
tokens + token, as torch.where walks the eager loop's mask; each slot falls in a bin: 0 for an id
below 0, 1 + id for an expert, experts + 1 for an id past the last, and a last bin for the
padding of the last chunk. A stable counting sort by bin gives each slot its row:
- _count_kernel: each chunk of CHUNK slots counts its slots of each bin;
- _scan_kernel (one program): where each chunk's slots of each bin start among that bin's rows
  (the counts of the chunks before), where each bin's rows start (the counts of the bins before),
  and `bounds` (bounds[e]: the rows of an id below e, e = 0 .. experts), _Routing's;
- _place_kernel: each slot's row is its bin's start, plus its chunk's start within the bin, plus
  the slots of its bin before it in its chunk; each row gets its token and routing weight, and each
  slot its row. Every slot gets a row, ids outside the experts too (outside the experts' rows),
  so every output is written in full;
- _table_kernel: each token's rows sorted (top_k of them, padded to a power of two): the row
  table, entry [j, token] the row of the token's j-th expert in ascending order.
Integers only, and the weights copied as they are: the same values as the torch steps, which
tests/test_routing_kernel.py holds it to (on CUDA, and on the CPU through Triton's interpreter
where Triton is installed).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .triton_launch import DirectLaunch

NUM_WARPS = 4
TILE = 16384  # slots x bins a program's one-hot holds
# The most experts the kernels take: their one-hot and scan tiles grow with the bins (2048 here);
# a layer with more keeps the torch steps.
MAX_EXPERTS = 1024
TABLE_TOKENS = 128  # tokens a program of the table sorts
SCAN_CHUNKS = 16  # chunks the scan adds at a time


@triton.jit
def _bins_of(index_ptr, slots, tokens, stride_token, stride_position, chunk, experts,
             BINS: tl.constexpr, CHUNK: tl.constexpr):
    """The chunk's slots (int64), whether each is one, its token and top-k position, and its bin."""
    slot = chunk.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    valid = slot < slots
    position, token = slot // tokens, slot % tokens
    ids = tl.load(index_ptr + token * stride_token + position * stride_position, mask=valid, other=0).to(tl.int64)
    bins = tl.where(ids < 0, 0, tl.where(ids >= experts, experts + 1, ids + 1))
    return slot, valid, token, position, tl.where(valid, bins, BINS - 1)


@triton.jit
def _count_kernel(index_ptr, counts_ptr, slots, tokens, stride_token, stride_position, experts,
                  BINS: tl.constexpr, CHUNK: tl.constexpr):
    chunk = tl.program_id(0)
    _, _, _, _, bins = _bins_of(index_ptr, slots, tokens, stride_token, stride_position, chunk, experts, BINS, CHUNK)
    one_hot = (bins[:, None] == tl.arange(0, BINS)[None, :]).to(tl.int32)
    tl.store(counts_ptr + chunk.to(tl.int64) * BINS + tl.arange(0, BINS), tl.sum(one_hot, axis=0))


@triton.jit
def _scan_kernel(counts_ptr, within_ptr, bin_start_ptr, bounds_ptr, chunks, experts,
                 BINS: tl.constexpr, ROWS: tl.constexpr):
    bins = tl.arange(0, BINS)
    total = tl.zeros((BINS,), dtype=tl.int32)
    for first in range(0, chunks, ROWS):
        chunk = first + tl.arange(0, ROWS)
        at = chunk.to(tl.int64)[:, None] * BINS + bins[None, :]
        inside = (chunk < chunks)[:, None]
        counts = tl.load(counts_ptr + at, mask=inside, other=0)
        tl.store(within_ptr + at, tl.cumsum(counts, axis=0) - counts + total[None, :], mask=inside)
        total += tl.sum(counts, axis=0)
    start = tl.cumsum(total, axis=0) - total
    tl.store(bin_start_ptr + bins, start)
    tl.store(bounds_ptr + bins - 1, start.to(tl.int64), mask=(bins >= 1) & (bins <= experts + 1))


@triton.jit
def _place_kernel(index_ptr, weights_ptr, within_ptr, bin_start_ptr, token_ptr, weight_ptr, row_of_slot_ptr,
                  slots, tokens, stride_token, stride_position, weight_stride_token, weight_stride_position, experts,
                  BINS: tl.constexpr, CHUNK: tl.constexpr):
    chunk = tl.program_id(0)
    slot, valid, token, position, bins = _bins_of(index_ptr, slots, tokens, stride_token, stride_position, chunk,
                                                  experts, BINS, CHUNK)
    one_hot = (bins[:, None] == tl.arange(0, BINS)[None, :]).to(tl.int32)
    before = tl.sum((tl.cumsum(one_hot, axis=0) - one_hot) * one_hot, axis=1)  # earlier slots of the bin, this chunk
    start = tl.load(bin_start_ptr + bins) + tl.load(within_ptr + chunk.to(tl.int64) * BINS + bins)
    row = (start + before).to(tl.int64)
    tl.store(token_ptr + row, token, mask=valid)
    weight = tl.load(weights_ptr + token * weight_stride_token + position * weight_stride_position, mask=valid)
    tl.store(weight_ptr + row, weight, mask=valid)
    tl.store(row_of_slot_ptr + slot, row.to(tl.int32), mask=valid)


@triton.jit
def _table_kernel(row_of_slot_ptr, table_ptr, tokens,
                  TOP_K: tl.constexpr, TOP_K_POWER: tl.constexpr, TOKENS: tl.constexpr):
    token = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    position = tl.arange(0, TOP_K_POWER)
    taken = (token < tokens)[:, None] & (position < TOP_K)[None, :]
    at = position.to(tl.int64)[None, :] * tokens + token[:, None]
    rows = tl.load(row_of_slot_ptr + at, mask=taken, other=2147483647)  # padding sorts last
    tl.store(table_ptr + at, tl.sort(rows, dim=1), mask=taken)


@functools.cache
def _launches(bins: int, chunk: int, top_k: int) -> tuple[DirectLaunch, ...]:
    constants = {"BINS": bins, "CHUNK": chunk}
    return (DirectLaunch(_count_kernel, constants, NUM_WARPS, outputs=("counts_ptr",)),
            DirectLaunch(_scan_kernel, {"BINS": bins, "ROWS": SCAN_CHUNKS}, NUM_WARPS,
                         outputs=("within_ptr", "bin_start_ptr", "bounds_ptr")),
            DirectLaunch(_place_kernel, constants, NUM_WARPS, outputs=("token_ptr", "weight_ptr", "row_of_slot_ptr")),
            DirectLaunch(_table_kernel, {"TOP_K": top_k, "TOP_K_POWER": 1 << (top_k - 1).bit_length(),
                                         "TOKENS": TABLE_TOKENS}, NUM_WARPS, outputs=("table_ptr",)))


def route(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, experts: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bounds, token, weight, table) of _Routing for top_k_index (tokens, top_k), integer ids,
    and top_k_weights of its shape, both on one CUDA device: bounds (experts + 1,) int64, each
    row's token (int64) and routing weight (top_k_weights' dtype) for the rows 0 .. tokens * top_k
    - 1, and the row table (top_k, tokens) int32. Rows of ids outside 0 .. experts - 1 are among
    them (before and after the experts' rows), as _Routing sorts them."""
    tokens, top_k = top_k_index.shape
    slots = tokens * top_k
    if slots >= 2**31 or top_k_weights.shape != top_k_index.shape:
        raise ValueError(f"route: {tokens} x {top_k} routed slots (at most 2**31 - 1), weights of shape "
                         f"{tuple(top_k_weights.shape)} (must be {tuple(top_k_index.shape)}).")
    bins = 1 << (experts + 2).bit_length()  # below, each expert, past the last, and the padding
    chunk = max(16, TILE // bins)
    chunks = -(-slots // chunk)
    count, scan, place, table_of = _launches(bins, chunk, top_k)
    device = top_k_index.device
    counts = torch.empty(chunks, bins, dtype=torch.int32, device=device)
    within = torch.empty_like(counts)
    bin_start = torch.empty(bins, dtype=torch.int32, device=device)
    bounds = torch.empty(experts + 1, dtype=torch.int64, device=device)
    token = torch.empty(slots, dtype=torch.int64, device=device)
    weight = torch.empty(slots, dtype=top_k_weights.dtype, device=device)
    row_of_slot = torch.empty(slots, dtype=torch.int32, device=device)
    table = torch.empty(top_k, tokens, dtype=torch.int32, device=device)
    strides = (*top_k_index.stride(),)
    count.launch(chunks, (top_k_index, counts, slots, tokens, *strides, experts))
    scan.launch(1, (counts, within, bin_start, bounds, chunks, experts))
    place.launch(chunks, (top_k_index, top_k_weights, within, bin_start, token, weight, row_of_slot,
                          slots, tokens, *strides, *top_k_weights.stride(), experts))
    table_of.launch(-(-tokens // TABLE_TOKENS), (row_of_slot, table, tokens))
    return bounds, token, weight, table
