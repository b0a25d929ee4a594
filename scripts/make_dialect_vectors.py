"""Run each stack's own NVFP4 / FP8 code on fixed seeded inputs and save what it computed, as test
vectors for refquant.dialects (tests/test_dialect_vectors.py; docs/dialects.md):

    python3 scripts/make_dialect_vectors.py --stack torchao --out /tmp/v
    python3 scripts/make_dialect_vectors.py --stack compressed-tensors --out /tmp/v
    python3 scripts/make_dialect_vectors.py --stack transformer-engine --te-root DIR --out /tmp/v
    python3 scripts/pack_vectors.py /tmp/v/dialect_*.pt

Needs the stack installed where Python finds it (`--path DIR` puts a `pip install --target DIR`
folder first on sys.path); none of them is needed by the tests. Versions used for the shipped
files: torchao 0.18.0, compressed-tensors 0.19.0 with llmcompressor 0.14.0.1 (its pin),
transformer_engine 2.20.2 (the pure-Python wheel, unpacked: `--te-root` is the folder holding
its `transformer_engine/`). No stack runs a CUDA kernel here: each is called on its CPU path.

- torchao: NVFP4Tensor.to_nvfp4 (per-tensor scale from per_tensor_amax_to_scale, PyTorch path) and
  .dequantize(); the swizzled scales of to_nvfp4(is_swizzled_scales=True); Float8Tensor.from_hp
  (PerTensor and PerRow, KernelPreference.TORCH) and .dequantize().
- compressed-tensors: llmcompressor's MemorylessMinMaxObserver on the weight (its files loaded
  without llmcompressor's package __init__, which needs `datasets`), get_qparams, the scale kept
  in a parameter of the weight's dtype as initialize.py makes it, then fake_quantize and
  NVFP4PackedCompressor.compress (schemes NVFP4, FP8 and FP8_DYNAMIC).
- transformer-engine: NVFP4QuantizerRef (1x16, and 16x16 tiles) and CurrentScalingQuantizerRef from
  pytorch/custom_recipes, with the two TE modules they import for base classes replaced by stand-ins
  (they hold no numerics); and NVFP4QuantizerRef._recover_swizzled_scales.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import sys
import types
from functools import lru_cache
from pathlib import Path

import torch

SEED = 20261206
BLOCK = 16
EXHAUSTIVE = "bf16_every_finite_pattern"


@lru_cache(maxsize=None)  # one tensor object, so torch.save stores it once for all its cases
def every_finite_bf16() -> torch.Tensor:
    """The 65,280 finite bf16 patterns in bit order, as (4080, 16) blocks (NaN and +-inf left out)."""
    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return patterns[torch.isfinite(patterns)].reshape(-1, BLOCK)


@lru_cache(maxsize=None)
def edge_blocks() -> torch.Tensor:
    """(16, 64) bf16 rows of blocks made to hit each stack's edges: zero blocks, -0.0, E2M1 ties
    under scale 1 (amax 6 in the block, global amax 2688), bf16 subnormals, a tiny and a huge block."""
    gen = torch.Generator().manual_seed(SEED)
    rows = torch.randn(16, 64, generator=gen)
    ties = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 0.1])
    rows[0] = 0.0
    rows[1, :16] = -0.0
    rows[1, 16:32] = torch.tensor([-0.0, 0.0] * 8)
    rows[2, :16] = ties
    rows[2, 16:32] = -ties
    rows[3, :16] = ties * 1.0000001
    rows[4] = rows[4] * 2.0**-130  # bf16 subnormals
    rows[5, :16] = 2.0**-133
    rows[6] = rows[6] * 1e-30
    rows[7] = rows[7] * 1e30
    rows[8, :16] = torch.tensor([-6.0] + [-0.05] * 15)
    return rows.bfloat16()


def nvfp4_inputs() -> list[tuple[str, torch.Tensor, float | None]]:
    """(name, x, global amax or None for max|x|)."""
    gen = torch.Generator().manual_seed(SEED + 1)
    weights = torch.randn(64, 256, generator=gen) * 0.02
    activations = torch.randn(32, 128, generator=gen) * 3
    cases = [
        ("bf16_weights_64x256", weights.bfloat16(), None),
        ("bf16_weights_64x256_amax_half", weights.bfloat16(), float(weights.bfloat16().abs().max()) / 2),
        ("bf16_activations_32x128", activations.bfloat16(), None),
        ("fp32_activations_32x128", activations, None),
        ("fp16_activations_32x128", activations.half(), None),
        ("bf16_edge_blocks", edge_blocks(), None),
        ("bf16_edge_blocks_amax_2688", edge_blocks(), 2688.0),
        ("bf16_every_finite_pattern", every_finite_bf16(), None),
        ("bf16_every_finite_pattern_amax_1", every_finite_bf16(), 1.0),
    ]
    return cases


def fp8_inputs() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(SEED + 2)
    return [
        ("bf16_weights_64x256", (torch.randn(64, 256, generator=gen) * 0.02).bfloat16()),
        ("fp32_activations_32x128", torch.randn(32, 128, generator=gen) * 3),
        ("fp16_activations_32x128", (torch.randn(32, 128, generator=gen) * 3).half()),
        ("bf16_edge_blocks", edge_blocks()),
        ("bf16_every_finite_pattern", every_finite_bf16()),
    ]


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """float8 tensors are saved as their uint8 bit patterns (the vector files' convention)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


# ------------------------------------------------------------------------------------------------
# torchao
# ------------------------------------------------------------------------------------------------


def torchao_cases() -> tuple[list[dict], dict]:
    import torchao
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    from torchao.prototype.mx_formats.utils import to_blocked
    from torchao.quantization.granularity import PerRow, PerTensor
    from torchao.quantization.quantize_.common import KernelPreference
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    cases = []
    for name, x, amax in nvfp4_inputs():
        if x.dtype == torch.float16:
            continue  # torchao's NVFP4 takes bf16 and fp32 only
        global_amax = x.abs().amax().float() if amax is None else torch.tensor(amax, dtype=torch.float32)
        per_tensor_scale = per_tensor_amax_to_scale(global_amax)
        tensor = NVFP4Tensor.to_nvfp4(x.contiguous(), per_tensor_scale=per_tensor_scale)
        case = {"name": f"nvfp4_{name}", "format": "nvfp4", "x": x, "global_amax": None if amax is None else global_amax,
                "global_scale": per_tensor_scale, "block_scale": as_bits(tensor.scale), "packed": tensor.qdata}
        if name != f"{EXHAUSTIVE}_amax_1":  # keeps the file small: codes and scales only
            case["dequantized"] = tensor.dequantize(x.dtype)
        cases.append(case)
    gen = torch.Generator().manual_seed(SEED + 3)
    for rows, blocks in ((200, 7), (128, 4), (3, 9)):
        scales = torch.randint(0, 127, (rows, blocks), generator=gen, dtype=torch.uint8).view(torch.float8_e4m3fn)
        cases.append({"name": f"swizzle_{rows}x{blocks}", "format": "layout", "linear": as_bits(scales),
                      "swizzled": as_bits(to_blocked(scales).flatten())})
    for name, x in fp8_inputs():
        for granularity in ("per_tensor", "per_row"):
            if granularity == "per_row" and name == EXHAUSTIVE:
                continue  # keeps the file small: the exhaustive input runs per tensor
            tensor = Float8Tensor.from_hp(x, granularity=PerTensor() if granularity == "per_tensor" else PerRow(),
                                          kernel_preference=KernelPreference.TORCH)
            cases.append({"name": f"fp8_{granularity}_{name}", "format": "fp8", "x": x, "per_row": granularity == "per_row",
                          "scale": tensor.scale, "data": as_bits(tensor.qdata), "dequantized": tensor.dequantize(x.dtype)})
    return cases, {"stack": "torchao", "torchao_version": torchao.__version__}


# ------------------------------------------------------------------------------------------------
# compressed-tensors + llm-compressor's observers
# ------------------------------------------------------------------------------------------------


def _load_llmcompressor_observers():
    """llmcompressor.observers.min_max without llmcompressor/__init__.py (it imports `datasets`)."""
    spec = importlib.util.find_spec("llmcompressor")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llmcompressor is not importable: pip install --no-deps llmcompressor (and compressed-tensors).")
    root = Path(list(spec.submodule_search_locations)[0])
    for name, path in (("llmcompressor", root), ("llmcompressor.observers", root / "observers")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    return importlib.import_module("llmcompressor.observers.min_max"), root


def _observe(observer_class, args, weight: torch.Tensor) -> dict:
    observer = observer_class(base_name="weight", args=args)
    observer(weight)
    qparams = observer.get_qparams()
    # initialize.py keeps the scale in a parameter of the observed dtype; update_qparams copies into it.
    qparams["scale"] = qparams["scale"].to(weight.dtype)
    # ... and registers a zero point only for asymmetric schemes (force_zero_point is off for weights).
    if args.symmetric:
        qparams["zero_point"] = None
    return qparams


def compressed_tensors_cases() -> tuple[list[dict], dict]:
    import compressed_tensors
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize, quantize

    min_max, root = _load_llmcompressor_observers()
    llmcompressor_version = next((p.name for p in root.parent.glob("llmcompressor-*.dist-info")), "unknown")
    observer_class = min_max.MemorylessMinMaxObserver
    cases = []
    nvfp4 = preset_name_to_scheme("NVFP4", ["Linear"])
    for name, x, amax in nvfp4_inputs():
        if amax is not None:
            continue  # the observer takes its amax from the weight
        qparams = _observe(observer_class, nvfp4.weights, x)
        fake = fake_quantize(x=x, scale=qparams["scale"], zero_point=qparams["zero_point"], args=nvfp4.weights,
                             global_scale=qparams["global_scale"])
        state = NVFP4PackedCompressor.compress({"weight": x, "weight_scale": qparams["scale"],
                                                "weight_global_scale": qparams["global_scale"]}, nvfp4)
        cases.append({"name": f"nvfp4_{name}", "format": "nvfp4", "x": x, "global_amax": None,
                      "global_scale": state["weight_global_scale"].reshape(()), "block_scale": as_bits(state["weight_scale"]),
                      "packed": state["weight_packed"], "dequantized": fake})
    for preset, per_channel in (("FP8", False), ("FP8_DYNAMIC", True)):
        scheme = preset_name_to_scheme(preset, ["Linear"])
        for name, x in fp8_inputs():
            if per_channel and name == EXHAUSTIVE:
                continue  # keeps the file small: the exhaustive input runs per tensor
            qparams = _observe(observer_class, scheme.weights, x)
            data = quantize(x=x, scale=qparams["scale"], zero_point=qparams["zero_point"], args=scheme.weights,
                            dtype=torch.float8_e4m3fn)
            fake = fake_quantize(x=x, scale=qparams["scale"], zero_point=qparams["zero_point"], args=scheme.weights)
            cases.append({"name": f"fp8_{preset.lower()}_{name}", "format": "fp8", "x": x, "per_channel": per_channel,
                          "scale": qparams["scale"], "data": as_bits(data), "dequantized": fake})
    return cases, {"stack": "compressed-tensors", "compressed_tensors_version": compressed_tensors.__version__,
                   "llmcompressor": llmcompressor_version}


# ------------------------------------------------------------------------------------------------
# TransformerEngine's PyTorch reference
# ------------------------------------------------------------------------------------------------


def _load_te_reference(te_root: Path):
    """pytorch/custom_recipes/reference_*.py from an unpacked transformer_engine wheel. The two TE
    modules they import for base classes (quantized_tensor: Quantizer, QuantizedTensorStorage;
    tensor.utils: is_custom) load the compiled library, so they are replaced by stand-ins that hold
    only what the reference's constructors use; every number the reference computes is its own."""
    recipes = te_root / "transformer_engine" / "pytorch" / "custom_recipes"
    if not (recipes / "reference_nvfp4.py").exists():
        raise SystemExit(f"{recipes}/reference_nvfp4.py not found: pass --te-root, the folder holding transformer_engine/.")

    class Quantizer:
        def __init__(self, rowwise=True, columnwise=True):
            self.rowwise_usage, self.columnwise_usage = rowwise, columnwise

    stand_ins = {
        "transformer_engine": {"__path__": [str(te_root / "transformer_engine")]},
        "transformer_engine.pytorch": {"__path__": [str(te_root / "transformer_engine" / "pytorch")]},
        "transformer_engine.pytorch.custom_recipes": {"__path__": [str(recipes)]},
        "transformer_engine.pytorch.quantized_tensor": {"Quantizer": Quantizer, "QuantizedTensorStorage": object},
        "transformer_engine.pytorch.tensor": {"__path__": []},
        "transformer_engine.pytorch.tensor.utils": {"is_custom": lambda *_: True},
    }
    for name, attributes in stand_ins.items():
        module = types.ModuleType(name)
        for key, value in attributes.items():
            setattr(module, key, value)
        sys.modules[name] = module
    nvfp4 = importlib.import_module("transformer_engine.pytorch.custom_recipes.reference_nvfp4")
    current = importlib.import_module("transformer_engine.pytorch.custom_recipes.reference_current_scaling")
    version = next((p.name for p in te_root.glob("transformer_engine-*.dist-info")), "unknown")
    return nvfp4, current, version


def transformer_engine_cases(te_root: Path) -> tuple[list[dict], dict]:
    nvfp4, current, version = _load_te_reference(te_root)
    cases = []
    for name, x, amax in nvfp4_inputs():
        if amax is not None:
            continue  # the quantizer takes its amax from the tensor
        for tile in ((1, 16), (16, 16)):
            if tile[0] > 1 and x.shape[0] % 16:
                continue
            quantizer = nvfp4.NVFP4QuantizerRef(dtype=nvfp4.reference_utils.Fp4Formats.E2M1, rowwise=True,
                                                columnwise=False, quant_tile_shape=tile, with_rht=False)
            result = quantizer.quantize(x)
            amax_row = result.global_amax_row.reshape(())
            encode = torch.minimum(torch.tensor(2688.0) / amax_row, torch.tensor(torch.finfo(torch.float32).max))
            cases.append({"name": f"nvfp4_{tile[0]}x{tile[1]}_{name}", "format": "nvfp4", "x": x, "global_amax": None,
                          "tile_rows": tile[0], "global_amax_row": amax_row, "global_scale": encode,
                          "block_scale": as_bits(result.scale), "packed": result.data})
    gen = torch.Generator().manual_seed(SEED + 3)
    for rows, blocks in ((200, 7), (128, 4), (3, 9)):
        swizzled = torch.randint(0, 127, (-(-rows // 128) * 128 * (-(-blocks // 4) * 4),), generator=gen, dtype=torch.uint8)
        linear = nvfp4.NVFP4QuantizerRef._recover_swizzled_scales(True, swizzled, rows, blocks * 16, 16)
        cases.append({"name": f"unswizzle_{rows}x{blocks}", "format": "layout", "linear": linear.contiguous(),
                      "swizzled": swizzled})
    for name, x in fp8_inputs():
        quantizer = current.CurrentScalingQuantizerRef(dtype=torch.float8_e4m3fn, rowwise=True, columnwise=False)
        data, scale_inv, _, _ = quantizer._quantize(x)
        cases.append({"name": f"fp8_{name}", "format": "fp8", "x": x, "scale": scale_inv.reshape(()),
                      "data": as_bits(data)})
    return cases, {"stack": "transformer-engine", "transformer_engine_version": version}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stack", required=True, choices=("torchao", "compressed-tensors", "transformer-engine"))
    parser.add_argument("--path", type=Path, action="append", default=[], help="a folder to put first on sys.path")
    parser.add_argument("--te-root", type=Path, help="folder holding an unpacked transformer_engine wheel")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for path in reversed(args.path):
        sys.path.insert(0, str(path))
    if args.stack == "torchao":
        cases, meta = torchao_cases()
    elif args.stack == "compressed-tensors":
        cases, meta = compressed_tensors_cases()
    else:
        if args.te_root is None:
            parser.error("--stack transformer-engine needs --te-root")
        cases, meta = transformer_engine_cases(args.te_root)
    meta.update({"kind": "dialect", "generator": "scripts/make_dialect_vectors.py", "torch_version": torch.__version__,
                 "python_version": platform.python_version(), "device": "cpu", "seed": str(SEED)})
    meta = {key: str(value) for key, value in meta.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"dialect_{args.stack.replace('-', '_')}.pt"
    torch.save({"meta": meta, "cases": cases}, path)
    print(f"{path}: {len(cases)} cases")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
