"""GPU report for refquant.compiled: parity with the reference, then bandwidth ratios.

    python benchmarks/gpu_report.py --out DIR [--shapes main,small,skinny] [--no-modelopt-fp8]

1. Parity: every compiled function against the eager reference on the same device and on the
   CPU, on random bf16 / fp16 / fp32 tensors, odd leading shapes and a non-contiguous view;
   counted as elements whose bits differ (NaN == NaN). Then the division finding: the same
   functions compiled under inductor's default options and under each of our options alone.
2. Timing (triton.testing.do_bench, median ms): each operation of the kernel table (FP8 fake quant,
   NVFP4 fake and real quant, amax given or computed), the eager reference, the compiled one and modelopt's / torchao's own kernels when importable, and a
   plain device copy of the same tensor in the same run. Ratio = copy ms / op ms (both move 4
   bytes an element); for the real quant, the bytes it must move (2 + 0.5 + 1/16 an element)
   over its time, divided by the copy's bandwidth. Two times per row: end to end (do_bench, the
   call's host work included where the GPU waits for it) and device-only (the kernels' own time
   from torch.profiler), each over the copy timed the same way.
3. Host microseconds per call on a tiny tensor, compiled and eager.
Writes DIR/gpu_report.json and DIR/inductor_code.txt (the Triton code of the timed graphs) and
prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import refquant  # noqa: E402
from refquant.numerics.checks import FLAVORS  # noqa: E402
import refquant.compiled as compiled  # noqa: E402
from refquant.compiled.options import division_rounding_option  # noqa: E402
from refquant.testing import bits_of  # noqa: E402

SHAPES = {"main": (8192, 16384), "small": (1024, 2048), "skinny": (32, 65536), "tiny": (64, 256)}  # tiny: a CPU check
REAL_QUANT_BYTES_PER_ELEMENT = 2 + 0.5 + 1 / 16
COPY_BYTES_PER_ELEMENT = 4


def differing(actual, expected) -> int:
    """Elements whose bits differ (NaN == NaN), for tensors or FP8Tensor / NVFP4Tensor pairs."""
    if isinstance(expected, refquant.NVFP4Tensor):
        return sum(
            differing(a, e)
            for a, e in [
                (actual.packed, expected.packed),
                (actual.block_scale, expected.block_scale),
                (actual.global_scale, expected.global_scale),
            ]
        )
    if isinstance(expected, refquant.FP8Tensor):
        return differing(actual.data, expected.data) + differing(actual.scale, expected.scale)
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return -1
    differ = bits_of(actual) != bits_of(expected)
    if actual.is_floating_point():
        differ &= ~(torch.isnan(actual.float()) & torch.isnan(expected.float()))
    return int(differ.sum())


def parity_cases(device: str, main: tuple[int, int]):
    """(name, function name, args, kwargs): inputs that cover dtypes, shapes and layouts."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16, scale=3.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    big = randn(*main)
    cases = []
    inputs = [
        ("bf16_main", big),
        ("fp16_1024x4096", randn(1024, 4096, dtype=torch.float16)),
        ("fp32_1024x4096", randn(1024, 4096, dtype=torch.float32)),
        ("bf16_odd_3x7x40", randn(3, 7, 40)),
        ("bf16_transposed_4096x1024", randn(1024, 4096).t()),
    ]
    for name, x in inputs:
        amax = x.float().abs().amax() * 0.75  # some values clip
        for flavor in FLAVORS if name == "bf16_main" else FLAVORS[:1]:
            cases.append((f"{name}_{flavor}_amax_given", "fp8_fake_quant", (x, amax), {"flavor": flavor}))
            cases.append((f"{name}_{flavor}_amax_computed", "fp8_fake_quant", (x,), {"flavor": flavor}))
            cases.append((f"{name}_{flavor}_axis0", "fp8_fake_quant", (x,), {"axis": 0, "flavor": flavor}))
            cases.append((f"{name}_{flavor}_per_tensor", "fp8_quantize", (x,), {"flavor": flavor}))
            if x.shape[-1] % 16 == 0:
                cases.append((f"{name}_{flavor}_block16", "fp8_quantize", (x,), {"block_size": 16, "flavor": flavor}))
            cases.append((f"{name}_{flavor}_amax_given", "nvfp4_quantize", (x, amax), {"flavor": flavor}))
            cases.append((f"{name}_{flavor}_amax_computed", "nvfp4_quantize", (x,), {"flavor": flavor}))
        cases.append((f"{name}_amax_given", "nvfp4_fake_quant", (x, amax), {}))
        cases.append((f"{name}_amax_computed", "nvfp4_fake_quant", (x,), {}))
    return cases


