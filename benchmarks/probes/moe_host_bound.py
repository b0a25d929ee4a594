"""Whether the MoE shape's quantized forward is host-bound, and why: benchmarks/ptq_gpu.py's "moe"
shape calibrated once a recipe (compiled backend, 4 batches) and its forward timed on the
evaluation batch, on a calibration batch, then on the evaluation batch again. For each: the
forward's time (CUDA events), the host's issue time and the part of it spent waiting in the
experts loop's one sync a layer (the routing's counts read back), the CPU time of the process's
other threads, the device's busy time (the kernels' times summed by torch.profiler over one
forward), and for the last timed forward the bound launches that missed their key, the direct
launches that took Triton's public path and the expert weight bindings made (all three are 0 once
warm). The plain model's forward first.

Each forward also counts Python's cyclic garbage collections during it and the time they took
(gc.callbacks): a process holding many objects (another library's model, calibrated before)
makes each collection longer. --gc-freeze times the evaluation batch once more after gc.freeze().

A forward whose device busy time is the plain one's and whose host time is near its own time is
set by the host: its ratio to plain follows the host's speed. --modelopt-first runs modelopt's
calibration and two forwards on a copy of the model before each recipe's refquant run, in the same
process (as benchmarks/ptq_gpu.py does), and records the global state that differs afterwards.

--pairs N times, right after the calibration and before anything else, N pairs of forwards of a
plain copy of the model and the quantized one in turn, from the first: whether a slow stretch of
forwards (after modelopt's run, say) slows the plain forward too (the host) or only the quantized
one. Every timed forward also records this thread's page faults and context switches
(getrusage), the CUDA caching allocator's new device allocations, and the host time inside the
experts loop and inside quantizer calls outside it.

    python3 benchmarks/probes/moe_host_bound.py --out DIR [--recipes R ...] [--modelopt-first] [--gc-freeze]
        [--pairs N]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import gc
import json
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ptq_gpu  # noqa: E402
import refquant as rq  # noqa: E402
from refquant.compiled import triton_launch  # noqa: E402
from refquant.hf import experts as experts_module  # noqa: E402
from refquant.hf import experts_loop  # noqa: E402
from refquant.quant import quantizer  # noqa: E402
from probe_output import write_json  # noqa: E402


class Watch:
    """Counts and the sync's wait, for the forward in progress (reset before each)."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self._in_loop = False
        self._gc_began: float | None = None
        self.reset()

    def reset(self) -> None:
        self.counts.clear()
        self.wait_s = 0.0
        self.gc_s = 0.0
        self.loop_s = 0.0  # host time inside the experts loop
        self.quantizer_s = 0.0  # host time inside quantizer calls made outside the experts loop

    def on_gc(self, phase: str, info: dict) -> None:
        """gc.callbacks' hook: each collection's time and generation."""
        if phase == "start":
            self._gc_began = time.perf_counter()
        elif self._gc_began is not None:
            self.gc_s += time.perf_counter() - self._gc_began
            self.counts[f"gc_generation_{info['generation']}"] += 1
            self._gc_began = None


@contextlib.contextmanager
def watching(watch: Watch):
    """The experts loop's sync, the loop itself and quantizer calls outside it timed; bound-launch
    misses, public launches, bindings and garbage collections counted."""
    gc.callbacks.append(watch.on_gc)
    read, launch_bound = experts_loop._Routing.read, triton_launch.FakeQuantKernel.launch_bound
    launch_public, made = triton_launch.DirectLaunch.launch_public, quantizer._KeptBinding.made.__func__
    loop, quantizer_forward = experts_module.loop_forward, quantizer.TensorQuantizer.forward

    def timed_loop(*args, **kwargs):
        began, watch._in_loop = time.perf_counter(), True
        try:
            return loop(*args, **kwargs)
        finally:
            watch._in_loop = False
            watch.loop_s += time.perf_counter() - began

    def timed_quantizer(self, x):
        if watch._in_loop:
            return quantizer_forward(self, x)
        began = time.perf_counter()
        try:
            return quantizer_forward(self, x)
        finally:
            watch.quantizer_s += time.perf_counter() - began

    def timed_read(self):
        began = time.perf_counter()
        try:
            return read(self)
        finally:
            watch.wait_s += time.perf_counter() - began

    def counted_launch_bound(self, x, params, device, kept):
        if kept.get(self.arguments(x, params)[2]) is None:
            watch.counts["bound launch missed: " + self.launch.name] += 1
        return launch_bound(self, x, params, device, kept)

    def counted_public(self, programs, device, args):
        watch.counts["public launch: " + self.name] += 1
        return launch_public(self, programs, device, args)

    def counted_made(cls, *args, **kwargs):
        watch.counts["expert weights bound"] += 1
        return made(cls, *args, **kwargs)

    experts_loop._Routing.read = timed_read
    triton_launch.FakeQuantKernel.launch_bound = counted_launch_bound
    triton_launch.DirectLaunch.launch_public = counted_public
    quantizer._KeptBinding.made = classmethod(counted_made)
    experts_module.loop_forward, quantizer.TensorQuantizer.forward = timed_loop, timed_quantizer
    try:
        yield
    finally:
        experts_module.loop_forward, quantizer.TensorQuantizer.forward = loop, quantizer_forward
        gc.callbacks.remove(watch.on_gc)
        experts_loop._Routing.read, triton_launch.FakeQuantKernel.launch_bound = read, launch_bound
        triton_launch.DirectLaunch.launch_public = launch_public
        quantizer._KeptBinding.made = classmethod(made)


