"""Where a quantized forward waits for the GPU: host-device synchronizations, counted and located.

A sync stalls the host until the GPU has drained its queue, so the host's per-call work (dynamo's
guards, Python) can no longer hide behind the GPU's: on a model of hundreds of quantizer calls
this, not the kernels, decides the forward's time.

    python3 benchmarks/probes/sync_probe.py [--shape small] [--recipe fp8_default-fp8_kv] [--backend compiled]

Builds a Llama-shaped model (benchmarks/ptq_gpu.py's shapes), quantizes it, then runs one forward
under torch.cuda.set_sync_debug_mode("warn") and prints each distinct place (the innermost
refquant frames) that synchronized, with its count, and the forward's time with the plain model's.
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: refquant, scripts/
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: ptq_gpu, gpu_report
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other probes

import refquant as rq  # noqa: E402
from ptq_gpu import batches_for, build_model, timed_forward_ms  # noqa: E402


def sync_sites(model, batch: torch.Tensor) -> collections.Counter:
    """{the refquant frames of a synchronizing call: count} over one forward."""
    sites: collections.Counter = collections.Counter()
    original = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return original(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "refquant" in f.filename or "transformers" in f.filename]
        sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:])) or "(outside refquant)"] += 1

    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with torch.no_grad():
            model(input_ids=batch)
        torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = original
    return sites


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="small")
    parser.add_argument("--recipe", default="fp8_default-fp8_kv")
    parser.add_argument("--backend", default="compiled", choices=("compiled", "reference"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: it counts host-device synchronizations", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    model = build_model(args.shape, 0, device)
    batch = batches_for(args.shape, 1, args.batch_size, args.seq, 2)[0].to(device)
    plain = timed_forward_ms(model, batch, device, 5)
    rq.quantize_model(model, rq.load_recipe(args.recipe), batches_for(args.shape, 2, args.batch_size, args.seq, 1),
                      backend=args.backend, flavor="modelopt-cuda", progress=False)
    quantized = timed_forward_ms(model, batch, device, 5)
    sites = sync_sites(model, batch)
    print(f"{torch.cuda.get_device_name()}: {args.shape} {args.recipe} {args.backend}: forward {quantized['median_ms']:.1f} ms, "
          f"plain {plain['median_ms']:.1f} ms; {sum(sites.values())} synchronizations in one forward")
    for site, count in sites.most_common(12):
        print(f"{count:6d}  {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