def run_parity(device: str, main, options_variants: bool) -> dict:
    results = {}
    for name, fn_name, args, kwargs in parity_cases(device, main):
        ours = getattr(compiled, fn_name)(*args, **kwargs)
        eager = getattr(refquant, fn_name)(*args, **kwargs)
        row = {"vs_eager_same_device": differing(ours, eager)}
        if hasattr(eager, "dequantize"):
            row["dequantize_vs_eager"] = differing(ours.dequantize(), eager.dequantize())
        if args[0].numel() <= 4096 * 1024 * 4:
            cpu_args = tuple(a.cpu() for a in args)
            row["vs_eager_cpu"] = differing(ours, getattr(refquant, fn_name)(*cpu_args, **kwargs))
        results[f"{fn_name}:{name}"] = row
    if options_variants:
        results["division_finding"] = division_finding(device, main)
    return results


def division_finding(device: str, main) -> dict:
    """The reference functions compiled under other inductor options: differing elements."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(*main, generator=gen) * 3).to(torch.bfloat16).to(device)
    amax = x.float().abs().amax() * 0.75
    division = division_rounding_option()
    variants = {
        "inductor defaults": {},
        "division rounding only": {division: True},
        "precision casts only": {"emulate_precision_casts": True},
        "both (ours)": {division: True, "emulate_precision_casts": True},
    }
    calls = {
        "fp8_fake_quant modelopt-cpu": (refquant.fp8_fake_quant, (x, amax), {}),
        "fp8_fake_quant modelopt-cuda": (refquant.fp8_fake_quant, (x, amax), {"flavor": "modelopt-cuda"}),
        "fp8_quantize block16": (refquant.fp8_quantize, (x,), {"block_size": 16}),
        "nvfp4_fake_quant amax given": (refquant.nvfp4_fake_quant, (x, amax), {}),
        "nvfp4_quantize amax given": (refquant.nvfp4_quantize, (x, amax), {}),
    }
    out = {}
    for variant, options in variants.items():
        torch._dynamo.reset()
        for call, (fn, args, kwargs) in calls.items():
            fn_compiled = torch.compile(fn, fullgraph=True, options=options)
            with torch._dynamo.config.patch(recompile_limit=64):
                out[f"{variant} | {call}"] = differing(fn_compiled(*args, **kwargs), fn(*args, **kwargs))
    torch._dynamo.reset()
    return out


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def bench_ms(fn) -> float:
    """End-to-end: do_bench's median, host work of the call included where the GPU waits on it."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median"))


