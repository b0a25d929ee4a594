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
from refquant.hf.export import CompressedWeightQuantizer, read_checkpoint_tensors
from refquant.hf.models import build_builtin_model
from refquant.quant.recipe import shipped_recipes

RECIPES = tuple(shipped_recipes())  # the six shipped TOML recipes
# refquant's recipe names -> modelopt 0.47's (renamed "*-kv_*"); None: not shipped by modelopt,
# built from its units (see modelopt_quant_cfg).
MODELOPT_RECIPES = {
    "fp8_default-fp8_cast_kv": "general/ptq/fp8_default-kv_fp8_cast",
    "nvfp4_default-fp8_cast_kv": "general/ptq/nvfp4_default-kv_fp8_cast",
    "nvfp4_default-nvfp4_cast_kv": "general/ptq/nvfp4_default-kv_nvfp4_cast",
    "fp8_default-fp8_kv": "general/ptq/fp8_default-kv_fp8",
    "nvfp4_default-fp8_kv": "general/ptq/nvfp4_default-kv_fp8",
    "nvfp4_default-nvfp4_kv": None,
}
KV_PATTERN = "*[kv]_bmm_quantizer"


def modelopt_quant_cfg(recipe: str) -> dict:
    """The quant_cfg modelopt uses for `recipe`. nvfp4_default-nvfp4_kv is the NVFP4 body with the
    calibrated kv_nvfp4 unit in the KV slot: nvfp4_default-kv_nvfp4_cast with its KV entry's cfg
    replaced by the unit's (docs/modelopt_behaviour.md §7.5)."""
    from modelopt.recipe import load_recipe
    from modelopt.torch.opt.config_loader import load_config

    name = MODELOPT_RECIPES[recipe]
    if name is not None:
        return load_recipe(name).quantize.model_dump()
    config = load_recipe("general/ptq/nvfp4_default-kv_nvfp4_cast").quantize.model_dump()
    (unit,) = load_config("configs/ptq/units/kv_nvfp4")
    entries = [e for e in config["quant_cfg"] if e["quantizer_name"] == KV_PATTERN]
    assert len(entries) == 1, entries
    entries[0]["cfg"] = unit.cfg.model_dump()
    assert entries[0]["cfg"]["use_constant_amax"] is False
    return config


def calibration_batches(seed: int, count: int, batch: int, seq: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (batch, seq), generator=generator) for _ in range(count)]


def quantizer_table(model) -> dict:
    from modelopt.torch.quantization.nn import TensorQuantizer as MOQuantizer

    table = {}
    for name, module in model.named_modules():
        if isinstance(module, (rq.TensorQuantizer, MOQuantizer)):
            if getattr(module, "_use_constant_amax", False):
                amax = torch.tensor(448.0)  # modelopt's _get_amax; its .amax property is None
            else:
                amax = module.amax if module.is_enabled else getattr(module, "_amax", None)
            table[name] = (bool(module.is_enabled), None if amax is None else amax.detach().cpu())
    return table


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(_bytes(a), _bytes(b))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def compare_quantizers(rq_model, mo_model) -> dict:
    ours, theirs = quantizer_table(rq_model), quantizer_table(mo_model)
    result = {
        "only_refquant": sorted(set(ours) - set(theirs)),
        "only_modelopt": sorted(set(theirs) - set(ours)),
        "enabled_mismatch": [],
        "amax_mismatch": [],
    }
    for name in sorted(set(ours) & set(theirs)):
        (on_a, amax_a), (on_b, amax_b) = ours[name], theirs[name]
        if on_a != on_b:
            result["enabled_mismatch"].append(name)
        if on_a and on_b and not (amax_a is None and amax_b is None):
            if amax_a is None or amax_b is None or not same_bits(amax_a, amax_b):
                result["amax_mismatch"].append(f"{name}: refquant {amax_a} vs modelopt {amax_b}")
    result["compared"] = len(set(ours) & set(theirs))
    result["enabled"] = sum(on for on, _ in ours.values())
    result["ok"] = not any(result[k] for k in ("only_refquant", "only_modelopt", "enabled_mismatch", "amax_mismatch"))
    return result


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch.to(next(model.parameters()).device)).logits.detach().float().cpu()


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> dict:
    differ = a != b
    return {
        "identical": bool(not differ.any()),
        "elements": a.numel(),
        "differing": int(differ.sum()),
        "max_abs_diff": float((a - b).abs().max()),
    }


