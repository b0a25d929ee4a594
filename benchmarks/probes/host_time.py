"""Host time of one compiled quantizer call, step by step (where a host-bound PTQ forward goes).

On a small tensor the GPU finishes each kernel before the host issues the next call, so the wall
time of many back-to-back calls is their host time. Measured per call (median of rounds):

    eager launch          x.mul(2): one eager kernel launch, the floor
    quantizer             TensorQuantizer(backend="compiled")(x), as the PTQ forward calls it
    public function       refquant.compiled.<fn>(x, amax)
    through dynamo        the compiled graph the public function calls, through torch.compile

On CUDA (bf16 and fp16), a calibrated quantizer's call is one launch of a Triton kernel of ours
(BoundKernelLaunch, DirectLaunch); its steps, outermost first:

    quantizer, shared     a quantizer with a SharedInputResult, given one of two tensors in turn
                          (every call misses, as the first of q/k/v's input quantizers does)
    quantizer.forward     the same without nn.Module.__call__
    bound call            the BoundKernelLaunch alone: its checks of x, empty_like for the output,
                          the look-up of the compiled kernel, launch_compiled
    bound checks          BoundKernelLaunch.takes(x) alone
    arguments             FakeQuantKernel.arguments: empty_like, the arguments and the bound key
    launch_compiled       DirectLaunch.launch_compiled: the device check, the stream, Triton's launcher
    Triton launcher       the compiled kernel's run(): Triton's Python launcher and its C launch
    empty_like            the output's allocation alone
    DirectLaunch.launch   a launch through DirectLaunch's own look-up (what a bound call's first
                          launch of a count costs, and every launch of the *_now functions)
    key                   DirectLaunch.key_of: what that look-up keys by

    python3 benchmarks/probes/host_time.py [--out DIR] [--device cuda] [--rows 64] [--cols 2048]
                                    [--profile-recipe R [--shape small]]

Prints a table and writes DIR/host_time.json. With --profile-recipe, also quantizes ptq_gpu.py's
model of --shape with recipe R (compiled backend, one calibration batch of 4 x 1024 tokens) and
profiles one forward on the host (cProfile): the functions that take the most time, and how many
quantizer calls made the ordinary (compiled) call rather than a bound one. A report: nothing is
asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: refquant, scripts/
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: ptq_gpu, gpu_report
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other probes

import refquant.compiled as rc  # noqa: E402
from refquant.compiled import functions  # noqa: E402
from refquant.quant.quantizer import QuantizerConfig, TensorQuantizer  # noqa: E402


def per_call_us(step, device: torch.device, calls: int = 400, rounds: int = 7) -> float:
    """Median over rounds of (wall time of `calls` calls, GPU drained after) / calls, in us."""
    for _ in range(20):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples = []
    for _ in range(rounds):
        began = time.perf_counter()
        for _ in range(calls):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - began) / calls * 1e6)
    return statistics.median(samples)


def steps_of(name: str, x: torch.Tensor, amax: torch.Tensor, flavor: str) -> dict:
    """The call of refquant.compiled.<name> cut into its steps, each a zero-argument callable: the
    public function, and the compiled graph it calls through dynamo (for NVFP4 on CUDA, the one
    around the Triton block step)."""
    if name == "fp8_fake_quant":
        compiled = functions._compiled_fp8_fake_quant
    else:
        compiled = functions._nvfp4_fake_quant_graph(x)
    public = getattr(rc, name)
    kwargs = {"axis": None, "flavor": flavor} if name == "fp8_fake_quant" else {}
    public(x, amax, **({"flavor": flavor} if name == "fp8_fake_quant" else {}))
    rows = functions._rows(x)
    entry = compiled.for_call((rows, amax), kwargs)
    entry(rows, amax, **kwargs)
    return {
        "public function": lambda: public(x, amax, **({"flavor": flavor} if name == "fp8_fake_quant" else {})),
        "through dynamo": lambda: entry(rows, amax, **kwargs),
    }


def bound_launch_steps(fmt: str, x: torch.Tensor, amax: torch.Tensor, flavor: str) -> dict:
    """The call of a calibrated quantizer whose bound call is a kernel launch, cut into the steps
    the module docstring lists, each a zero-argument callable; {} where x does not bind one."""
    from refquant.quant.quantizer import SharedInputResult

    quantizer = TensorQuantizer(QuantizerConfig(format=fmt), backend="compiled", flavor=flavor)
    quantizer.set_amax(amax)
    quantizer(x)
    bound = quantizer._bound[0] if quantizer._bound else None
    if not isinstance(bound, functions.BoundKernelLaunch):
        return {}
    shared = TensorQuantizer(QuantizerConfig(format=fmt), backend="compiled", flavor=flavor)
    shared.set_amax(amax)
    shared.shared_input_result = SharedInputResult()
    pair, turn = [x, x.clone()], [0]

    def shared_call():
        turn[0] ^= 1
        return shared(pair[turn[0]])

    out = bound(x)
    if fmt == "fp8":
        from refquant.compiled import fp8_fake_triton

        kernel = fp8_fake_triton.fake_quant_kernel(flavor)
    else:
        from refquant.compiled import nvfp4_fake_triton

        kernel = nvfp4_fake_triton.fake_quant_kernel()
    count = x.numel() // kernel.unit
    launch_args = (x, *bound._params, out, count)
    launch, programs = kernel.launch, -(-count // kernel.per_program)
    compiled = launch._compiled[launch.key_of(launch_args)]
    device = x.get_device()
    stream = torch.cuda.current_stream(x.device).cuda_stream

    def run_compiled():
        compiled.run(programs, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *launch_args, *launch._constant_values)

    return {
        "quantizer": lambda: quantizer(x),
        "quantizer, shared": shared_call,
        "quantizer.forward": lambda: quantizer.forward(x),
        "bound call": lambda: bound(x),
        "bound checks": lambda: bound.takes(x),
        "arguments": lambda: kernel.arguments(x, bound._params),
        "launch_compiled": lambda: launch.launch_compiled(compiled, programs, device, launch_args),
        "DirectLaunch.launch": lambda: launch.launch(programs, launch_args),
        "key": lambda: launch.key_of(launch_args),
        "Triton launcher": run_compiled,
        "empty_like": lambda: torch.empty_like(x),
    }


# Functions whose call counts in a steady forward say whether quantizers took their bound call:
# a quantizer whose bound call is refused makes the ordinary call (_run) and binds again (_bind).
# A bound launch calls DirectLaunch.launch_compiled; DirectLaunch.launch is a first launch (or one
# under a launch hook).
WATCHED = ("_bind", "bind_fake_quant", "_run", "fp8_fake_quant", "nvfp4_fake_quant", "launch", "launch_compiled")


def forward_profile(model, batch: torch.Tensor, top: int = 30) -> dict:
    """cProfile of one forward of `model` (after three unprofiled ones): host ms under the
    profiler, calls of the WATCHED functions (each _run is a compiled call through dynamo), and
    the `top` functions by their own time."""
    import cProfile
    import io
    import pstats

    with torch.no_grad():
        for _ in range(3):
            model(input_ids=batch)
        profiler = cProfile.Profile()
        began = time.perf_counter()
        profiler.enable()
        model(input_ids=batch)
        profiler.disable()
        host_ms = (time.perf_counter() - began) * 1e3
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    watched = {name: 0 for name in WATCHED}
    for (_, _, name), (_, calls, *_rest) in stats.stats.items():
        if name in watched:
            watched[name] += calls
    stats.sort_stats("tottime").print_stats(top)
    return {"host_ms_profiled": host_ms, "watched_calls": watched, "top": text.getvalue()}


def profile_forward(recipe: str, shape: str, device: torch.device) -> dict:
    """forward_profile of a fresh quantized model; prints the top functions."""
    import refquant as rq
    from ptq_gpu import batches_for, build_model

    model = build_model(shape, 0, device)
    batch = batches_for(shape, 1, 4, 1024, 0)[0].to(device)
    flavor = "modelopt-cuda" if device.type == "cuda" else "modelopt-cpu"
    rq.quantize_model(model, rq.load_recipe(recipe), [batch], backend="compiled", flavor=flavor, progress=False)
    profile = forward_profile(model, batch)
    print(f"profile of one {shape} forward, {recipe}: {profile['host_ms_profiled']:.1f} ms on the host under cProfile; "
          f"calls {profile['watched_calls']}")
    print(profile["top"])
    return {"recipe": recipe, "shape": shape, **profile}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--profile-recipe", default=None)
    parser.add_argument("--shape", default="small")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    flavor = "modelopt-cuda" if device.type == "cuda" else "modelopt-cpu"
    x = torch.randn(args.rows, args.cols, device=device, dtype=torch.bfloat16)
    amax = x.abs().amax().float()
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
               "shape": [args.rows, args.cols], "eager launch": per_call_us(lambda: x.mul(2), device), "functions": {}}
    for name, fmt in (("fp8_fake_quant", "fp8"), ("nvfp4_fake_quant", "nvfp4")):
        quantizer = TensorQuantizer(QuantizerConfig(format=fmt), backend="compiled", flavor=flavor)
        quantizer.set_amax(amax)
        steps = steps_of(name, x, amax, flavor)
        row = {"quantizer": per_call_us(lambda: quantizer(x), device)}
        row.update({step: per_call_us(call, device) for step, call in steps.items()})
        results["functions"][name] = row
    print(f"{results['device']}, torch {results['torch']}, x {args.rows} x {args.cols} bf16; host us per call "
          f"(eager launch {results['eager launch']:.1f})")
    columns = ["quantizer", "public function", "through dynamo"]
    print("| function | " + " | ".join(columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for name, row in results["functions"].items():
        cells = [f"{row[c]:.1f}" if c in row else "-" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")
    launch_columns = ["quantizer", "quantizer, shared", "quantizer.forward", "bound call", "bound checks",
                      "arguments", "launch_compiled", "Triton launcher", "empty_like", "DirectLaunch.launch", "key"]
    for fmt in ("fp8", "nvfp4"):
        steps = bound_launch_steps(fmt, x, amax, flavor) if device.type == "cuda" else {}
        if steps:
            results[f"{fmt} bound launch"] = {step: per_call_us(call, device) for step, call in steps.items()}
    if any(f"{fmt} bound launch" in results for fmt in ("fp8", "nvfp4")):
        print("\nA calibrated quantizer's call as one kernel launch, step by step (host us per call):")
        print("| format | " + " | ".join(launch_columns) + " |")
        print("| --- |" + " --- |" * len(launch_columns))
        for fmt in ("fp8", "nvfp4"):
            row = results.get(f"{fmt} bound launch", {})
            print(f"| {fmt} | " + " | ".join(f"{row[c]:.1f}" if c in row else "-" for c in launch_columns) + " |")
    if args.profile_recipe:
        results["profile"] = profile_forward(args.profile_recipe, args.shape, device)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_time.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