def device_ms(fn, calls: int = 10) -> float:
    """Device-only: the summed time of the kernels one call runs (torch.profiler, mean of `calls`),
    so host overhead (dynamo guards, the Python wrapper, launches) is left out."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total_us = sum(getattr(e, "device_time", 0) or getattr(e, "cuda_time", 0) for e in prof.events())
    return total_us / calls / 1000


def host_us(fn, calls: int = 300) -> float:
    """Host time of one call on a tiny tensor (the GPU keeps up, so the loop is host-bound)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def peers(x: torch.Tensor, amax: torch.Tensor, with_modelopt_fp8: bool) -> dict:
    """modelopt's and torchao's own implementations, where they import: row -> callable."""
    found = {}
    try:
        import modelopt.torch.kernels.quantization.gemm as modelopt_kernels

        if getattr(modelopt_kernels, "IS_AVAILABLE", False) and hasattr(modelopt_kernels, "fp4_fake_quant_block"):
            found["nvfp4_fake_given"] = lambda: modelopt_kernels.fp4_fake_quant_block(x, amax)
            found["nvfp4_fake_computed"] = lambda: modelopt_kernels.fp4_fake_quant_block(x, x.abs().amax().float())
    except Exception as error:  # noqa: BLE001 - a missing peer is reported, not fatal
        found["nvfp4_fake_error"] = repr(error)[:200]
    try:
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

        wsf2 = amax / 2688.0
        found["nvfp4_real_given"] = lambda: NVFP4QTensor.quantize(x, 16, weights_scaling_factor_2=wsf2)
    except Exception as error:  # noqa: BLE001
        found["nvfp4_real_error"] = repr(error)[:200]
    try:
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor as TorchaoNVFP4

        per_tensor_scale = amax / 2688.0
        found["nvfp4_real_given_torchao"] = lambda: TorchaoNVFP4.to_nvfp4(x, per_tensor_scale=per_tensor_scale)
    except Exception as error:  # noqa: BLE001
        found["torchao_error"] = repr(error)[:200]
    if with_modelopt_fp8:
        try:
            from modelopt.torch.quantization.extensions import get_cuda_ext_fp8

            start = time.time()
            ext = get_cuda_ext_fp8(raise_if_failed=True)
            found["fp8_ext_build_s"] = round(time.time() - start, 1)
            found["fp8_fake_given"] = lambda: ext.fake_e4m3fy(x, amax)
        except Exception as error:  # noqa: BLE001
            found["fp8_ext_error"] = repr(error)[:200]
    return found


OPERATIONS = {
    # row: (reference call, bytes per element for the ratio, or None for "same bytes as copy")
    "fp8_fake_given": lambda m, x, a: m.fp8_fake_quant(x, a),
    "fp8_fake_given_cuda_flavor": lambda m, x, a: m.fp8_fake_quant(x, a, flavor="modelopt-cuda"),
    "nvfp4_fake_given": lambda m, x, a: m.nvfp4_fake_quant(x, a),
    "nvfp4_fake_computed": lambda m, x, a: m.nvfp4_fake_quant(x),
    "nvfp4_real_given": lambda m, x, a: m.nvfp4_quantize(x, a),
    "nvfp4_real_computed": lambda m, x, a: m.nvfp4_quantize(x),
}


def ratio(row: str, copy_ms: float, ms: float) -> float:
    if row.startswith("nvfp4_real"):
        return (REAL_QUANT_BYTES_PER_ELEMENT / COPY_BYTES_PER_ELEMENT) * copy_ms / ms
    return copy_ms / ms


def run_timing(shape_names, with_modelopt_fp8: bool, eager_too: bool) -> dict:
    results = {}
    for shape_name in shape_names:
        shape = SHAPES[shape_name]
        x = (torch.randn(*shape, device="cuda") * 3).to(torch.bfloat16)
        amax = x.abs().amax().float()
        copy_ms = bench_ms(lambda: x.clone())
        copy_device_ms = device_ms(lambda: x.clone())
        rows = {"copy": {"ms": copy_ms, "ratio": 1.0, "device_ms": copy_device_ms, "device_ratio": 1.0}}
        found = peers(x, amax, with_modelopt_fp8) if shape_name == "main" else {}
        for row, call in OPERATIONS.items():
            ours = call(compiled, x, amax)
            parity = differing(ours, call(refquant, x, amax))
            ms = bench_ms(lambda: call(compiled, x, amax))
            dev_ms = device_ms(lambda: call(compiled, x, amax))
            rows[row] = {
                "ms": ms,
                "ratio": ratio(row, copy_ms, ms),
                "device_ms": dev_ms,
                "device_ratio": ratio(row, copy_device_ms, dev_ms),
                "differing_vs_eager": parity,
            }
            if eager_too:
                eager_ms = bench_ms(lambda: call(refquant, x, amax))
                rows[row]["eager_ms"] = eager_ms
                rows[row]["eager_ratio"] = ratio(row, copy_ms, eager_ms)
            for peer_row in (row, row + "_torchao"):
                if callable(found.get(peer_row)):
                    peer_ms = bench_ms(found[peer_row])
                    key = "torchao" if peer_row.endswith("torchao") else "modelopt"
                    peer_device_ms = device_ms(found[peer_row])
                    rows[row][f"{key}_ms"] = peer_ms
                    rows[row][f"{key}_ratio"] = ratio(row, copy_ms, peer_ms)
                    rows[row][f"{key}_device_ratio"] = ratio(row, copy_device_ms, peer_device_ms)
        rows["peers_notes"] = {k: v for k, v in found.items() if not callable(v)}
        results[shape_name] = rows
    return results


