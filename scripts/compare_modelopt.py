"""Quantize the same seeded model with refquant and with modelopt, and compare everything.

For each recipe: build the built-in seeded Llama twice (refquant.hf.models.build_builtin_model), give
both the same calibration batches, quantize one with rq.quantize_model and the other with
modelopt's mtq.quantize (the recipe's quant_cfg, a forward loop over the batches), then compare

  quantizers  the set of quantizer names, each one's enabled flag and amax (bits and dtype);
  logits      the quantized models' logits on an evaluation batch, bit for bit (modelopt's NVFP4
              fake quant is a Triton kernel: on a machine without a GPU those are skipped);
  export      rq.export_checkpoint vs modelopt's export_hf_checkpoint: tensor names, dtypes,
              shapes and bytes, hf_quant_config.json, config.json;
  round trip  rq.load_checkpoint(export) vs rq.compress_weights(model), and how far the
              fake-quantized weights and logits are from the compressed ones.

refquant's flavor follows the device: "modelopt-cpu" on CPU, "modelopt-cuda" on a GPU.
Prints a table and writes JSON (--json). Needs nvidia-modelopt 0.47 (pip install --no-deps).

    python scripts/compare_modelopt.py --device cpu --json compare_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import refquant as rq
from refquant.hf.export import CompressedWeightQuantizer
from refquant.hf.models import build_builtin_model
from refquant.quant.recipe import shipped_recipes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
# the comparison itself, shared with the family matrix (tests/modelopt_compare.py)
from modelopt_compare import (  # noqa: E402
    MODELOPT_RECIPES,
    calibration_batches,
    compare_exports,
    compare_fake_quant_ops,
    compare_logits,
    compare_quantizers,
    export_with_modelopt,
    logits_of,
    modelopt_quant_cfg,
    quantize_with_modelopt,
    quantizer_table,
    same_bits,
)

# benchmarks/ptq_gpu.py imports these from here
__all__ = ["compare_exports", "logits_of", "modelopt_quant_cfg", "quantizer_table", "same_bits"]

RECIPES = tuple(shipped_recipes())  # the six shipped TOML recipes


def fake_vs_compressed(model, compressed, batch) -> dict:
    """How far the fake-quantized model is from its compressed (exported) twin: weight elements that
    differ, and the logits."""
    differing = differing_fused = total = 0
    modules = dict(model.named_modules())
    for name, module in compressed.named_modules():
        compressed_q = getattr(module, "weight_quantizer", None)
        if isinstance(compressed_q, CompressedWeightQuantizer):
            original = modules[name]
            # the same fake quant with the export's (fused) amax: isolates fake-vs-real rounding
            fused_q = rq.TensorQuantizer(compressed_q.config, flavor=compressed_q.flavor)
            fused_q.set_amax(compressed_q.amax)
            with torch.no_grad():
                fake = original.weight_quantizer(original.weight)
                fake_fused = fused_q(original.weight)
            differing += int((fake != module.weight).sum())
            differing_fused += int((fake_fused != module.weight).sum())
            total += fake.numel()
    logits = compare_logits(logits_of(model, batch), logits_of(compressed, batch))
    return {
        "weight_elements": total,
        "weight_elements_differing": differing,
        "weight_elements_differing_with_fused_amax": differing_fused,
        "logits": logits,
    }


def run_recipe(recipe: str, args, batches, eval_batch, workdir: Path) -> dict:
    device = torch.device(args.device)
    flavor = "modelopt-cuda" if device.type == "cuda" else "modelopt-cpu"
    started = time.perf_counter()
    rq_model = build_builtin_model(seed=args.seed).to(device)
    rq.quantize_model(rq_model, rq.load_recipe(recipe), batches, flavor=flavor, progress=False)
    mo_model = build_builtin_model(seed=args.seed).to(device)
    mo_model.config.architectures = [type(mo_model).__name__]  # modelopt's export reads it
    quantize_with_modelopt(mo_model, recipe, batches)
    result = {"recipe": recipe, "modelopt_recipe": MODELOPT_RECIPES[recipe] or "built from units", "flavor": flavor}
    result["quantizers"] = compare_quantizers(rq_model, mo_model)

    uses_nvfp4 = "nvfp4" in recipe
    rq_logits = logits_of(rq_model, eval_batch)
    if device.type == "cpu" and uses_nvfp4:
        result["logits"] = {"skipped": "modelopt's NVFP4 fake quant needs a GPU"}
    else:
        result["logits"] = compare_logits(rq_logits, logits_of(mo_model, eval_batch))
        result["fake_quant_ops"] = compare_fake_quant_ops(rq_model, mo_model, eval_batch)

    ours, theirs = workdir / f"{recipe}-refquant", workdir / f"{recipe}-modelopt"
    rq.export_checkpoint(rq_model, ours)
    export_with_modelopt(mo_model, theirs)  # changes mo_model (fusion, packed weights)
    result["export"] = compare_exports(ours, theirs)

    compressed = copy.deepcopy(rq_model)
    rq.compress_weights(compressed)
    reloaded = rq.load_checkpoint(ours).to(device)
    result["reload"] = compare_logits(logits_of(compressed, eval_batch), logits_of(reloaded, eval_batch))
    result["fake_vs_compressed"] = fake_vs_compressed(rq_model, compressed, eval_batch)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["ok"] = (
        result["quantizers"]["ok"]
        and result["export"]["ok"]
        and result["reload"]["identical"]
        and result["logits"].get("identical", True)
    )
    return result


def _mark(ok) -> str:
    return "same" if ok else "DIFF"


def table(results: list[dict], device: str) -> str:
    lines = [
        f"refquant vs modelopt {_modelopt_version()}, device {device}",
        f"{'recipe':30} {'quantizers':>14} {'logits [fake-quant ops differing]':>34} {'export tensors':>18} {'configs':>8} {'reload':>7} {'fake!=export weights (fused amax)':>34}",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{r['recipe']:30} ERROR {r['error']}")
            continue
        q, x, lg = r["quantizers"], r["export"], r["logits"]
        quant = f"{_mark(q['ok'])} {q['enabled']}/{q['compared']}"
        if "skipped" in lg:
            logit = "n/a (no GPU)"
        else:
            ops = r["fake_quant_ops"]
            logit = "same" if lg["identical"] else f"DIFF {lg['differing']}/{lg['elements']}"
            logit += f" [ops w{ops['weight_elements_differing']} a{ops['activation_elements_differing']}]"
        bad = len(x["mismatched"]) + len(x["only_refquant"]) + len(x["only_modelopt"])
        tensors = f"{_mark(not bad)} {x['tensors'] - len(x['only_modelopt']) - len(x['mismatched'])}/{x['tensors']}"
        configs = _mark(x["hf_quant_config_equal"] and not x["config_json_keys_differ"])
        fv = r["fake_vs_compressed"]
        lines.append(
            f"{r['recipe']:30} {quant:>14} {logit:>34} {tensors:>18} {configs:>8} {_mark(r['reload']['identical']):>7} "
            f"{fv['weight_elements_differing']:>9}/{fv['weight_elements']} ({fv['weight_elements_differing_with_fused_amax']})"
        )
    return "\n".join(lines)


def _modelopt_version() -> str:
    try:
        import modelopt

        return modelopt.__version__
    except Exception:  # noqa: BLE001 - only for the header
        return "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="modelopt")
    batches = calibration_batches(args.seed + 1, args.batches, 2, 64)
    eval_batch = calibration_batches(args.seed + 2, 1, 2, 64)[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            try:
                results.append(run_recipe(recipe, args, batches, eval_batch, Path(tmp)))
            except Exception as error:  # noqa: BLE001 - report and go on with the next recipe
                import traceback

                traceback.print_exc()
                results.append({"recipe": recipe, "error": f"{type(error).__name__}: {error}", "ok": False})
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    fp8_path = "eager (CPU)"
    if args.device.startswith("cuda"):
        from modelopt.torch.quantization.extensions import get_cuda_ext_fp8

        # docs/modelopt_behaviour.md §1.1: with its CUDA extension modelopt's FP8 fake quant is
        # "modelopt-cuda"; without, eager
        fp8_path = "CUDA extension" if get_cuda_ext_fp8() is not None else "eager fallback (no extension)"
    print(f"modelopt FP8 fake quant path: {fp8_path}")
    print(table(results, device_name))
    if args.json:
        document = {
            "device": device_name,
            "torch": torch.__version__,
            "modelopt": _modelopt_version(),
            "modelopt_fp8_fake_quant": fp8_path,
            "results": results,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
