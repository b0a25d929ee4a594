"""The host time of rq.quantize_model outside its max calibration, step by step: the quantizers'
insertion, the recipe's rules and their checks, the report. Pure Python work whose cost grows with
the number of quantizers, not with the weights' size, so it is measured on a model with the
module tree of benchmarks/ptq_gpu.py's "moe" shape (8 layers, 64 experts a layer: 1174 quantizers)
at small widths, on whatever device runs it (the CPU by default).

    python3 benchmarks/probes/placement_time.py --out DIR [--recipe NAME] [--repeats 7]

Each repeat quantizes a fresh model (one batch of 8 tokens); the JSON (DIR/placement_time.json)
holds every repeat's ms a step and their medians, and the Python garbage collections that ran
inside quantize_model (a full one, when it falls there, costs more than every step together).
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import sys
import time

import torch

import refquant as rq
import refquant.hf.ptq as ptq
import refquant.quant.recipe as recipe_module
from probe_output import write_json

STRUCTURE = dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=64,
                 num_experts_per_tok=8, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 vocab_size=320)
STEPS = {ptq: ("insert_quantizers", "max_calibrate", "_quantizer_rows", "weight_coverage", "_experts_without_tokens"),
         recipe_module: ("apply_recipe", "check_application")}


def timing_steps(times: dict) -> None:
    """Wraps each of STEPS so that its seconds add up in times[name]."""
    for module, names in STEPS.items():
        for name in names:
            step = getattr(module, name)

            @functools.wraps(step)
            def timed(*args, _step=step, _name=name, **kwargs):
                began = time.perf_counter()
                try:
                    return _step(*args, **kwargs)
                finally:
                    times[_name] = times.get(_name, 0.0) + time.perf_counter() - began

            setattr(module, name, timed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--recipe", default="nvfp4_default-fp8_cast_kv")
    parser.add_argument("--backend", default="reference", choices=("reference", "compiled"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**STRUCTURE)
    recipe = rq.load_recipe(args.recipe)
    device = torch.device(args.device)
    batch = torch.randint(0, STRUCTURE["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(0))
    flavor = "modelopt-cuda" if device.type == "cuda" else "modelopt-cpu"
    times: dict = {}
    timing_steps(times)
    collections: list = []
    gc.callbacks.append(lambda phase, info: collections.append((phase, info["generation"], time.perf_counter())))
    repeats = []
    for _ in range(args.repeats):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=torch.bfloat16)
        times.clear()
        collections.clear()
        began = time.perf_counter()
        report = rq.quantize_model(model, recipe, [batch], backend=args.backend, flavor=flavor, progress=False)
        total = time.perf_counter() - began
        row = {name: seconds * 1e3 for name, seconds in times.items()}
        row["total"] = total * 1e3
        row["outside_max_calibrate"] = row["total"] - row["max_calibrate"]
        starts = [at for phase, _, at in collections if phase == "start"]
        stops = [at for phase, _, at in collections if phase == "stop"]
        row["gc_ms"] = sum(stop - start for start, stop in zip(starts, stops)) * 1e3
        row["gc_generations"] = [generation for phase, generation, _ in collections if phase == "start"]
        repeats.append(row)
        print({key: round(value, 1) if isinstance(value, float) else value for key, value in row.items()}, flush=True)
    result = {"device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
              "python": sys.version.split()[0], "torch": torch.__version__, "recipe": args.recipe, "backend": args.backend,
              "quantizers": len(report.quantizers), "repeats": repeats,
              "median_ms": {key: statistics.median(row[key] for row in repeats) for key in repeats[0] if key != "gc_generations"}}
    print("median ms:", {key: round(value, 1) for key, value in result["median_ms"].items()})
    write_json(args.out, "placement_time.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