def run_host_overhead() -> dict:
    """Host microseconds per call on a 16 x 64 bf16 tensor: compiled, eager, and a bare launch."""
    x = (torch.randn(16, 64, device="cuda") * 3).to(torch.bfloat16)
    amax = x.abs().amax().float()
    out = {"x.clone() (one eager launch)": host_us(lambda: x.clone())}
    for row, call in OPERATIONS.items():
        out[f"{row} compiled"] = host_us(lambda: call(compiled, x, amax))
        out[f"{row} eager"] = host_us(lambda: call(refquant, x, amax))
    return out


def dump_code(path: Path) -> None:
    """The Triton code inductor writes for the timed graphs, for reading what each kernel does."""
    from torch._inductor.utils import run_and_get_code

    x = (torch.randn(*SHAPES["main"], device="cuda") * 3).to(torch.bfloat16)
    amax = x.abs().amax().float()
    torch._dynamo.reset()
    with path.open("w") as out:
        for row, call in OPERATIONS.items():
            _, sources = run_and_get_code(lambda: call(compiled, x, amax))
            out.write(f"##### {row}\n" + "\n".join(sources) + "\n")


def print_table(timing: dict, device_name: str) -> None:
    print(f"\n{device_name}: ratio to a device copy of the same bf16 tensor, timed in this run.")
    print("End to end = do_bench median (host work included where the GPU waits for it); device = kernel time only (torch.profiler).")
    columns = ("ms", "ratio", "device_ms", "device_ratio", "eager_ratio", "modelopt_ratio", "modelopt_device_ratio", "torchao_ratio")
    print("| shape | operation | compiled ms | compiled ratio | compiled device ms | compiled device ratio | eager ratio | modelopt ratio | modelopt device ratio | torchao ratio | bits differ |")
    print("| --- " * 11 + "|")
    for shape_name, rows in timing.items():
        for row, r in rows.items():
            if row == "peers_notes":
                continue
            cells = [f"{r.get(k):.3f}" if isinstance(r.get(k), float) else "-" for k in columns]
            print(f"| {shape_name} {SHAPES[shape_name][0]}x{SHAPES[shape_name][1]} | {row} | " + " | ".join(cells) + f" | {r.get('differing_vs_eager', '-')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--shapes", default="main,small,skinny")
    parser.add_argument("--no-modelopt-fp8", action="store_true", help="skip the ~70 s JIT build of modelopt's FP8 extension")
    parser.add_argument("--no-parity", action="store_true")
    parser.add_argument("--no-finding", action="store_true")
    parser.add_argument("--no-eager", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name()
    report = {
        "device": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "division_option": division_rounding_option(),
        "inductor_options": compiled.inductor_options(),
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(report), flush=True)
    start = time.time()
    if not args.no_parity:
        report["parity"] = run_parity("cuda", SHAPES["main"], options_variants=not args.no_finding)
        print(f"parity done in {time.time() - start:.0f} s", flush=True)
        bad = {k: v for k, v in report["parity"].items() if k != "division_finding" and any(n != 0 for n in v.values())}
        print("parity rows with differences:", json.dumps(bad), flush=True)
        print("division finding:", json.dumps(report["parity"].get("division_finding"), indent=1), flush=True)
    report["timing"] = run_timing(args.shapes.split(","), not args.no_modelopt_fp8, not args.no_eager)
    report["host_us_per_call"] = run_host_overhead()
    print("host us per call (16 x 64):", json.dumps({k: round(v, 1) for k, v in report["host_us_per_call"].items()}), flush=True)
    (out / "gpu_report.json").write_text(json.dumps(report, indent=1))
    try:
        dump_code(out / "inductor_code.txt")
    except Exception as error:  # noqa: BLE001 - the code dump is for reading, not for the numbers
        print("code dump failed:", repr(error)[:300])
    print_table(report["timing"], device_name)


if __name__ == "__main__":
    main()
