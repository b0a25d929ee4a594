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

Max calibration need not wait for a check at all (ChecksBeside, REFQUANT_CHECKS_BESIDE): it hands
new counts to a worker thread and goes on with grouped_mm; a batch whose counts fail is run
again with the per-expert calls from what calibration held before it, so the amaxes never
depend on a verdict that came late.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor, wait
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
BESIDE_SETTING = "REFQUANT_CHECKS_BESIDE"
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
    if new_counts and _beside is not None:
        _beside.submit(key, new_counts)  # the forward goes on; the calibration learns the verdict later
    elif new_counts:
        reason = _check(key, sorted(new_counts))
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


def _check(key: tuple, counts: list[int], threads: Optional[int] = None) -> Optional[str]:
    """None when grouped_mm's rows equal F.linear's for each of `counts` (and, where the operands
    are larger than any before for `key`, whatever the split into groups: the module docstring),
    else why not. One read of the device. threads: how many share the F.linear calls
    (check_threads' answer when None)."""
    device_type, index, dtype, out_features, in_features = key
    device = torch.device(device_type) if index < 0 else torch.device(device_type, index)
    rows = max(counts)
    generator = torch.Generator(device=device).manual_seed(SEED)
    a = torch.randn(rows, in_features, generator=generator, device=device, dtype=dtype)
    w = torch.randn(1, out_features, in_features, generator=generator, device=device, dtype=dtype)
    differs = torch.zeros((), dtype=torch.bool, device=device)
    try:
        whole = F.grouped_mm(a, w.transpose(-2, -1), offs=torch.tensor([rows], dtype=torch.int32, device=device))
        check_split = rows > _split_rows.get(key, 0)
        if check_split:
            ends = [end for end in itertools.accumulate(SPLIT_SIZES) if end < rows] + [rows]
            split = F.grouped_mm(a, w.expand(len(ends), -1, -1).contiguous().transpose(-2, -1),
                                 offs=torch.tensor(ends, dtype=torch.int32, device=device))
            differs |= (bits_of(split) != bits_of(whole)).any()
            del split
    except (RuntimeError, TypeError, ValueError) as error:
        return f"grouped_mm raised {type(error).__name__}: {error}"
    for part_differs in _linears_differ(a, w[0], whole, counts, threads):
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


def _linears_differ(a: torch.Tensor, weight: torch.Tensor, whole: torch.Tensor, counts: list[int],
                    threads: Optional[int]) -> list[torch.Tensor]:
    """Per share of `counts` (sorted), a bool on the device: whether F.linear(a[:count], weight)
    differs from whole[:count] in any bit for a count of the share; the shares' calls made on
    worker threads where there are several (`threads`, else check_threads')."""
    pool_size = check_threads(a.device) if threads is None else threads
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