def compare_fake_quant_ops(rq_model, mo_model, batch) -> dict:
    """Each enabled quantizer of both models applied to the same tensor (what refquant's quantizer
    received in one forward): elements that differ, weights and activations apart. Separates
    per-operation differences from their spread through the network."""
    ours = {n: q for n, q in rq_model.named_modules() if isinstance(q, rq.TensorQuantizer) and q.is_enabled}
    theirs = dict(mo_model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        q.register_forward_pre_hook(lambda module, args, name=name: captured.setdefault(name, args[0].detach().clone()))
        for name, q in ours.items()
    ]
    try:
        logits_of(rq_model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    totals = {"weights": [0, 0], "activations": [0, 0]}
    worst: list[tuple[int, str]] = []
    with torch.no_grad():
        for name, x in captured.items():
            a, b = ours[name](x), theirs[name](x)
            differing = int((a != b).sum())
            kind = "weights" if name.endswith("weight_quantizer") else "activations"
            totals[kind][0] += differing
            totals[kind][1] += x.numel()
            if differing:
                worst.append((differing, name))
    return {
        "weight_elements_differing": totals["weights"][0],
        "weight_elements": totals["weights"][1],
        "activation_elements_differing": totals["activations"][0],
        "activation_elements": totals["activations"][1],
        "quantizers_with_differences": [f"{name}: {count}" for count, name in sorted(worst, reverse=True)[:8]],
    }


def compare_exports(ours: Path, theirs: Path) -> dict:
    a, b = read_checkpoint_tensors(ours), read_checkpoint_tensors(theirs)
    mismatched = []
    for key in sorted(set(a) & set(b)):
        if not same_bits(a[key], b[key]):
            differing = None
            if a[key].shape == b[key].shape and a[key].dtype == b[key].dtype:
                differing = int((_bytes(a[key]) != _bytes(b[key])).sum())
            mismatched.append(
                f"{key}: refquant {a[key].dtype}{tuple(a[key].shape)} vs modelopt {b[key].dtype}{tuple(b[key].shape)}"
                + (f", {differing} bytes differ" if differing is not None else "")
            )
    hf_a, hf_b = (json.loads((d / "hf_quant_config.json").read_text()) for d in (ours, theirs))
    config_a, config_b = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    config_diff = sorted(k for k in set(config_a) | set(config_b) if config_a.get(k) != config_b.get(k))
    result = {
        "tensors": len(b),
        "only_refquant": sorted(set(a) - set(b)),
        "only_modelopt": sorted(set(b) - set(a)),
        "mismatched": mismatched,
        "hf_quant_config_equal": hf_a == hf_b,
        "config_json_keys_differ": config_diff,
        "files_refquant": sorted(p.name for p in ours.iterdir()),
        "files_modelopt": sorted(p.name for p in theirs.iterdir()),
    }
    result["ok"] = not (result["only_refquant"] or result["only_modelopt"] or mismatched or config_diff) and result["hf_quant_config_equal"]
    return result


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
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    device = torch.device(args.device)
    flavor = "modelopt-cuda" if device.type == "cuda" else "modelopt-cpu"
    started = time.perf_counter()
    rq_model = build_builtin_model(seed=args.seed).to(device)
    rq.quantize_model(rq_model, rq.load_recipe(recipe), batches, flavor=flavor, progress=False)
    mo_model = build_builtin_model(seed=args.seed).to(device)
    mo_model.config.architectures = [type(mo_model).__name__]  # modelopt's export reads it

    def forward_loop(model):
        for batch in batches:
            model(input_ids=batch.to(device))

    mtq.quantize(mo_model, modelopt_quant_cfg(recipe), forward_loop)
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf_checkpoint(mo_model, export_dir=theirs)  # changes mo_model (fusion, packed weights)
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
