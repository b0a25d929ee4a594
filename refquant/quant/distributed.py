"""Data-parallel max calibration over torch.distributed: each rank runs its share of the calibration
batches through its own copy of the model, then one exchange gives every rank the amax a single
process gets from all the batches, bit for bit (the max of per-rank maxima is the max).

After the forward loop, while the quantizers still collect (before finish_calibration):
  1. one all_gather_object of a small summary per rank: the error its loop raised, if any (every
     rank then raises, none waits for a rank that stopped), its batch and token counts, a
     fingerprint of its quantizers' names and configs (every rank must run the same model and
     recipe), and the shape and dtype of each amax it collected (None where none of its data
     reached a quantizer);
  2. one all_reduce(MAX) of every collected amax, flattened into one float64 tensor (float64 holds
     every bf16, fp16 and fp32 value exactly): -inf where a rank saw nothing; a 0/1 NaN flag per
     element, since a MAX reduction may drop NaN where torch.maximum propagates it; and each
     weight amax negated, so the same reduction yields the smallest too, and a weight that differs
     between ranks is refused instead of silently maxed.
Constant-amax and disabled quantizers collect nothing and are left alone. Nothing runs per batch.

Around the calibration, stop_together gives the ranks one more exchange at each stage: a rank
that failed on its way to calibration (loading its model, an evaluation forward), or between
calibration and the export (the report, a sensitivity run; refquant.cli.quantize), stops the
others at once.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from typing import Callable, Collection, Iterator, Optional

import torch

from .quantizer import TensorQuantizer


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed's default group; (0, 1) when it is not initialized."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _communication_device() -> torch.device:
    """Where the reduced tensor lives: NCCL reduces CUDA tensors (on this rank's current device,
    torch.cuda.set_device(local_rank)); gloo and the others reduce CPU tensors."""
    import torch.distributed as dist

    if str(dist.get_backend()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _fingerprint(quantizers: list[tuple[str, TensorQuantizer]]) -> str:
    described = [(name, q.config.to_dict(), q.backend, q.flavor) for name, q in quantizers]
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def _collected(quantizer: TensorQuantizer) -> Optional[torch.Tensor]:
    return quantizer._calibrator.amax  # the running max the calibrator holds; None: no data came


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def synchronize_calibration(
    quantizers: list[tuple[str, TensorQuantizer]],
    *,
    batches: int,
    tokens: int,
    error: Optional[BaseException],
    weight_quantizers: Collection[str],
    fallback_device: Callable[[str], torch.device],
) -> tuple[int, int]:
    """Make every collecting quantizer's amax the maximum over all ranks, in place; returns the
    batches and tokens of all ranks together. Call on every rank after its forward loop, before
    finish_calibration, also when the loop failed (pass the exception as `error`: it is raised
    again here, after the other ranks learnt of it).

    weight_quantizers: names whose amax must be equal on every rank (the weights).
    fallback_device: where the amax goes on a rank that collected none for that quantizer.
    Raises ValueError when another rank failed, when the ranks run different models or recipes,
    or when their amax shapes or weights differ.
    """
    import torch.distributed as dist

    rank, world = rank_and_world()
    collecting = [(name, q) for name, q in quantizers if q.is_calibrating]
    layouts = []
    for _, quantizer in collecting:
        amax = _collected(quantizer)
        layouts.append(None if amax is None else (list(amax.shape), str(amax.dtype)))
    summary = {
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "batches": batches,
        "tokens": tokens,
        "fingerprint": _fingerprint(quantizers),
        "layouts": layouts,
    }
    summaries: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(summaries, summary)

    if error is not None:
        raise error
    failed = [(r, s["error"]) for r, s in enumerate(summaries) if s["error"] is not None]
    if failed:
        r, message = failed[0]
        raise ValueError(
            f"calibration failed on rank {r} of {world} ({message}); rank {rank} stops with it. Fix "
            "that rank's error; every rank must calibrate for any to finish."
        )
    fingerprints = [s["fingerprint"] for s in summaries]
    if len(set(fingerprints)) > 1:
        odd = [r for r, f in enumerate(fingerprints) if f != fingerprints[0]]
        raise ValueError(
            f"ranks {odd} run a different model or recipe than rank 0 (their quantizers' names, "
            "configs, backend or flavor differ). Data-parallel calibration needs the same model "
            "and recipe on every rank; only the calibration batches differ."
        )

    # One flat float64 tensor: values | NaN flags | negated weight values.
    values, flags, negated, entries = [], [], [], []
    device = _communication_device()
    for index, (name, quantizer) in enumerate(collecting):
        seen = {(tuple(s["layouts"][index][0]), s["layouts"][index][1]) for s in summaries if s["layouts"][index] is not None}
        if not seen:
            continue  # no rank's data reached it: it keeps no amax, as in one process
        if len(seen) > 1:
            per_rank = [s["layouts"][index] for s in summaries]
            raise ValueError(
                f"{name}: the ranks collected amaxes of different shapes or dtypes ({per_rank}); "
                "every rank must run the same model in the same dtype."
            )
        ((shape, dtype),) = seen
        numel = math.prod(shape)
        local = _collected(quantizer)
        if local is None:
            flat = torch.full((numel,), -math.inf, dtype=torch.float64, device=device)
            nan = torch.zeros(numel, dtype=torch.bool, device=device)
        else:
            flat = local.detach().to(device=device, dtype=torch.float64).flatten()
            nan = torch.isnan(flat)
            flat = flat.masked_fill(nan, -math.inf)
        values.append(flat)
        flags.append(nan.to(torch.float64))
        is_weight = name in weight_quantizers
        if is_weight:
            negated.append(-flat)
        entries.append((name, quantizer, shape, _dtype(dtype), numel, is_weight, local))
    if not entries:
        return sum(s["batches"] for s in summaries), sum(s["tokens"] for s in summaries)

    buffer = torch.cat(values + flags + negated)
    dist.all_reduce(buffer, op=dist.ReduceOp.MAX)

    total = sum(v.numel() for v in values)
    maxima, any_nan, minima = buffer[:total], buffer[total:2 * total] > 0, -buffer[2 * total:]
    reduced_amax, mismatches = [], []
    offset = weight_offset = 0
    for name, _, _, _, numel, is_weight, _ in entries:
        part = slice(offset, offset + numel)
        reduced = torch.where(any_nan[part], torch.full_like(maxima[part], math.nan), maxima[part])
        if is_weight:
            smallest = minima[weight_offset:weight_offset + numel]
            mismatches.append((name, ((reduced != smallest) & ~any_nan[part]).any()))
            weight_offset += numel
        reduced_amax.append(reduced)
        offset += numel
    if mismatches:
        found = torch.stack([flag for _, flag in mismatches]).tolist()  # one host sync
        differing = [name for (name, _), bad in zip(mismatches, found) if bad]
        if differing:
            raise ValueError(
                f"the ranks hold different weights: the amax of {differing[0]} (and {len(differing) - 1} "
                "more) is not the same on every rank. Every rank must load the same model (same "
                "checkpoint, dtype and seed)."
            )
    for (name, quantizer, shape, dtype, _, _, local), reduced in zip(entries, reduced_amax):
        target = local.device if local is not None else fallback_device(name)
        quantizer._calibrator.amax = reduced.to(dtype).reshape(shape).to(target)
    return sum(s["batches"] for s in summaries), sum(s["tokens"] for s in summaries)


@contextmanager
def stop_together(stage: str) -> Iterator[None]:
    """Run the block on every rank, then let the ranks learn whether it raised anywhere.

    Under torch.distributed (initialized, world size > 1) one all_gather_object follows the block:
    a rank whose block raised tells the others, then raises its own error again; the others raise
    a ValueError naming that rank, its error and `stage` ("before calibration"). So a rank that
    fails before the next collective stops every rank at once, instead of leaving them waiting in
    that collective until the process group's timeout. Every rank must enter the block (the
    exchange is a collective). Without torch.distributed it only runs the block.
    """
    rank, world = rank_and_world()
    if world == 1:
        yield
        return
    try:
        yield
    except Exception as error:
        try:
            _exchange_failures(stage, error)
        except Exception:  # noqa: BLE001 - this rank's own error is the one to raise
            pass
        raise
    _exchange_failures(stage, None)


def _exchange_failures(stage: str, error: Optional[BaseException]) -> None:
    import torch.distributed as dist

    rank, world = rank_and_world()
    failures: list[Optional[str]] = [None] * world
    dist.all_gather_object(failures, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, message) for r, message in enumerate(failures) if message is not None]
    if failed and error is None:
        failed_rank, message = failed[0]
        raise ValueError(
            f"rank {failed_rank} of {world} failed {stage} ({message}); rank {rank} stops with it. Fix that "
            "rank's error; every rank must get this far for any to go on."
        )
