"""The grouped experts' row-count checks in the forward against beside it
(REFQUANT_CHECKS_BESIDE=0 / auto, refquant.hf.grouped_linear.ChecksBeside): benchmarks/ptq_gpu.py's
"moe" model, NVFP4 cast-KV, compiled, after a warm-up calibration on 8 batches of other tokens;
then calibrations on fresh token sets, the settings in turn. Per calibration: max calibration's
seconds, quantize_model's, the new counts checked, the peak allocated over what was held before,
keys failed, and the same 4 plain forwards' seconds (transformers' default forward) on the same
tokens before and after.

    python3 benchmarks/probes/background_checks.py --out DIR [--rounds 2]

The JSON goes to DIR/background_checks.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import os
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ptq_gpu  # noqa: E402
import refquant as rq  # noqa: E402
from refquant.hf import grouped_linear  # noqa: E402
from probe_output import write_json  # noqa: E402

RECIPE = "nvfp4_default-fp8_cast_kv"


def calibrate(pristine, batches, device, beside: str) -> dict:
    """rq.quantize_model on a fresh copy with REFQUANT_CHECKS_BESIDE=beside."""
    model = copy.deepcopy(pristine).to(device)
    recipe = rq.load_recipe(RECIPE)
    before = grouped_linear.row_counts_checked()
    ptq_gpu.reset_peak(device)
    held = torch.cuda.memory_allocated(device)
    os.environ[grouped_linear.BESIDE_SETTING] = beside
    try:
        ptq_gpu.synchronize(device)
        began = time.perf_counter()
        with ptq_gpu.timed_forward_loop(device) as loop:
            rq.quantize_model(model, recipe, batches, backend="compiled", flavor="modelopt-cuda", progress=False)
        ptq_gpu.synchronize(device)
        done = time.perf_counter() - began
    finally:
        del os.environ[grouped_linear.BESIDE_SETTING]
    result = {"beside": beside, "calibration_forwards_s": loop["s"], "quantize_model_s": done,
              "new_counts": grouped_linear.row_counts_checked() - before,
              "peak_mib_over_held": (torch.cuda.max_memory_allocated(device) - held) / 2**20,
              "failed_keys": len(grouped_linear._failed)}
    del model
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["0", "auto"], help="REFQUANT_CHECKS_BESIDE settings, in turn")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("background_checks.py needs a CUDA device.")
        return 2
    device = torch.device("cuda")
    pristine = ptq_gpu.build_model("moe", 0, device).to("cpu")
    warm = copy.deepcopy(pristine).to(device)
    rq.quantize_model(warm, rq.load_recipe(RECIPE), ptq_gpu.batches_for("moe", 8, 4, 1024, 3),
                      backend="compiled", flavor="modelopt-cuda", progress=False)
    del warm
    plain = copy.deepcopy(pristine).to(device)
    with torch.no_grad():
        plain(input_ids=ptq_gpu.batches_for("moe", 1, 4, 1024, 2)[0].to(device))
    ptq_gpu.reset_peak(device)
    held = torch.cuda.memory_allocated(device)
    ptq_gpu.plain_forwards_s(plain, ptq_gpu.batches_for("moe", 1, 4, 1024, 2), device)
    plain_peak = (torch.cuda.max_memory_allocated(device) - held) / 2**20
    rows, seed = [], 100
    for _ in range(args.rounds):
        for mode in args.modes:
            batches = ptq_gpu.batches_for("moe", 4, 4, 1024, seed)
            seed += 1
            row = {"seed": seed - 1, "plain_s": ptq_gpu.plain_forwards_s(plain, batches, device)}
            row.update(calibrate(pristine, batches, device, mode))
            row["plain_after_s"] = ptq_gpu.plain_forwards_s(plain, batches, device)
            print(row, flush=True)
            rows.append(row)
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "recipe": RECIPE,
              "plain_forward_peak_mib_over_held": plain_peak, "rows": rows}
    write_json(args.out, "background_checks.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
