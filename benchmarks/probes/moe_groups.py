"""How the experts loop's group budgets trade host time for memory: benchmarks/ptq_gpu.py's "moe"
shape calibrated once (compiled backend), then its forward timed and its peak memory read under
several GROUP_BYTES budgets of refquant.hf.experts_loop, all in one process so
that one host's speed holds for every row; the logits of every setting compared with the first's
bit for bit (the budgets change how many experts a group holds, never a bit).

    python3 benchmarks/probes/moe_groups.py --out DIR [--recipe R] [--repeats 10] [--folded]
        [--shape moe] [--device cuda]

First the plain model's forward (no quantizers, transformers' own experts forward). Per
setting: groups per layer of layer 0's routing, the forward's median and min ms (CUDA events
after a warm-up), the forward's peak memory above what the model holds before it (the logits
included) and layer 0's experts forward's peak above what was held when it began. With
--folded, the same after rq.fold_weights. The JSON goes to DIR/moe_groups_<recipe>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ptq_gpu  # noqa: E402
import refquant as rq  # noqa: E402
from refquant.hf import experts_loop  # noqa: E402
from probe_output import write_json  # noqa: E402

MIB = 2**20
CUDA = torch.cuda.is_available()


def _synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _allocated() -> int:
    return torch.cuda.memory_allocated() if CUDA else 0


def _reset_peak() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def _peak_above(held: int) -> float | None:
    """The peak memory since the last reset above `held` bytes, MiB (None on the CPU)."""
    return (torch.cuda.max_memory_allocated() - held) / MIB if CUDA else None
# GROUP_BYTES budgets in MiB: the loop's own first; the last makes one group a layer here.
SETTINGS = (192, 128, 256, 336, 1024)


@contextlib.contextmanager
def budget(mib: int):
    """The experts loop's group budget set to `mib` within the block."""
    saved = experts_loop.GROUP_BYTES
    experts_loop.GROUP_BYTES = mib * MIB
    try:
        yield
    finally:
        experts_loop.GROUP_BYTES = saved


def forward_under(model, batch: torch.Tensor, mib: int, repeats: int) -> dict:
    """The forward's times, peak memory and logits with the loop's budget set to `mib`."""
    with budget(mib):
        times = []
        with torch.no_grad():
            logits = model(input_ids=batch).logits  # warm-up
            for _ in range(repeats):
                _synchronize()
                began = time.perf_counter()
                model(input_ids=batch)
                _synchronize()
                times.append((time.perf_counter() - began) * 1e3)
            del logits
            _synchronize()
            held = _allocated()
            _reset_peak()
            logits = model(input_ids=batch).logits
            _synchronize()
            peak = _peak_above(held)
    return {"budget_mib": mib, "median_ms": statistics.median(times),
            "min_ms": min(times), "each_ms": times, "forward_peak_mib": peak, "_logits": logits}


def layer0_groups_and_peak(model, batch: torch.Tensor, mib: int, copies: bool) -> tuple[int, float]:
    """(groups layer 0's routing of `batch` makes, the peak memory of layer 0's experts forward
    above what was held when it began, MiB) under this budget; copies: whether the forward
    quantizes the group's weights into copies."""
    experts = next(m for m in model.modules() if hasattr(m, "slice_quantizers"))
    seen = {}

    def before(module, args):
        hidden, top_k_index = args[0], args[1]
        counts = torch.bincount(top_k_index.reshape(-1), minlength=module.num_experts).tolist()
        per_expert = max(experts_loop.projection_copy_bytes(module, projection)  # one projection's copies at a time
                         for projection in ("gate_up_proj", "down_proj")) if copies else 0
        seen["groups"] = len(experts_loop.expert_groups(counts, experts_loop.row_bytes(module, hidden, args[2]), per_expert,
                                                           mib * MIB))
        _synchronize()
        seen["held"] = _allocated()
        _reset_peak()

    def after(module, args, output):
        _synchronize()
        seen["peak"] = _peak_above(seen["held"])

    handles = [experts.register_forward_pre_hook(before), experts.register_forward_hook(after)]
    try:
        with budget(mib), torch.no_grad():
            model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen["groups"], seen["peak"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--recipe", default="fp8_default-fp8_kv")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--folded", action="store_true")
    parser.add_argument("--shape", default="moe")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    global CUDA
    CUDA = device.type == "cuda"
    model = ptq_gpu.build_model(args.shape, 0, device)
    batches = ptq_gpu.batches_for(args.shape, 4, 4, 1024, 1)
    batch = batches[0].to(device)
    plain = forward_under(model, batch, 0, args.repeats)  # no quantizers: transformers' own experts forward
    del plain["_logits"]
    print(f"plain: {plain['median_ms']:.1f} ms (min {plain['min_ms']:.1f}), forward peak {plain['forward_peak_mib']} MiB",
          flush=True)
    flavor = "modelopt-cuda" if CUDA else "modelopt-cpu"
    rq.quantize_model(model, rq.load_recipe(args.recipe), batches, backend="compiled", flavor=flavor, progress=False)
    report = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__, "recipe": args.recipe,
              "shape": args.shape, "plain": plain, "rows": []}
    for folded in (False, True) if args.folded else (False,):
        if folded:
            rq.fold_weights(model)
        first = None
        for mib in SETTINGS:
            row = forward_under(model, batch, mib, args.repeats)
            logits = row.pop("_logits")
            first = logits if first is None else first
            row["logits_equal_to_first"] = bool(torch.equal(logits, first))
            row["folded"] = folded
            row["groups_layer0"], row["experts_peak_mib"] = layer0_groups_and_peak(model, batch, mib, not folded)
            report["rows"].append(row)
            print(f"folded={folded} budget {mib} MiB: {row['groups_layer0']} groups, "
                  f"{row['median_ms']:.1f} ms (min {row['min_ms']:.1f}), forward peak {row['forward_peak_mib']} MiB, "
                  f"layer 0's experts peak {row['experts_peak_mib']} MiB, "
                  f"logits equal: {row['logits_equal_to_first']}", flush=True)
    write_json(args.out, f"moe_groups_{args.recipe}.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
