"""Whether the grouped experts' row-count checks (refquant.hf.grouped_linear) can run in worker
threads: F.linear's host cost at row counts cuBLAS has not met, made from 1, 2, 4 and 8 threads at
once (wall time a count), and whether F.linear made in a worker thread gives the bits the main
thread's F.linear gives at the same count (cuBLAS keeps a handle a thread: its pick of a kernel
for a shape must not depend on which), and the memory the threads' handles hold (torch gives each
handle and stream a cuBLAS workspace). On the MoE shape's two projections (CUDA).

    python3 benchmarks/probes/parallel_checks.py --out DIR

The JSON goes to DIR/parallel_checks.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from refquant.compiled.private_api import release_blas_workspaces
from probe_output import write_json

SHAPES = {"gate_up": (1536, 2048), "down": (2048, 768)}  # (out, in) of the MoE shape's experts


def _linear_calls(a: torch.Tensor, w: torch.Tensor, counts: list[int], stream: torch.cuda.Stream) -> None:
    with torch.cuda.stream(stream):
        for count in counts:
            F.linear(a[:count], w)


def wall_per_count(a: torch.Tensor, w: torch.Tensor, counts: list[int], threads: int) -> dict:
    """us a count, host and with the device's work, for `counts` (new to the process) split over threads."""
    stream = torch.cuda.current_stream()
    parts = [counts[index::threads] for index in range(threads)]
    torch.cuda.synchronize()
    began = time.perf_counter()
    if threads == 1:
        _linear_calls(a, w, counts, stream)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda part: _linear_calls(a, w, part, stream), parts))
    host = time.perf_counter() - began
    torch.cuda.synchronize()
    return {"threads": threads, "counts": len(counts), "host_us": host / len(counts) * 1e6,
            "total_us": (time.perf_counter() - began) / len(counts) * 1e6,
            "allocated_mib_after": torch.cuda.memory_allocated() / 2**20}


def thread_bits(a: torch.Tensor, w: torch.Tensor, counts: list[int]) -> dict:
    """Counts where a worker thread's F.linear (the count's first call in the process) and the
    main thread's afterwards differ in bits; then the other order on other counts."""
    stream = torch.cuda.current_stream()

    def in_worker(count: int) -> torch.Tensor:
        with torch.cuda.stream(stream):
            return F.linear(a[:count], w)

    worker_first, main_first = counts[0::2], counts[1::2]
    differ = []
    with ThreadPoolExecutor(4) as pool:
        worker_out = list(pool.map(in_worker, worker_first))
    for count, out in zip(worker_first, worker_out):
        if not torch.equal(out.view(torch.int16), F.linear(a[:count], w).view(torch.int16)):
            differ.append(("worker first", count))
    main_out = [F.linear(a[:count], w) for count in main_first]
    with ThreadPoolExecutor(4) as pool:
        worker_out = list(pool.map(in_worker, main_first))
    for count, mine, theirs in zip(main_first, main_out, worker_out):
        if not torch.equal(mine.view(torch.int16), theirs.view(torch.int16)):
            differ.append(("main first", count))
    return {"counts": len(counts), "differ": differ}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("parallel_checks.py needs a CUDA device.")
        return 2
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "blas": str(torch.backends.cuda.preferred_blas_library()), "shapes": {}}
    generator = torch.Generator(device="cuda").manual_seed(0)
    result["allocated_mib_at_start"] = torch.cuda.memory_allocated() / 2**20
    for name, (out_features, in_features) in SHAPES.items():
        a = torch.randn(4096, in_features, device="cuda", dtype=torch.bfloat16, generator=generator)
        w = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16, generator=generator)
        F.linear(a[:4000], w)
        rows, start = [], 16
        for threads in (1, 2, 4, 8, 1, 8, 12):
            rows.append(wall_per_count(a, w, list(range(start, start + 192)), threads))
            start += 192
            print(name, rows[-1], flush=True)
        before = torch.cuda.memory_allocated() / 2**20
        released = release_blas_workspaces()
        rows.append({"workspaces_released": released, "released_mib": before - torch.cuda.memory_allocated() / 2**20})
        seen = wall_per_count(a, w, list(range(16, 16 + 192)), 1)
        seen["counts_seen_before"] = True
        rows.append(seen)
        result["shapes"][name] = {"timings": rows, "bits": thread_bits(a, w, list(range(start, 4000, 7)))}
        print(name, "bits", result["shapes"][name]["bits"], flush=True)
    write_json(args.out, "parallel_checks.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