def device_busy_ms(model, batch) -> float:
    """The kernels' device time of one forward, summed."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(input_ids=batch)
        torch.cuda.synchronize()
    return sum(event.device_time for event in prof.events() if event.device_type.name == "CUDA") / 1e3


def device_allocations() -> int:
    """How many device allocations (cudaMalloc) the CUDA caching allocator has made so far."""
    return torch.cuda.memory_stats().get("segment.all.allocated", 0)


def one_forward(model, batch, watch: Watch) -> dict:
    """One forward, synchronized before and after: its time (CUDA events), the host's issue time
    and this thread's CPU time in it, the experts loop's sync wait, GC time, other threads' CPU
    time, this thread's page faults and context switches, new device allocations, the host time
    in the experts loop and in quantizer calls outside it, and the watched counts."""
    torch.cuda.synchronize()
    watch.reset()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    usage, allocations = resource.getrusage(resource.RUSAGE_THREAD), device_allocations()
    start.record()
    began, process_cpu, thread_cpu = time.perf_counter(), time.process_time(), time.thread_time()
    model(input_ids=batch)
    host, issued_cpu = time.perf_counter() - began, time.thread_time() - thread_cpu
    others = (time.process_time() - process_cpu) - issued_cpu
    end.record()
    end.synchronize()
    after = resource.getrusage(resource.RUSAGE_THREAD)
    return dict(ms=start.elapsed_time(end), host_ms=host * 1e3, host_cpu_ms=issued_cpu * 1e3, wait_ms=watch.wait_s * 1e3,
                gc_ms=watch.gc_s * 1e3, other_threads_cpu_ms=others * 1e3, loop_ms=watch.loop_s * 1e3,
                quantizer_ms=watch.quantizer_s * 1e3, minor_faults=after.ru_minflt - usage.ru_minflt,
                switches=(after.ru_nvcsw - usage.ru_nvcsw) + (after.ru_nivcsw - usage.ru_nivcsw),
                device_allocations=device_allocations() - allocations, counts=dict(watch.counts))


EACH = ("ms", "host_ms", "host_cpu_ms", "loop_ms", "quantizer_ms", "minor_faults", "switches", "device_allocations")


def timed(model, batch, watch: Watch, repeats: int) -> dict:
    """Medians over `repeats` forwards after two warm-ups, each forward's time, the last one's counts."""
    forwards = []
    with torch.no_grad():
        for step in range(repeats + 2):
            forward = one_forward(model, batch, watch)
            if step >= 2:
                forwards.append(forward)
    row = {name: statistics.median(f[name] for f in forwards)
           for name in ("ms", "host_ms", "wait_ms", "gc_ms", "other_threads_cpu_ms", "loop_ms", "quantizer_ms")}
    row["gc_ms_each"] = [round(f["gc_ms"], 2) for f in forwards]
    row["each"] = {name: [round(f[name], 2) for f in forwards] for name in EACH}
    row["gc_tracked_objects"] = len(gc.get_objects())
    row.update(each_ms=[round(f["ms"], 2) for f in forwards], counts_first=forwards[0]["counts"],
               counts_last=forwards[-1]["counts"], python_threads=threading.active_count(),
               device_busy_ms=device_busy_ms(model, batch))
    return row


def pairs(plain, model, batch, watch: Watch, count: int) -> dict:
    """`count` pairs of forwards, plain then quantized, from the first (no warm-up): each
    forward's one_forward record, in order."""
    records: dict = {"plain": [], "quantized": []}
    with torch.no_grad():
        for _ in range(count):
            for name, which in (("plain", plain), ("quantized", model)):
                records[name].append(one_forward(which, batch, watch))
    return {name: {field: [round(r[field], 2) for r in each] for field in EACH} for name, each in records.items()}


