"""The family matrix against modelopt 0.47, every recipe, on the CPU or a GPU, as a table and JSON.

For each family of tests/modelopt_compare.py (FAMILIES: the dense families and the MoE ones) and
each recipe: a tiny seeded model quantized and exported by refquant and by modelopt, then compared
(quantizer names, flags and amax bits; logits bit for bit; every exported tensor;
hf_quant_config.json and config.json). refquant's flavor follows the device ("modelopt-cpu" on a
CPU, "modelopt-cuda" on a GPU), its backend is --backend. On a CPU the NVFP4 recipes' logits are not
compared (modelopt's NVFP4 fake quant is a Triton kernel); on a GPU every recipe's are, and each
enabled quantizer of both models is also applied to the same tensors ("fake-quant ops"), to tell a
per-operation difference from its spread. Needs nvidia-modelopt 0.47 (requirements-modelopt.txt).
Exit status 0 only if every row is equal.

    python3 scripts/compare_families.py --family gemma3 --device cpu
    python3 scripts/compare_families.py --family moe --device cuda --backend compiled
    python3 scripts/compare_families.py --family all --device cuda --json families_cuda.json
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import modelopt_compare as mc  # noqa: E402

from refquant.quant.recipe import shipped_recipes  # noqa: E402

RECIPES = tuple(shipped_recipes())


def modelopt_fp8_path(device: str) -> str:
    """Which FP8 fake quant modelopt runs (docs/modelopt_behaviour.md §1.1)."""
    if not device.startswith("cuda"):
        return "eager (CPU)"
    from modelopt.torch.quantization.extensions import get_cuda_ext_fp8

    return "CUDA extension" if get_cuda_ext_fp8() is not None else "eager fallback (no extension)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", default=["all"],
                        help=f"'all', 'dense', 'moe' or any of: {', '.join(mc.FAMILIES)}")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="reference", choices=("reference", "compiled"), help="refquant's backend")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=2, help="calibration batches (2 x --seq tokens each)")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--json", type=Path, help="write every row's full comparison here")
    args = parser.parse_args(argv)
    groups = {"all": list(mc.FAMILIES), "dense": list(mc.DENSE_FAMILIES), "moe": list(mc.MOE_FAMILIES)}
    families = [name for group in args.family for name in groups.get(group, [group])]
    unknown = [name for name in families if name not in mc.FAMILIES]
    if unknown:
        parser.error(f"unknown family {', '.join(unknown)}; the families are {', '.join(mc.FAMILIES)} (or 'all', 'dense', 'moe')")
    warnings.filterwarnings("ignore")
    batches = mc.calibration_batches(args.seed + 1, args.batches, 2, args.seq)
    eval_batch = mc.calibration_batches(args.seed + 2, 1, 2, args.seq)[0]
    on_gpu = args.device.startswith("cuda")

    results, errors = [], []
    for family in families:
        for recipe in args.recipes:
            try:
                result = mc.compare_family(family, recipe, device=args.device, backend=args.backend, seed=args.seed,
                                           batches=batches, eval_batch=eval_batch, fake_quant_ops=on_gpu)
            except Exception as error:  # noqa: BLE001 - report it and go on with the next row
                traceback.print_exc()
                errors.append({"family": family, "recipe": recipe, "error": f"{type(error).__name__}: {error}"})
                continue
            results.append(result)
            if not result.ok:
                print(result.summary(), file=sys.stderr)

    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    fp8_path = modelopt_fp8_path(args.device)
    import modelopt

    print(f"refquant ({args.backend}) vs modelopt {modelopt.__version__} on {device_name} (torch {torch.__version__}); "
          f"modelopt FP8 fake quant: {fp8_path}")
    print(mc.matrix_table(results))
    for error in errors:
        print(f"| {error['family']} | {error['recipe']} | ERROR {error['error']} |")
    if args.json:
        document = {
            "device": device_name,
            "backend": args.backend,
            "torch": torch.__version__,
            "modelopt": modelopt.__version__,
            "modelopt_fp8_fake_quant": fp8_path,
            "rows": [result.row() for result in results],
            "results": [result.to_dict() for result in results],
            "errors": errors,
        }
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return 0 if results and not errors and all(result.ok for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
