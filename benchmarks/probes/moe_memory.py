"""Where the MoE shape holds GPU memory: benchmarks/ptq_gpu.py's "moe" model, plain, quantized by
refquant (compiled; FP8 and NVFP4 cast-KV, and FP8 folded) and, with --modelopt, by modelopt (FP8),
each on a fresh copy in one process.

    python3 benchmarks/probes/moe_memory.py --out DIR [--modelopt]

Per variant, MiB above the model's weights: the peak of the quantization (calibration included)
and where it was, what it leaves allocated, the peak of one forward of 4 x 1024 tokens and six
forwards' times after two warm-ups (CUDA events); per module (attention of layers 0-1, every layer's MoE block,
lm_head), in the forward and over every calibration batch: what was allocated when it began and
its own peak above that. The JSON goes to DIR/moe_memory.json.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import ptq_gpu  # noqa: E402
import refquant as rq  # noqa: E402

MIB = 2**20


class ModulePeaks:
    """Hooks on attention of layers 0-1, every layer's MoE block and lm_head while the block runs:
    per module, what was allocated when it last began and the most it ever added above that
    (MiB), and the peak of the whole block (bytes), kept across the peak-statistics resets the
    hooks make."""

    def __init__(self, model):
        layers = list(model.model.layers)
        self.targets = ([(f"layer{i}.attn", layer.self_attn) for i, layer in enumerate(layers[:2])]
                        + [(f"layer{i}.mlp", layer.mlp) for i, layer in enumerate(layers)] + [("lm_head", model.lm_head)])
        self.seen, self.handles, self.peak, self.began = {}, [], 0, {}

    def _settle(self) -> int:
        torch.cuda.synchronize()
        self.peak = max(self.peak, torch.cuda.max_memory_allocated())
        return torch.cuda.memory_allocated()

    def __enter__(self):
        for name, module in self.targets:
            def before(module, args, name=name):
                self.began[name] = self._settle()
                torch.cuda.reset_peak_memory_stats()

            def after(module, args, output, name=name):
                self._settle()
                held = self.began[name]
                own = (torch.cuda.max_memory_allocated() - held) / MIB
                self.seen[name] = [held / MIB, max(self.seen.get(name, [0.0, 0.0])[1], own)]

            self.handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self._settle()


def module_peaks(model, batch: torch.Tensor) -> dict:
    """name -> [MiB allocated when the module began, its peak above that] over one forward."""
    with ModulePeaks(model) as peaks, torch.no_grad():
        model(input_ids=batch)
    return peaks.seen


def forward_measures(model, batch: torch.Tensor) -> dict:
    """Six forwards' times after warm-up (ptq_gpu.timed_forward_ms), then one more forward's peak
    above what was allocated before it."""
    device = batch.device
    times = ptq_gpu.timed_forward_ms(model, batch, device, 6)["each_ms"]
    ptq_gpu.reset_peak(device)
    held = torch.cuda.memory_allocated()
    with torch.no_grad():
        model(input_ids=batch)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - held
    return {"forward_ms": times, "held_before_forward_mib": held / MIB, "forward_peak_above_held_mib": peak / MIB}


def measure(pristine, batches, batch, prepare) -> dict:
    ptq_gpu.reset_peak(torch.device("cuda"))
    model = copy.deepcopy(pristine).cuda()
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    began = time.perf_counter()
    with ModulePeaks(model) as peaks:
        prepare(model, batches)
    row = {"prepare_s": time.perf_counter() - began,
           "prepare_peak_above_weights_mib": (peaks.peak - weights) / MIB,
           "prepare_modules": peaks.seen}
    gc.collect()
    row["held_after_prepare_above_weights_mib"] = (torch.cuda.memory_allocated() - weights) / MIB
    row |= forward_measures(model, batch)
    row["forward_peak_above_weights_mib"] = row["held_before_forward_mib"] + row["forward_peak_above_held_mib"] - weights / MIB
    row["modules"] = module_peaks(model, batch)
    return row


def plain(model, batches):
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch.cuda())


def refquant_variant(recipe: str, fold: bool = False):
    def prepare(model, batches):
        rq.quantize_model(model, rq.load_recipe(recipe), batches, backend="compiled", flavor="modelopt-cuda", progress=False)
        if fold:
            rq.fold_weights(model)
    return prepare


def modelopt_variant(recipe: str):
    from compare_modelopt import modelopt_quant_cfg

    config = modelopt_quant_cfg(recipe)
    return lambda model, batches: ptq_gpu.quantize_with_modelopt(model, config, batches, torch.device("cuda"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--modelopt", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pristine = ptq_gpu.build_model("moe", 0, torch.device("cpu"))
    batches = ptq_gpu.batches_for("moe", 4, 4, 1024, 0)
    batch = batches[0].cuda()
    variants = {"plain": plain}
    if args.modelopt:
        variants["modelopt_fp8"] = modelopt_variant("fp8_default-fp8_kv")
    variants |= {"compiled_fp8": refquant_variant("fp8_default-fp8_kv"),
                 "compiled_nvfp4": refquant_variant("nvfp4_default-fp8_cast_kv"),
                 "folded_fp8": refquant_variant("fp8_default-fp8_kv", fold=True)}
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, prepare in variants.items():
        report[name] = measure(pristine, batches, batch, prepare)
        row = report[name]
        print(name, json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items() if k != "modules"}),
              "| MoE peaks", [round(v[1]) for k, v in row["modules"].items() if k.endswith(".mlp")], flush=True)
        (out / "moe_memory.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
