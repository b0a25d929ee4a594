"""What max calibration's own steps cost on the MoE shape once no row count is left to check:
benchmarks/ptq_gpu.py's "moe" model, NVFP4 cast-KV, compiled, quantized once on 4 batches (every
row count of those batches checked), then max calibration run again on the same batches in turn
with the checks beside the forwards on and off (REFQUANT_CHECKS_BESIDE=1 / 0: with it on, each
batch is kept with a snapshot of what calibration held before it) and with the last position's
logits or every position's (refquant.hf.calibrate._unwatched_logits), each right after the same
4 plain forwards (transformers' default forward) on a plain copy. Whether those steps, not the
host's moment, set the calibration's time.

    python3 benchmarks/probes/calibration_ab.py --out DIR [--rounds 3]

The JSON goes to DIR/calibration_ab.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ptq_gpu  # noqa: E402
import refquant as rq  # noqa: E402
from refquant.hf import calibrate, grouped_linear  # noqa: E402
from probe_output import write_json  # noqa: E402

RECIPE = "nvfp4_default-fp8_cast_kv"


def seconds(work, device) -> float:
    ptq_gpu.synchronize(device)
    began = time.perf_counter()
    work()
    ptq_gpu.synchronize(device)
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("calibration_ab.py needs a CUDA device.")
        return 2
    device = torch.device("cuda")
    pristine = ptq_gpu.build_model("moe", 0, device).to("cpu")
    batches = ptq_gpu.batches_for("moe", 4, 4, 1024, 100)
    model = copy.deepcopy(pristine).to(device)
    rq.quantize_model(model, rq.load_recipe(RECIPE), batches, backend="compiled", flavor="modelopt-cuda", progress=False)
    plain = copy.deepcopy(pristine).to(device)
    last_only = calibrate._unwatched_logits
    rows = []
    for _ in range(args.rounds):
        for beside in ("0", "1"):
            for logits in ("last", "all"):
                os.environ[grouped_linear.BESIDE_SETTING] = beside
                calibrate._unwatched_logits = last_only if logits == "last" else (lambda model: {})
                try:
                    row = {"beside": beside, "logits": logits, "plain_s": ptq_gpu.plain_forwards_s(plain, batches, device)}
                    checked = grouped_linear.row_counts_checked()
                    row["calibration_s"] = seconds(lambda: calibrate.max_calibrate(model, batches, progress=False), device)
                    row["new_counts"] = grouped_linear.row_counts_checked() - checked
                finally:
                    calibrate._unwatched_logits = last_only
                    del os.environ[grouped_linear.BESIDE_SETTING]
                print(row, flush=True)
                rows.append(row)
    medians = {}
    for row in rows:
        medians.setdefault(f"beside {row['beside']}, logits {row['logits']}", []).append(row["calibration_s"] / row["plain_s"])
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "recipe": RECIPE, "rows": rows,
              "median_ratio_to_plain": {key: statistics.median(values) for key, values in medians.items()}}
    print(result["median_ratio_to_plain"])
    write_json(args.out, "calibration_ab.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
