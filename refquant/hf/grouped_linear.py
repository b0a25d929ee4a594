"""Many experts' F.linear in one grouped matmul, where that is measured to give their bits.

modelopt's bits for fused experts are those of transformers' eager loop: one F.linear per expert
on that expert's rows (cuBLAS on a GPU, ~1,000 calls a forward for a 64-expert model), whose
host time alone is most of a plain forward. torch.nn.functional.grouped_mm computes every
expert's product in one kernel. The two give the same bits when, for every output, both add the
K products in the same order, which no library documents; refquant measures it instead, once per
process and per (device, dtype, out features, in features) of the weights:

  - grouped_mm's rows do not depend on where the groups start and end (one call on all rows
    against a call on the same rows split into groups of several sizes), and
  - for every row count M an expert receives, F.linear on the first M rows gives grouped_mm's
    rows (one call per M: cuBLAS picks its kernel by shape).

On seeded random operands of the weights' shapes and layout: two ways of summing that differ in
order differ on random data, so equal bits there mean the same order, and the same order gives
the same bits on any data. Only the row counts a call brings that no earlier call brought are
checked (a calibration of a 64-expert model meets a few hundred, not every count up to the
largest; each F.linear of a new shape costs cuBLAS a look-up); the random operands are made
afresh for each check, as many rows as its largest count (so that count's last row is one the
comparison reads), and the split is checked again whenever that is more rows than before. A
count that fails, or a grouped_mm that raises, keeps the per-expert calls for the key for the
process, with a warning. REFQUANT_GROUPED_EXPERTS=0 keeps them always.

A new count's F.linear costs the host a few hundred microseconds (cuBLAS picks a kernel for the
shape) and little device time, so a check's counts can be shared out over worker threads with
REFQUANT_CHECK_THREADS=n (default CHECK_THREADS, the calling thread alone): each worker makes its
F.linear calls on the caller's device and stream, so they are ordered after the operands as the
caller's would be, and torch lets go of Python's lock while cuBLAS picks. Each worker's cuBLAS
handle gets a workspace of the size the caller's has (cuBLAS then has the same kernels to pick
from; benchmarks/probes/parallel_checks.py compares a worker's bits with the caller's); they are
given back when the check ends (on a torch that cannot, the check runs on the calling thread
alone), so a check holds n workspaces while it runs and none after.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Optional

import torch
import torch.nn.functional as F

from ..dialects.compare import bits_of
from ..quant.backends import can_release_blas_workspaces, release_blas_workspaces

SETTING = "REFQUANT_GROUPED_EXPERTS"
DTYPES = (torch.bfloat16,)  # what grouped_mm takes on CUDA
# Group sizes that start the split call (the rest of the rows is its last group).
SPLIT_SIZES = (1, 2, 3, 5, 8, 13, 64, 1, 100, 7)
SEED = 20261206
THREADS_SETTING = "REFQUANT_CHECK_THREADS"
# The calling thread: on an H100 host 4 workers made a new count's call only 1.3-2.7x faster and
# each adds a cuBLAS workspace (32 MiB on sm90) while a check runs (benchmarks/results/parallel_checks_h100_2026-12-07.json).
CHECK_THREADS = 1

_checked_counts: dict[tuple, set[int]] = {}  # key -> the row counts checked equal
_split_rows: dict[tuple, int] = {}  # key -> the most rows the split was checked on
_failed: dict[tuple, str] = {}  # key -> why the per-expert calls stay
_workers: dict[int, ThreadPoolExecutor] = {}  # threads -> the pool of that many


def grouped_matmul_allowed(x: torch.Tensor) -> bool:
    """Whether a grouped matmul may stand for the per-expert calls on x at all: CUDA, bf16, the
    setting not off, grouped_mm present."""
    return (x.is_cuda and x.dtype in DTYPES and os.environ.get(SETTING, "1") != "0"
            and hasattr(F, "grouped_mm"))


def _key(x: torch.Tensor, weights: torch.Tensor) -> tuple:
    return (x.device.type, x.get_device(), x.dtype, weights.shape[-2], weights.shape[-1])


def grouped_linear(x: torch.Tensor, weights: torch.Tensor, counts: list[int], offsets: torch.Tensor) -> Optional[torch.Tensor]:
    """F.linear(rows_i, weights[i]) for each group i of counts[i] consecutive rows of x, in one
    grouped_mm, or None where that is not measured to give the same bits (the caller then makes
    the per-expert calls). weights: (groups, out, in), each slice contiguous; offsets: the int32
    running sums of counts on x's device."""
    if not check_row_counts(x, weights, counts):
        return None
    try:
        return F.grouped_mm(x, weights.transpose(-2, -1), offs=offsets)
    except (RuntimeError, TypeError, ValueError) as error:  # a layout or build grouped_mm does not take
        return _keep_per_expert_calls(_key(x, weights), f"grouped_mm raised {type(error).__name__}: {error}")


