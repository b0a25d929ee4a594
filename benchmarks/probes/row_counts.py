"""How the grouped experts' one-time row-count checks (refquant.hf.grouped_linear) fall over a
calibration, and what one costs: benchmarks/ptq_gpu.py's "moe" model calibrated by refquant
(compiled, NVFP4 cast-KV) on a fresh copy per round of 8 new batches, each round's new row counts
checked and its time; then F.linear at row counts cuBLAS has not met in the process against the
same counts again (host time a call, and with the device's work), on the shape of the MoE
shape's first projection (CUDA).

    python3 benchmarks/probes/row_counts.py --out DIR [--rounds 8]

The JSON goes to DIR/row_counts.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ptq_gpu  # noqa: E402
import refquant as rq  # noqa: E402
from refquant.hf import grouped_linear  # noqa: E402
from probe_output import write_json  # noqa: E402


def calibration_rounds(rounds: int, device: torch.device) -> list[dict]:
    """Per round: how many batches the process calibrated on before, the row counts this round's
    8 batches checked first, and the round's rq.quantize_model time (s)."""
    pristine = ptq_gpu.build_model("moe", 0, device).to("cpu")
    recipe = rq.load_recipe("nvfp4_default-fp8_cast_kv")
    rows = []
    for round_ in range(rounds):
        batches = ptq_gpu.batches_for("moe", 8, 4, 1024, 100 + round_)
        model = copy.deepcopy(pristine).to(device)
        before = grouped_linear.row_counts_checked()
        torch.cuda.synchronize(device)
        began = time.perf_counter()
        rq.quantize_model(model, recipe, batches, backend="compiled", flavor="modelopt-cuda", progress=False)
        torch.cuda.synchronize(device)
        rows.append({"batches_before": 8 * round_, "new_counts": grouped_linear.row_counts_checked() - before,
                     "s": time.perf_counter() - began})
        print(rows[-1], flush=True)
        del model
    return rows


def linear_at_new_counts(device: torch.device) -> dict:
    """F.linear's cost a call (us: host, then with the device's work) over row counts the process
    has not met, the same counts again, other new counts, and one count repeated."""
    a = torch.randn(4096, 2048, device=device, dtype=torch.bfloat16)
    w = torch.randn(1536, 2048, device=device, dtype=torch.bfloat16)
    F.linear(a[:100], w)

    def timed(counts) -> dict:
        counts = list(counts)
        torch.cuda.synchronize(device)
        began = time.perf_counter()
        for count in counts:
            F.linear(a[:count], w)
        host = time.perf_counter() - began
        torch.cuda.synchronize(device)
        return {"host_us": host / len(counts) * 1e6, "total_us": (time.perf_counter() - began) / len(counts) * 1e6}

    result = {"new_200_to_399": timed(range(200, 400)), "same_again": timed(range(200, 400)),
              "new_1200_to_1399": timed(range(1200, 1400)), "one_count_repeated": timed([300] * 200)}
    print(result, flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("row_counts.py needs a CUDA device (the grouped matmul and its checks run on CUDA only).")
        return 2
    device = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "calibration_rounds": calibration_rounds(args.rounds, device),
              "linear_at_new_counts": linear_at_new_counts(device)}
    write_json(args.out, "row_counts.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