class ChecksBeside:
    """A calibration's row-count checks made on a worker thread while its forwards go on.

    A new row count's check costs the host a few hundred microseconds of cuBLAS picking a kernel,
    and a first calibration meets hundreds of new counts (the module docstring), each in the
    forward's way. While max calibration runs its batches (refquant.hf.calibrate), check_row_counts
    hands a call's new counts to the worker and answers True at once: the forward multiplies with
    grouped_mm before its bits are known to be F.linear's. The calibration snapshots what a batch
    changes before running it and asks poll() after it; a check that failed names the first batch
    that used its counts, and the calibration puts back that batch's snapshot and runs it and the
    batches after it again, with the key's per-expert calls. So the amaxes are those of the
    per-expert calls whatever the verdicts (tests/test_grouped_experts.py fails a check on
    purpose). The worker multiplies on a side stream of its own (its operands are random, it reads
    none of the forward's tensors) and holds one cuBLAS workspace of its own until close(), which
    gives it back. An error in the worker is raised by the next poll() (the calibration's last one
    waits for every verdict); close() drops what is left, as it runs after a failed forward too."""

    def __init__(self) -> None:
        self._pool: Optional[ThreadPoolExecutor] = None
        self._tickets: list[tuple[int, tuple, set[int], Future]] = []  # (batch, key, counts, verdict), in order
        self._pending: dict[tuple, set[int]] = {}  # key -> counts handed over, verdict not taken yet
        self._streams: dict[tuple, torch.cuda.Stream] = {}  # the worker's own, by device
        self.batch = 0  # the batch the forward runs now (set by the calibration)

    @staticmethod
    def wanted(device_types: set[str]) -> bool:
        """Whether a calibration on devices of `device_types` makes its checks beside its forwards:
        BESIDE_SETTING "0" never, "1" on any device (the CPU for tests), else ("auto") on CUDA where
        torch can give back the worker's cuBLAS workspace."""
        setting = os.environ.get(BESIDE_SETTING, "auto")
        if setting not in ("0", "1", "auto"):
            raise ValueError(f"{BESIDE_SETTING}={setting!r}: give 0 (checks in the forward), 1 or auto")
        if setting == "auto":
            return device_types == {"cuda"} and can_release_blas_workspaces()
        return setting == "1"

    def submit(self, key: tuple, counts: set[int]) -> None:
        """Hand the counts of `key` not handed over already to the worker."""
        counts = counts.difference(self._pending.get(key, ()))
        if not counts:
            return
        self._pending.setdefault(key, set()).update(counts)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="refquant-check-beside")
        self._tickets.append((self.batch, key, counts, self._pool.submit(self._work, key, sorted(counts))))

    def _work(self, key: tuple, counts: list[int]) -> Optional[str]:
        with torch.cuda.stream(self._stream(key)) if key[0] == "cuda" else contextlib.nullcontext():
            return _check(key, counts, threads=1)

    def _stream(self, key: tuple) -> torch.cuda.Stream:
        """The worker's own stream on `key`'s CUDA device."""
        if key[:2] not in self._streams:
            self._streams[key[:2]] = torch.cuda.Stream(torch.device("cuda", key[1]))
        return self._streams[key[:2]]

    def poll(self, wait_all: bool = False) -> Optional[int]:
        """Take the verdicts that are in (all of them with wait_all), in the order handed over:
        counts that passed join the checked ones; a key that failed keeps its per-expert calls
        (with the warning). Returns the first batch that used counts that failed, or None."""
        if wait_all:
            wait([future for *_, future in self._tickets])
        first_failed = None
        while self._tickets and self._tickets[0][3].done():
            batch, key, counts, future = self._tickets.pop(0)
            self._pending[key].difference_update(counts)
            reason = future.result()  # (an error of the worker's is raised here)
            if key in _failed:
                continue
            if reason is not None:
                _keep_per_expert_calls(key, reason)
                first_failed = batch if first_failed is None else min(first_failed, batch)
            else:
                _checked_counts.setdefault(key, set()).update(counts)
        return first_failed

    def oldest_open_batch(self) -> Optional[int]:
        """The first batch whose checks have not all given their verdict (None: none open)."""
        return self._tickets[0][0] if self._tickets else None

    def close(self) -> None:
        """Wait for the worker, drop what it was given, and give back its cuBLAS workspace."""
        if self._pool is None:
            return
        wait([future for *_, future in self._tickets])
        self._pool.shutdown()
        self._pool, self._tickets = None, []
        self._pending.clear()
        if self._streams:
            for stream in self._streams.values():
                stream.synchronize()
            self._streams.clear()
            release_blas_workspaces()


_beside: Optional[ChecksBeside] = None  # the calibration's, while it runs its batches


@contextlib.contextmanager
def checks_beside(device_types: set[str]):
    """Within the block, new row counts are checked on a worker thread (ChecksBeside, given to
    the block) where ChecksBeside.wanted says so; else the block gets None and checks stay in the
    forward."""
    global _beside
    if _beside is not None or not ChecksBeside.wanted(device_types):
        yield None
        return
    _beside = beside = ChecksBeside()
    try:
        yield beside
    finally:
        _beside = None
        beside.close()


def row_counts_checked() -> int:
    """How many (key, row count) pairs this process has checked equal so far (benchmarks count
    a calibration's one-time checks with it)."""
    return sum(len(counts) for counts in _checked_counts.values())


def forget_checks() -> None:
    """Drop what was measured (tests; a process that changes its CUDA libraries)."""
    _checked_counts.clear()
    _split_rows.clear()
    _failed.clear()