def check_row_counts(x: torch.Tensor, weights: torch.Tensor, counts: list[int]) -> bool:
    """Whether grouped_mm gives F.linear's bits for x's dtype and device, weights' shape and each
    of `counts` (the module docstring), checking the counts no earlier call brought; False
    without a check for rows grouped_mm does not take (not a multiple of 16 bytes) or weight slices
    that are not contiguous. The experts loop asks for a layer's counts before its groups hold any
    rows, so a check's operands never add to a group's memory; grouped_linear asks again (then
    nothing is left to check)."""
    key = _key(x, weights)
    if key in _failed or weights.shape[-1] * x.element_size() % 16 or not weights[0].is_contiguous():
        return False
    new_counts = {count for count in counts if count}.difference(_checked_counts.get(key, ()))
    if new_counts:
        reason = _check(x, weights, sorted(new_counts), key)
        if reason is not None:
            _keep_per_expert_calls(key, reason)
            return False
        _checked_counts.setdefault(key, set()).update(new_counts)
    return True


def _keep_per_expert_calls(key: tuple, reason: str) -> None:
    """Marks `key` as failed for the process and says so once."""
    _failed[key] = reason
    device = f"{key[0]}:{key[1]}" if key[1] >= 0 else key[0]
    warnings.warn(f"refquant: the experts' per-expert F.linear calls stay for {key[2]} weights of "
                  f"{key[3]} x {key[4]} on {device} ({reason}); same bits, more host time.", stacklevel=4)


def _check(x: torch.Tensor, weights: torch.Tensor, counts: list[int], key: tuple) -> Optional[str]:
    """None when grouped_mm's rows equal F.linear's for each of `counts` (and, where the operands
    are larger than any before for `key`, whatever the split into groups: the module docstring),
    else why not. One read of the device."""
    out_features, in_features = weights.shape[-2:]
    rows = max(counts)
    generator = torch.Generator(device=x.device).manual_seed(SEED)
    a = torch.randn(rows, in_features, generator=generator, device=x.device, dtype=x.dtype)
    w = torch.randn(1, out_features, in_features, generator=generator, device=x.device, dtype=x.dtype)
    differs = torch.zeros((), dtype=torch.bool, device=x.device)
    try:
        whole = F.grouped_mm(a, w.transpose(-2, -1), offs=torch.tensor([rows], dtype=torch.int32, device=x.device))
        check_split = rows > _split_rows.get(key, 0)
        if check_split:
            ends = [end for end in itertools.accumulate(SPLIT_SIZES) if end < rows] + [rows]
            split = F.grouped_mm(a, w.expand(len(ends), -1, -1).contiguous().transpose(-2, -1),
                                 offs=torch.tensor(ends, dtype=torch.int32, device=x.device))
            differs |= (bits_of(split) != bits_of(whole)).any()
            del split
    except (RuntimeError, TypeError, ValueError) as error:
        return f"grouped_mm raised {type(error).__name__}: {error}"
    for part_differs in _linears_differ(a, w[0], whole, counts):
        differs |= part_differs
    if bool(differs):  # the one read of the check
        return "grouped_mm's bits differ from F.linear's"
    if check_split:
        _split_rows[key] = rows
    return None


def check_threads(device: torch.device) -> int:
    """How many threads share a check's F.linear calls on `device`: THREADS_SETTING, else
    CHECK_THREADS (at most the CPUs); 1 on CUDA where torch cannot give back the workers' cuBLAS
    workspaces (each worker's handle would hold one for the process)."""
    text = os.environ.get(THREADS_SETTING)
    if text is not None and (not text.isdigit() or int(text) < 1):
        raise ValueError(f"{THREADS_SETTING}={text!r}: give a whole number of threads, 1 or more")
    if device.type == "cuda" and not can_release_blas_workspaces():
        return 1
    return min(CHECK_THREADS, os.cpu_count() or 1) if text is None else int(text)


def _linears_differ(a: torch.Tensor, weight: torch.Tensor, whole: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """Per share of `counts` (sorted), a bool on the device: whether F.linear(a[:count], weight)
    differs from whole[:count] in any bit for a count of the share; the shares' calls made on
    worker threads where there are several."""
    pool_size = check_threads(a.device)
    threads = min(pool_size, len(counts))
    stream = torch.cuda.current_stream(a.device) if a.is_cuda else None
    if threads == 1:
        return [_share_differs(a, weight, whole, counts, stream)]
    shares = [counts[index::threads] for index in range(threads)]  # sorted counts dealt out: even work
    if pool_size not in _workers:
        _workers[pool_size] = ThreadPoolExecutor(pool_size, thread_name_prefix="refquant-check")
    workers = _workers[pool_size]
    futures = [workers.submit(_share_differs, a, weight, whole, share, stream) for share in shares]
    try:
        wait(futures)  # every share done (or failed) before the workspaces go
        return [future.result() for future in futures]
    finally:
        if stream is not None:
            release_blas_workspaces()  # the workers' handles' workspaces: memory a forward would otherwise not hold


def _share_differs(a: torch.Tensor, weight: torch.Tensor, whole: torch.Tensor, counts: list[int],
                   stream: Optional[torch.cuda.Stream]) -> torch.Tensor:
    # grad mode and the current stream are a thread's own: no graph, and the caller's stream
    with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
        differs = torch.zeros((), dtype=torch.bool, device=a.device)
        for count in counts:
            differs |= (bits_of(F.linear(a[:count], weight)) != bits_of(whole[:count])).any()
        return differs


def row_counts_checked() -> int:
    """How many (key, row count) pairs this process has checked equal so far (benchmarks count
    a calibration's one-time checks with it)."""
    return sum(len(counts) for counts in _checked_counts.values())


def forget_checks() -> None:
    """Drop what was measured (tests; a process that changes its CUDA libraries)."""
    _checked_counts.clear()
    _split_rows.clear()
    _failed.clear()