def global_state() -> dict:
    """What a library could leave changed for the rest of the process."""
    import torch.utils._python_dispatch as dispatch

    return dict(trace=repr(sys.gettrace()), profile=repr(sys.getprofile()), grad=torch.is_grad_enabled(),
                dispatch_modes=repr(dispatch._get_current_dispatch_mode_stack()),
                function_modes=repr(torch.overrides._get_current_function_mode_stack()),
                tf32=torch.backends.cuda.matmul.allow_tf32, cudnn=torch.backends.cudnn.enabled,
                deterministic=torch.are_deterministic_algorithms_enabled(), torch_threads=torch.get_num_threads(),
                python_threads=[t.name for t in threading.enumerate()], switch_interval=sys.getswitchinterval(),
                gc_enabled=gc.isenabled(), gc_threshold=gc.get_threshold(), sync_debug=torch.cuda.get_sync_debug_mode(),
                module_hooks=(len(torch.nn.modules.module._global_forward_hooks),
                              len(torch.nn.modules.module._global_forward_pre_hooks)))


def run_modelopt(pristine, recipe: str, batches, batch, device) -> None:
    from compare_modelopt import modelopt_quant_cfg

    model = copy.deepcopy(pristine).to(device)
    ptq_gpu.quantize_with_modelopt(model, modelopt_quant_cfg(recipe), batches, device)
    with torch.no_grad():
        model(input_ids=batch)
        model(input_ids=batch)
    torch.cuda.synchronize()
    del model
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--recipes", nargs="+", default=["nvfp4_default-fp8_cast_kv", "fp8_default-fp8_kv"])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--modelopt-first", action="store_true")
    parser.add_argument("--gc-freeze", action="store_true")
    parser.add_argument("--pairs", type=int, default=0, help="plain / quantized pairs timed first, from the first")
    args = parser.parse_args()
    device = torch.device("cuda")
    batches = ptq_gpu.batches_for("moe", 4, 4, 1024, 1)
    eval_batch = ptq_gpu.batches_for("moe", 1, 4, 1024, 3)[0].to(device)  # ptq_gpu's evaluation batch
    pristine = ptq_gpu.build_model("moe", 0, torch.device("cpu"))
    watch = Watch()
    rows: dict = {"device": torch.cuda.get_device_name(), "modelopt_first": args.modelopt_first}
    with watching(watch):
        model = copy.deepcopy(pristine).to(device)
        rows["plain"] = timed(model, eval_batch, watch, args.repeats)
        print("plain", rows["plain"], flush=True)
        del model
        for recipe in args.recipes:
            row: dict = {}
            if args.modelopt_first:
                before = global_state()
                run_modelopt(pristine, recipe, batches, eval_batch, device)
                after = global_state()
                row["state_changed_by_modelopt"] = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
            model = copy.deepcopy(pristine).to(device)
            rq.quantize_model(model, rq.load_recipe(recipe), batches, backend="compiled", flavor="modelopt-cuda", progress=False)
            if args.pairs:
                plain = copy.deepcopy(pristine).to(device)
                row["pairs"] = pairs(plain, model, eval_batch, watch, args.pairs)
                print(recipe, "pairs", json.dumps(row["pairs"]), flush=True)
                del plain
            for name, batch in (("eval", eval_batch), ("calibration_batch", batches[0].to(device)), ("eval_again", eval_batch)):
                row[name] = timed(model, batch, watch, args.repeats)
                print(recipe, name, row[name], flush=True)
            if args.gc_freeze:
                gc.collect()
                gc.freeze()
                row["eval_gc_frozen"] = timed(model, eval_batch, watch, args.repeats)
                gc.unfreeze()
                print(recipe, "eval_gc_frozen", row["eval_gc_frozen"], flush=True)
            rows[recipe] = row
            del model
            torch.cuda.empty_cache()
    write_json(args.out, f"moe_host_bound{'_modelopt_first' if args.modelopt_first else ''}.json", rows)


if __name__ == "__main__":
    main()
