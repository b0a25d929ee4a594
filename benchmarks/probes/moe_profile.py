"""Where the time of a quantized MoE forward goes: torch.profiler over one forward of
benchmarks/ptq_gpu.py's "moe" shape after refquant's calibration (compiled backend), tables by
host time and by device time, the count of calls that wait for the device, and cProfile's
tables of the host's Python time over five forwards. With
--calibration, where the host time of rq.quantize_model goes instead: cProfile over the second of
two calibrations of the same pristine model (the first pays the compiles and one-time checks;
--first profiles that one instead), tables by own time and by cumulative time.

    python3 benchmarks/probes/moe_profile.py --out DIR [--recipe R] [--shape moe] [--folded] [--calibration [--first]]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ptq_gpu  # noqa: E402
import refquant as rq  # noqa: E402


def synchronizing_calls(model, batch) -> dict[str, int]:
    """{file:line (message): count} of the calls of one forward that synchronize with the device."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(input_ids=batch)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    counts: dict[str, int] = {}
    for warning in caught:
        key = f"{Path(warning.filename).name}:{warning.lineno} ({str(warning.message)[:60]})"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _tables(profiler, lines: int = 40) -> list[str]:
    """cProfile's tables by own time and by cumulative time."""
    import io
    import pstats

    tables = []
    for order in ("tottime", "cumulative"):
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats(order).print_stats(lines)
        tables.append(stream.getvalue())
    return tables


def python_profile(model, batch, device: torch.device, forwards: int) -> list[str]:
    """Where the host's Python time of `forwards` forwards goes (cProfile, the device synchronized
    at the end only, as in a timed forward)."""
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(forwards):
        model(input_ids=batch)
    ptq_gpu.synchronize(device)
    profiler.disable()
    return [f"cProfile of {forwards} forwards:"] + _tables(profiler)


def calibration_profile(args, device: torch.device) -> list[str]:
    """cProfile tables of the second rq.quantize_model of two (the first with args.first), each on
    a fresh copy of one model."""
    import copy
    import cProfile
    import time

    pristine = ptq_gpu.build_model(args.shape, 0, torch.device("cpu"))
    batches = ptq_gpu.batches_for(args.shape, 4, 4, 1024, 1)
    flavor = "modelopt-cuda" if device.type == "cuda" else "modelopt-cpu"
    recipe = rq.load_recipe(args.recipe)
    text = [f"{args.shape} {args.recipe} calibration on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"]
    profiled = "first" if args.first else "second"
    profiler = cProfile.Profile()
    for attempt in ("first", "second"):
        model = copy.deepcopy(pristine).to(device)
        ptq_gpu.synchronize(device)
        began = time.perf_counter()
        if attempt == profiled:
            profiler.enable()
        rq.quantize_model(model, recipe, batches, backend="compiled", flavor=flavor, progress=False)
        ptq_gpu.synchronize(device)
        if attempt == profiled:
            profiler.disable()
        text.append(f"{attempt} calibration: {time.perf_counter() - began:.3f} s{' (profiled)' if attempt == profiled else ''}")
        del model
    text += _tables(profiler, 45)
    if device.type == "cuda":
        text += _calibration_device_profile(pristine, recipe, batches, device, flavor)
    return text


def _calibration_device_profile(pristine, recipe, batches, device: torch.device, flavor: str) -> list[str]:
    """A third calibration's max calibration alone (timed, then under torch.profiler: its host
    and device time by operator), beside the plain model's forwards over the same batches."""
    import contextlib
    import copy
    import time

    plain = copy.deepcopy(pristine).to(device)
    with torch.no_grad():
        plain(input_ids=batches[0].to(device))
        ptq_gpu.synchronize(device)
        began = time.perf_counter()
        for batch in batches:
            plain(input_ids=batch.to(device))
        ptq_gpu.synchronize(device)
    text = [f"plain forwards over the batches: {time.perf_counter() - began:.4f} s"]
    del plain
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    for around in (contextlib.nullcontext, lambda: torch.profiler.profile(activities=activities)):
        model = copy.deepcopy(pristine).to(device)
        with ptq_gpu.timed_forward_loop(device, around) as seen:
            rq.quantize_model(model, recipe, batches, backend="compiled", flavor=flavor, progress=False)
        profiled = seen["around"] is not None
        text.append(f"max calibration{' under torch.profiler' if profiled else ''}: {seen['s']:.4f} s")
        del model
    averages = seen["around"].key_averages()
    text.append(averages.table(sort_by="self_cpu_time_total", row_limit=30))
    text.append(averages.table(sort_by="self_cuda_time_total", row_limit=20))
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--recipe", default="fp8_default-fp8_kv")
    parser.add_argument("--shape", default="moe")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--calibration", action="store_true", help="profile rq.quantize_model's host time instead")
    parser.add_argument("--first", action="store_true", help="with --calibration: profile the process's first calibration")
    parser.add_argument("--forwards", type=int, default=8, help="timed forwards before the profiled one")
    parser.add_argument("--folded", action="store_true", help="profile the forward after rq.fold_weights")
    args = parser.parse_args()
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.calibration:
        text = calibration_profile(args, device)
        (out / f"moe_calibration_profile_{args.recipe}{'_first' if args.first else ''}.txt").write_text("\n".join(text))
        print("\n".join(text[:3]))
        return 0
    model = ptq_gpu.build_model(args.shape, 0, device)
    batches = ptq_gpu.batches_for(args.shape, 4, 4, 1024, 1)
    flavor = "modelopt-cuda" if device.type == "cuda" else "modelopt-cpu"
    rq.quantize_model(model, rq.load_recipe(args.recipe), batches, backend="compiled", flavor=flavor, progress=False)
    if args.folded:
        rq.fold_weights(model)
    batch = batches[0].to(device)
    with torch.no_grad():
        times = []  # every forward before the profiled one, in order: a drift shows here
        for _ in range(args.forwards):
            ptq_gpu.synchronize(device)
            began = time.perf_counter()
            model(input_ids=batch)
            ptq_gpu.synchronize(device)
            times.append(round((time.perf_counter() - began) * 1e3, 1))
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as profile:
            model(input_ids=batch)
            ptq_gpu.synchronize(device)
        syncs = synchronizing_calls(model, batch) if device.type == "cuda" else {}
        python_tables = python_profile(model, batch, device, forwards=5)
    averages = profile.key_averages()
    text = [f"{args.shape} {args.recipe}{' folded' if args.folded else ''} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}",
            f"forwards before the profiled one, ms: {times}"]
    text.append(averages.table(sort_by="self_cpu_time_total", row_limit=30))
    if device.type == "cuda":
        text.append(averages.table(sort_by="self_cuda_time_total", row_limit=20))
    waits = {e.key: e.count for e in averages if any(w in e.key for w in ("Synchronize", "_local_scalar_dense", "aten::item", "nonzero"))}
    text.append(f"calls that wait for the device: {waits}")
    text.append("synchronizing calls by where (torch.cuda.set_sync_debug_mode): "
                + "; ".join(f"{count} x {where}" for where, count in sorted(syncs.items(), key=lambda kv: -kv[1])))
    text.extend(python_tables)
    (out / f"moe_profile_{args.recipe}{'_folded' if args.folded else ''}.txt").write_text("\n".join(text))
    print("\n".join(text[-1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
