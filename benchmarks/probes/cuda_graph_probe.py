"""Would a CUDA graph of the quantized forward take the host out of the 0.6B forward, and what would
it cost in memory? A probe (a report, no asserts; CUDA only); what it found is in docs/compiled.md,
"Tried and rejected".

    python3 benchmarks/probes/cuda_graph_probe.py --out DIR [--shape small] [--repeats 20]
        [--recipes fp8_default-fp8_kv nvfp4_default-fp8_cast_kv]

Why: the 0.6B forward is host-bound, and a host's speed may change by up to 2x from one process
(or minute) to the next, plain forwards included (benchmarks/README.md, "Reading the timings"). A replayed CUDA graph issues the whole forward with one call, so its time is the GPU's.
For plain bf16 and each recipe (compiled backend, 8 calibration batches), on a fresh ptq_gpu.py
model:
    eager      ptq_gpu's timed_forward_ms of model(input_ids=batch) (use_cache off, as captured)
    graph      one forward captured with torch.cuda.graph on a side stream (warmed up there
               first), then replays of it timed the same way (CUDA events; the input copied into
               the captured input tensor first, as a user of the graph would)
    same bits  the replay's logits against the eager forward's, bit for bit; so are those of the
               eager warm-up forward on the side stream (is it the stream or the capture?)
    memory     torch.cuda.memory_allocated before the side stream's warm-up, after it (a cuBLAS
               workspace for a new stream shows here), after capture (the graph's pool), and
               max_memory_allocated over warm-up and capture
Writes DIR/cuda_graph_probe.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: refquant, scripts/
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: ptq_gpu, gpu_report
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other probes

import refquant as rq  # noqa: E402
from ptq_gpu import batches_for, build_model  # noqa: E402

MIB = 2**20


def timed_ms(run: Callable[[], object], repeats: int) -> dict:
    """Median time (CUDA events) and median host time (until run() returns) of `repeats` calls
    of run() after two warm-ups, each call alone on a synchronized device."""
    times, host = [], []
    for step in range(repeats + 2):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        began = time.perf_counter()
        run()
        issued = (time.perf_counter() - began) * 1e3
        end.record()
        end.synchronize()
        if step >= 2:
            times.append(start.elapsed_time(end))
            host.append(issued)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "host_ms": statistics.median(host)}


def eager_forward_ms(model, batch: torch.Tensor, repeats: int) -> dict:
    """timed_ms of model(input_ids=batch, use_cache=False)."""
    with torch.no_grad():
        return timed_ms(lambda: model(input_ids=batch, use_cache=False), repeats)


def graph_forward(model, batch: torch.Tensor, repeats: int) -> dict:
    """Capture one forward in a CUDA graph and time its replays; memory at each step."""
    static_input = batch.clone()
    torch.cuda.synchronize()
    result: dict = {"allocated_before_mib": torch.cuda.memory_allocated() / MIB}
    torch.cuda.reset_peak_memory_stats()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        with torch.cuda.stream(stream):
            warm = model(input_ids=static_input, use_cache=False).logits  # the side stream's first work
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        result["_side_stream_logits"] = warm.clone()
        del warm
        result["allocated_after_warmup_mib"] = torch.cuda.memory_allocated() / MIB
        with torch.cuda.graph(graph, stream=stream):
            captured = model(input_ids=static_input, use_cache=False).logits
    torch.cuda.synchronize()
    result["allocated_after_capture_mib"] = torch.cuda.memory_allocated() / MIB
    result["peak_over_warmup_and_capture_mib"] = torch.cuda.max_memory_allocated() / MIB

    def replay() -> None:
        static_input.copy_(batch)  # as a user of the graph gives it a new input
        graph.replay()

    result |= timed_ms(replay, repeats)
    result["_logits"] = captured.clone()
    del captured
    graph.reset()  # the graph and its pool go (replay() still names the object)
    torch.cuda.synchronize()
    result["allocated_after_release_mib"] = torch.cuda.memory_allocated() / MIB
    return result


def probe(entry: str, shape: str, batch: torch.Tensor, calibration: list[torch.Tensor], repeats: int) -> dict:
    device = batch.device
    model = build_model(shape, 0, device)
    if entry != "plain":
        rq.quantize_model(model, rq.load_recipe(entry), calibration, backend="compiled", flavor="modelopt-cuda", progress=False)
    row: dict = {"entry": entry, "eager": eager_forward_ms(model, batch, repeats)}
    with torch.no_grad():
        eager_logits = model(input_ids=batch, use_cache=False).logits.clone()
    try:
        graphed = graph_forward(model, batch, repeats)
    except Exception as error:  # noqa: BLE001 - a capture that fails is a finding
        import traceback

        row["graph_error"] = f"{type(error).__name__}: {str(error)[:300]}"
        row["graph_error_where"] = traceback.format_exc()[-2500:]
    else:
        bits = lambda t: t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)  # noqa: E731
        row["graph"] = graphed
        row["logits"] = eager_logits.numel()
        row["logits_differing"] = int((bits(graphed.pop("_logits")) != bits(eager_logits)).sum())
        # the same eager forward on the capture's side stream: does the stream alone change the bits?
        row["side_stream_logits_differing"] = int((bits(graphed.pop("_side_stream_logits")) != bits(eager_logits)).sum())
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--shape", default="small")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--recipes", nargs="*", default=["fp8_default-fp8_kv", "nvfp4_default-fp8_cast_kv"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_graph_probe.py needs a CUDA device (it captures CUDA graphs).", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    batch = batches_for(args.shape, 1, 4, 1024, 0)[0].to(device)
    calibration = [b.to(device) for b in batches_for(args.shape, 8, 4, 1024, 0)]
    rows = [probe(entry, args.shape, batch, calibration, args.repeats) for entry in ["plain", *args.recipes]]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        document = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "shape": args.shape, "rows": rows}
        (args.out / "cuda_graph_probe.json").write_text(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
