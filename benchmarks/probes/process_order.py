"""Forward time of quantized models made one after another in one process (a report, no asserts).

    python3 benchmarks/probes/process_order.py [--out DIR] [--shape small] [--repeats 20]
        [--sequence plain fp8_default-fp8_kv nvfp4_default-fp8_kv fp8_default-fp8_kv plain nvfp4_default-fp8_kv]
        [--profile]

For each entry of --sequence ("plain"; a recipe, quantized with the compiled backend on 8
calibration batches; or "modelopt:<recipe>", quantized by modelopt on the same batches, as
ptq_gpu.py runs it before refquant's), a fresh ptq_gpu.py model of --shape: the median forward (ptq_gpu's
timed_forward_ms), then the same with Python's garbage collector frozen and turned off. Why: the
first quantized model of a process may run its forward slower than the same recipe later in the
process (a host's slow phase, or compile workers starting: benchmarks/README.md, "Reading the
timings"), and ptq_gpu.py times its first recipe first. With --profile, each row also holds host_time.py's forward_profile of the
model (cProfile of one forward: where a slow model's host time goes, against a fast one's).
Writes DIR/process_order.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: refquant, scripts/
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: ptq_gpu, gpu_report
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other probes

import refquant as rq  # noqa: E402
from host_time import forward_profile  # noqa: E402
import ptq_gpu  # noqa: E402
from ptq_gpu import batches_for, build_model, modelopt_available, timed_forward_ms  # noqa: E402

DEFAULT_SEQUENCE = ["plain", "fp8_default-fp8_kv", "nvfp4_default-fp8_kv", "fp8_default-fp8_kv", "plain", "nvfp4_default-fp8_kv"]


def measure(label: str, model, batch: torch.Tensor, device: torch.device, repeats: int) -> dict:
    timing = timed_forward_ms(model, batch, device, repeats)
    gc.freeze()
    frozen = timed_forward_ms(model, batch, device, repeats)
    gc.unfreeze()
    gc.disable()
    try:
        gc_off = timed_forward_ms(model, batch, device, repeats)
    finally:
        gc.enable()
    return {"label": label, "ms": timing["median_ms"], "host_ms": timing.get("host_ms"), "host_each_ms": timing.get("host_each_ms"),
            "host_cpu_each_ms": timing.get("host_cpu_each_ms"), "machine_steal_share": timing.get("machine_steal_share"),
            "gc_frozen_ms": frozen["median_ms"],
            "gc_off_ms": gc_off["median_ms"], "gc_objects": len(gc.get_objects())}


def quantize_with_modelopt(model, recipe: str, calibration: list[torch.Tensor], device: torch.device) -> None:
    """ptq_gpu.py's modelopt quantization: does a modelopt model earlier in the process change the
    forward time of refquant's later ones?"""
    if not modelopt_available():
        raise SystemExit(f"modelopt:{recipe} in --sequence, but modelopt does not import here.")
    from compare_modelopt import modelopt_quant_cfg

    ptq_gpu.quantize_with_modelopt(model, modelopt_quant_cfg(recipe), calibration, device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--shape", default="small")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sequence", nargs="*", default=DEFAULT_SEQUENCE)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true", help="also cProfile one forward of each model")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    flavor = "modelopt-cuda" if device.type == "cuda" else "modelopt-cpu"
    batch = batches_for(args.shape, 1, 4, 1024, 0)[0].to(device)
    calibration = [b.to(device) for b in batches_for(args.shape, 8, 4, 1024, 0)]
    rows = []
    for step, recipe in enumerate(args.sequence):
        model = build_model(args.shape, 0, device)
        if recipe.startswith("modelopt:"):
            quantize_with_modelopt(model, recipe.split(":", 1)[1], calibration, device)
        elif recipe != "plain":
            rq.quantize_model(model, rq.load_recipe(recipe), calibration, backend="compiled", flavor=flavor, progress=False)
        rows.append(measure(f"{step} {recipe}", model, batch, device, args.repeats))
        if args.profile:
            rows[-1]["profile"] = forward_profile(model, batch)
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "profile"}), flush=True)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        (args.out / "process_order.json").write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
