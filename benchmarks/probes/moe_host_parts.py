"""Where the quantized MoE forward's host time goes, by taking parts away: benchmarks/ptq_gpu.py's
"moe" shape calibrated once (compiled backend), then its forward timed (CUDA events, and the
host's issue time) as it is, with the weight quantizers' binding made again at every forward, with
one group a layer, and folded; the plain model's forward first.
Every setting's logits compared with the first's bit for bit; on CUDA its peak memory above the
model and its direct launches that took Triton's public path (on the timed batch, then on another
batch, whose routing makes other keys). A report for deciding what to cut.

    python3 benchmarks/probes/moe_host_parts.py --out DIR [--recipe R] [--repeats 10]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ptq_gpu  # noqa: E402
import refquant as rq  # noqa: E402
from refquant.hf import experts_loop  # noqa: E402
from probe_output import write_json  # noqa: E402


@contextlib.contextmanager
def bound_each_forward():
    """The weight quantizers' binding made again at every forward (none kept)."""
    from refquant.quant import quantizer

    original = quantizer._KeptBinding.holds
    quantizer._KeptBinding.holds = lambda self, quantizers, like: False
    try:
        yield
    finally:
        quantizer._KeptBinding.holds = original


@contextlib.contextmanager
def group_bytes(value):
    before = experts_loop.GROUP_BYTES
    experts_loop.GROUP_BYTES = value
    try:
        yield
    finally:
        experts_loop.GROUP_BYTES = before


def public_launches(model, batch) -> dict:
    """The direct launches (refquant.compiled.triton_launch.DirectLaunch) of one forward that
    took Triton's public launch (kernel[grid](...)) because no compiled kernel was kept for their
    key, by kernel. (The experts' ordered sum, public at every launch by design, is not counted.)"""
    from refquant.compiled import triton_launch

    counts: dict = {}
    original = triton_launch.DirectLaunch.launch_public

    def counted(self, programs, device, args):
        counts[self.name] = counts.get(self.name, 0) + 1
        return original(self, programs, device, args)

    triton_launch.DirectLaunch.launch_public = counted
    try:
        with torch.no_grad():
            model(input_ids=batch)
    finally:
        triton_launch.DirectLaunch.launch_public = original
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--recipe", default="nvfp4_default-fp8_cast_kv")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shape", default="moe")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = ptq_gpu.batches_for(args.shape, 4, 4, 1024 if args.shape == "moe" else 64, 1)
    model = ptq_gpu.build_model(args.shape, 0, device)
    batch = batches[0].to(device)
    rows = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "recipe": args.recipe}
    rows["plain"] = ptq_gpu.timed_forward_ms(model, batch, device, args.repeats)
    flavor = "modelopt-cuda" if device.type == "cuda" else "modelopt-cpu"
    rq.quantize_model(model, rq.load_recipe(args.recipe), batches, backend="compiled", flavor=flavor, progress=False)
    with torch.no_grad():
        reference = model(input_ids=batch).logits
    settings = {
        "as_is": contextlib.nullcontext,
        "bound_each_forward": bound_each_forward,
        "one_group": lambda: group_bytes(2**40),
        "as_is_again": contextlib.nullcontext,
    }
    for name, make in settings.items():
        with make():
            rows[name] = ptq_gpu.timed_forward_ms(model, batch, device, args.repeats)
            with torch.no_grad():
                rows[name]["logits_equal"] = bool(torch.equal(model(input_ids=batch).logits, reference))
            if device.type == "cuda":
                rows[name]["public_launches_a_forward"] = public_launches(model, batch)
                # another batch routes its tokens otherwise: keys the timed batch never made
                rows[name]["public_launches_another_batch"] = public_launches(model, batches[1].to(device))
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                with torch.no_grad():
                    model(input_ids=batch)
                rows[name]["peak_over_model_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    rq.fold_weights(model)
    rows["folded"] = ptq_gpu.timed_forward_ms(model, batch, device, args.repeats)
    for name, row in rows.items():
        if isinstance(row, dict):
            print(f"{name:24s} {row['median_ms']:7.1f} ms  host {row.get('host_ms', 0):7.1f} ms  "
                  f"logits {row.get('logits_equal', '-')}  peak {row.get('peak_over_model_mib', 0):.0f} MiB  "
                  f"public {row.get('public_launches_a_forward')} / another batch {row.get('public_launches_another_batch')}")
    write_json(args.out, f"moe_host_parts_{args.recipe}.json", rows)


if __name__ == "__main__":
    main()
