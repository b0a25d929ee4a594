"""Run each stack's own NVFP4 / FP8 / MX code on fixed seeded inputs and save what it computed, as
test vectors for refquant.dialects (tests/test_dialect_vectors.py; docs/dialects.md):

    python3 scripts/make_dialect_vectors.py --stack torchao --out /tmp/v
    python3 scripts/make_dialect_vectors.py --stack compressed-tensors --out /tmp/v
    python3 scripts/make_dialect_vectors.py --stack transformer-engine --te-root DIR --out /tmp/v
    python3 scripts/make_dialect_vectors.py --stack microxcaling --path DIR --out /tmp/v
    python3 scripts/make_dialect_vectors.py --stack modelopt --out /tmp/v
    python3 scripts/pack_vectors.py /tmp/v/dialect_*.pt

Needs the stack installed where Python finds it (`--path DIR` puts a `pip install --target DIR`
folder first on sys.path); none of them is needed by the tests. Versions used for the shipped
files: torchao 0.18.0, compressed-tensors 0.19.0 with llmcompressor 0.14.0.1 (its pin),
transformer_engine 2.20.2 (the pure-Python wheel, unpacked: `--te-root` is the folder holding
its `transformer_engine/`), microxcaling at commit 7bc41952 (github microsoft/microxcaling, not on
PyPI: `--path` is a folder holding its `mx/`, and a file COMMIT naming the commit), modelopt
0.47.0. No stack runs a CUDA kernel here: each is called on its CPU path.

The bf16-pattern inputs are not stored: a case names its recipe, shape and sha256 instead
(`recipe_input`), and the tests rebuild it.

- torchao: NVFP4Tensor.to_nvfp4 (per-tensor scale from per_tensor_amax_to_scale, PyTorch path) and
  .dequantize(); the swizzled scales of to_nvfp4(is_swizzled_scales=True); Float8Tensor.from_hp
  (PerTensor and PerRow, KernelPreference.TORCH) and .dequantize(); MXTensor.to_mx (every
  ScaleCalculationMode; E4M3, E5M2, E2M1) and .dequantize(), and its swizzled E8M0 scales.
- microxcaling: mx_ops.quantize_mx_op with finalize_mx_specs' defaults (custom_cuda off).
- modelopt: MXFP4QTensor and MXFP8QTensor, quantize and dequantize.
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
import hashlib
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
MX_BLOCK = 32
EXHAUSTIVE = "bf16_every_finite_pattern"
EVERY_PATTERN = "bf16_every_pattern"


def recipe_input(recipe: str, columns: int) -> dict:
    """The keys of a case whose x is generated rather than stored: the recipe's name, the shape and
    the sha256 of x's bytes (tests/conftest.py vector_input rebuilds x and checks the hash). The
    65,536 bf16 patterns cost ~85 KB in each file compressed, and are one line of arithmetic."""
    x = recipe_tensor(recipe, columns)
    digest = hashlib.sha256(x.view(torch.int16).numpy().tobytes()).hexdigest()
    return {"x_recipe": recipe, "x_shape": list(x.shape), "x_sha256": digest}


@lru_cache(maxsize=None)
def recipe_tensor(recipe: str, columns: int) -> torch.Tensor:
    """bf16_every_finite_pattern: the 65,280 finite bf16 patterns in bit order (NaN and +-inf left
    out); bf16_every_pattern: all 65,536; as (-1, columns)."""
    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    if recipe == EXHAUSTIVE:
        patterns = patterns[torch.isfinite(patterns)]
    return patterns.reshape(-1, columns)


def with_x(case: dict, name: str, x: torch.Tensor) -> dict:
    """case with its input: stored, or for the exhaustive inputs their recipe."""
    if name.startswith(EVERY_PATTERN) or name.startswith(EXHAUSTIVE):
        recipe = EVERY_PATTERN if name.startswith(EVERY_PATTERN) else EXHAUSTIVE
        return {**case, **recipe_input(recipe, x.shape[-1])}
    return {**case, "x": x}


# The weights' seed: the first offset from SEED whose weights (and their amax / 2) hit the rare
# elements where torchao's and TransformerEngine's NVFP4 reciprocals part (a few in 8,192), so the
# vectors hold that step too.
WEIGHTS_SEED = SEED + 17


@lru_cache(maxsize=None)  # one tensor object per input, so torch.save stores each once for all its cases
def random_inputs() -> dict[str, torch.Tensor]:
    """Seeded weights (bf16, std 0.02) and activations (fp32 std 3, and as fp16): the same tensors
    for NVFP4, FP8 and MX. Small: the exhaustive bf16 input covers every bf16 step; these keep
    realistic blocks, fp32's own roundings and fp16."""
    activations = torch.randn(16, 128, generator=torch.Generator().manual_seed(SEED + 1)) * 3
    weights = torch.randn(32, 256, generator=torch.Generator().manual_seed(WEIGHTS_SEED)) * 0.02
    return {
        "bf16_weights_32x256": weights.bfloat16(),
        "fp32_activations_16x128": activations,
        "fp16_activations_16x128": activations.half(),
    }


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


def ties(neighbours: list[tuple[float, float]]) -> list[float]:
    """The midpoint of each pair of neighbouring element values, and its negative."""
    mids = [(a + b) / 2 for a, b in neighbours]
    return mids + [-m for m in mids]


@lru_cache(maxsize=None)
def mx_edge_blocks() -> torch.Tensor:
    """(16, 64) bf16 rows, blocks of 32, at the MX stacks' edges: zero and -0.0 blocks; the
    rounding ties of E2M1 (block max 6), E4M3 (448) and E5M2 (57344), each of which gives scale 1
    under floor and ceil rules alike (with the saturation midpoints 464 and 61440); values just
    under a tie (microxcaling rounds |v| + 0.5 in bf16); block maxima just under and just over a
    power of two (floor vs ceil; a bf16 log2 that rounds up); subnormal, tiny and huge blocks;
    small negatives that round to zero."""
    gen = torch.Generator().manual_seed(SEED + 4)
    rows = torch.randn(16, 64, generator=gen)
    e2m1 = [(0.0, 0.5), (0.5, 1.0), (1.0, 1.5), (1.5, 2.0), (2.0, 3.0), (3.0, 4.0), (4.0, 6.0)]
    e4m3 = [(0.0, 2.0**-9), (2.0**-9, 2.0**-8), (1.0, 1.125), (16.0, 18.0), (256.0, 288.0), (416.0, 448.0),
            (448.0, 480.0)]
    e5m2 = [(0.0, 2.0**-16), (2.0**-16, 2.0**-15), (1.0, 1.25), (40960.0, 49152.0), (49152.0, 57344.0),
            (57344.0, 65536.0)]
    just_under_a_quarter = [6.0, 0.2490234375, -0.2490234375, 0.248046875]
    rows[0] = 0.0
    rows[1, :32] = -0.0
    rows[1, 32:] = torch.tensor([-0.0, 0.0] * 16)
    rows[2, :32] = torch.tensor(([6.0] + ties(e2m1)) * 2 + [0.1, -0.1])
    rows[2, 32:] = torch.tensor([448.0] + ties(e4m3) + [0.3] * 17)
    rows[3, :32] = torch.tensor([57344.0] + ties(e5m2) + [0.3] * 19)
    rows[3, 32:] = torch.tensor(just_under_a_quarter + [0.3] * 28)
    rows[4] = rows[4] * 2.0**-130  # bf16 subnormals
    rows[5, :32] = 2.0**-133
    rows[5, 32:] = torch.tensor([448.0, 2.0**-20, -(2.0**-30), 2.0**-126] + [2.0**-10] * 28)
    rows[6] = rows[6] * 1e-30
    rows[7] = rows[7] * 1e30
    rows[8, :32] = torch.tensor([-6.0] + [-0.05] * 31)
    rows[8, 32:] = rows[8, 32:].clamp(-1, 1) * 255.0 / rows[8, 32:].abs().max()  # max 255: bf16 log2 gives 8
    rows[9, :32] = rows[9, :32].clamp(-1, 1) * 3.984375 / rows[9, :32].abs().max()
    rows[9, 32:] = rows[9, 32:].clamp(-1, 1) * 4.03125 / rows[9, 32:].abs().max()  # just over a power of two
    rows[10] = rows[10] * 2.0**100
    rows[11] = rows[11] * 2.0**-120
    return rows.bfloat16()


@lru_cache(maxsize=None)
def mx_fp32_edge_blocks() -> torch.Tensor:
    """(8, 64) fp32 rows, blocks of 32, at fp32's own MX edges: block maxima one fp32 step under a
    power of two far from 1 (torch.log2 rounds them up to the power: a floor one too high), maxima
    one step over max * 2**10 (amax / max one step over a power of two, whose fp32 log2 is the
    power: a ceil one too low), fp32 subnormal blocks, and values one step under a rounding tie
    (microxcaling's |v| + 0.5 rounds up)."""
    gen = torch.Generator().manual_seed(SEED + 5)
    rows = torch.randn(8, 64, generator=gen)
    one_under = lambda v: torch.nextafter(torch.tensor(v), torch.tensor(0.0)).item()  # noqa: E731
    one_over = lambda v: torch.nextafter(torch.tensor(v), torch.tensor(float("inf"))).item()  # noqa: E731
    for block, peak in enumerate((one_under(2.0**100), one_under(2.0**-100))):
        rows[0, 32 * block:32 * block + 32] = rows[0, 32 * block:32 * block + 32].clamp(-1, 1) * 0.5 * peak
        rows[0, 32 * block] = peak
    for block, peak in enumerate((one_over(448.0 * 2**10), one_over(6.0 * 2**10))):
        rows[1, 32 * block:32 * block + 32] = rows[1, 32 * block:32 * block + 32].clamp(-1, 1) * 0.5 * peak
        rows[1, 32 * block] = -peak
    rows[2, :32] = one_over(57344.0 * 2**10) * torch.linspace(-1, 1, 32)
    rows[2, 32:] = rows[2, 32:] * 2.0**-140  # fp32 subnormals
    rows[3, :32] = torch.tensor([6.0, one_under(0.25), one_under(0.75), -one_under(0.25)] + [0.3] * 28)
    rows[3, 32:] = torch.tensor([448.0, one_under(2.0**-10), one_under(1.0625), -one_under(17.0)] + [0.3] * 28)
    rows[4] = rows[4] * 1e-38
    rows[5] = rows[5] * 1e37
    return rows


def nvfp4_inputs() -> list[tuple[str, torch.Tensor, float | None]]:
    """(name, x, global amax or None for max|x|)."""
    inputs = random_inputs()
    weights = inputs["bf16_weights_32x256"]
    return [
        ("bf16_weights_32x256", weights, None),
        ("bf16_weights_32x256_amax_half", weights, float(weights.abs().max()) / 2),
        ("fp32_activations_16x128", inputs["fp32_activations_16x128"], None),
        ("fp16_activations_16x128", inputs["fp16_activations_16x128"], None),
        ("bf16_edge_blocks", edge_blocks(), None),
        ("bf16_edge_blocks_amax_2688", edge_blocks(), 2688.0),
        (EXHAUSTIVE, recipe_tensor(EXHAUSTIVE, BLOCK), None),
        (f"{EXHAUSTIVE}_amax_1", recipe_tensor(EXHAUSTIVE, BLOCK), 1.0),
    ]


def fp8_inputs() -> list[tuple[str, torch.Tensor]]:
    return [(name, x) for name, x in random_inputs().items()] + [
        ("bf16_edge_blocks", edge_blocks()),
        (EXHAUSTIVE, recipe_tensor(EXHAUSTIVE, BLOCK)),
    ]


def mx_inputs() -> list[tuple[str, torch.Tensor]]:
    """MX inputs, blocks of 32 along the last dim; fp16 ones only for the stacks that take fp16."""
    return [(name, x) for name, x in random_inputs().items()] + [
        ("bf16_mx_edge_blocks", mx_edge_blocks()),
        ("fp32_mx_edge_blocks", mx_fp32_edge_blocks()),
        (EXHAUSTIVE, recipe_tensor(EXHAUSTIVE, MX_BLOCK)),
        (EVERY_PATTERN, recipe_tensor(EVERY_PATTERN, MX_BLOCK)),
    ]


MX_ELEMENTS = ("e4m3", "e5m2", "e2m1")


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
        case = {"name": f"nvfp4_{name}", "format": "nvfp4", "global_amax": None if amax is None else global_amax,
                "global_scale": per_tensor_scale, "block_scale": as_bits(tensor.scale), "packed": tensor.qdata}
        if name != f"{EXHAUSTIVE}_amax_1":  # keeps the file small: codes and scales only
            case["dequantized"] = tensor.dequantize(x.dtype)
        cases.append(with_x(case, name, x))
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
            cases.append(with_x({"name": f"fp8_{granularity}_{name}", "format": "fp8", "per_row": granularity == "per_row",
                                 "scale": tensor.scale, "data": as_bits(tensor.qdata),
                                 "dequantized": tensor.dequantize(x.dtype)}, name, x))
    cases += torchao_mx_cases()
    return cases, {"stack": "torchao", "torchao_version": torchao.__version__}


def mx_case(name: str, input_name: str, x: torch.Tensor, element: str, scale: torch.Tensor | None,
            stored: torch.Tensor | None, dequantized: torch.Tensor | None, **options) -> dict:
    """An MX case: E8M0 scale bytes (uint8), the stored elements as bytes (E2M1 packed two a byte,
    FP8 bits), the stack's dequantized values, and the options it was called with."""
    case = {"name": name, "format": "mx", "element": element, **options}
    if scale is not None:
        case["scale"] = scale.contiguous().view(torch.uint8)
    if stored is not None:
        case["stored"] = stored.contiguous().view(torch.uint8)
    if dequantized is not None:
        case["dequantized"] = dequantized
    return with_x(case, input_name, x)


def torchao_mx_cases() -> list[dict]:
    """MXTensor.to_mx (the "torch" cast) in every ScaleCalculationMode and element format, with
    dequantize(); the exhaustive inputs keep codes and scales only (dequantize is one function of
    them, held to every other case) except under FLOOR, the default."""
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import MXTensor

    dtypes = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "e2m1": torch.float4_e2m1fn_x2}
    cases = []
    for name, x in mx_inputs():
        if x.dtype == torch.float16:
            continue  # to_mx takes bf16 and fp32 only
        for element, dtype in dtypes.items():
            for mode in ScaleCalculationMode:
                tensor = MXTensor.to_mx(x, dtype, 32, scaling_mode=mode)
                exhaustive = name in (EXHAUSTIVE, EVERY_PATTERN)
                dequantized = None if exhaustive and mode != ScaleCalculationMode.FLOOR else tensor.dequantize(x.dtype)
                cases.append(mx_case(f"mx_{element}_{mode.value}_{name}", name, x, element, tensor.scale, tensor.qdata,
                                     dequantized, scaling_mode=mode.value))
    weights = random_inputs()["bf16_weights_32x256"]
    linear = MXTensor.to_mx(weights, torch.float8_e4m3fn, 32).scale
    swizzled = MXTensor.to_mx(weights, torch.float8_e4m3fn, 32, is_swizzled_scales=True).scale
    cases.append({"name": "mx_swizzle_16x8", "format": "layout", "linear": linear.view(torch.uint8),
                  "swizzled": swizzled.reshape(-1).view(torch.uint8)})
    return cases


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
        cases.append(with_x({"name": f"nvfp4_{name}", "format": "nvfp4", "global_amax": None,
                             "global_scale": state["weight_global_scale"].reshape(()),
                             "block_scale": as_bits(state["weight_scale"]), "packed": state["weight_packed"],
                             "dequantized": fake}, name, x))
    for preset, per_channel in (("FP8", False), ("FP8_DYNAMIC", True)):
        scheme = preset_name_to_scheme(preset, ["Linear"])
        for name, x in fp8_inputs():
            if per_channel and name == EXHAUSTIVE:
                continue  # keeps the file small: the exhaustive input runs per tensor
            qparams = _observe(observer_class, scheme.weights, x)
            data = quantize(x=x, scale=qparams["scale"], zero_point=qparams["zero_point"], args=scheme.weights,
                            dtype=torch.float8_e4m3fn)
            fake = fake_quantize(x=x, scale=qparams["scale"], zero_point=qparams["zero_point"], args=scheme.weights)
            cases.append(with_x({"name": f"fp8_{preset.lower()}_{name}", "format": "fp8", "per_channel": per_channel,
                                 "scale": qparams["scale"], "data": as_bits(data), "dequantized": fake}, name, x))
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
            cases.append(with_x({"name": f"nvfp4_{tile[0]}x{tile[1]}_{name}", "format": "nvfp4", "global_amax": None,
                                 "tile_rows": tile[0], "global_amax_row": amax_row, "global_scale": encode,
                                 "block_scale": as_bits(result.scale), "packed": result.data}, name, x))
    gen = torch.Generator().manual_seed(SEED + 3)
    for rows, blocks in ((200, 7), (128, 4), (3, 9)):
        swizzled = torch.randint(0, 127, (-(-rows // 128) * 128 * (-(-blocks // 4) * 4),), generator=gen, dtype=torch.uint8)
        linear = nvfp4.NVFP4QuantizerRef._recover_swizzled_scales(True, swizzled, rows, blocks * 16, 16)
        cases.append({"name": f"unswizzle_{rows}x{blocks}", "format": "layout", "linear": linear.contiguous(),
                      "swizzled": swizzled})
    for name, x in fp8_inputs():
        quantizer = current.CurrentScalingQuantizerRef(dtype=torch.float8_e4m3fn, rowwise=True, columnwise=False)
        data, scale_inv, _, _ = quantizer._quantize(x)
        cases.append(with_x({"name": f"fp8_{name}", "format": "fp8", "scale": scale_inv.reshape(()),
                             "data": as_bits(data)}, name, x))
    return cases, {"stack": "transformer-engine", "transformer_engine_version": version}


# ------------------------------------------------------------------------------------------------
# microxcaling (the OCP MX spec's reference code; not on PyPI: a checkout's folder holding mx/)
# ------------------------------------------------------------------------------------------------


def microxcaling_cases() -> tuple[list[dict], dict]:
    """quantize_mx_op (the PyTorch path, custom_cuda off) for each element format: its fake quant
    only, which is all it computes; rounding "nearest" (its default) on every input, "even" on the
    edge and finite exhaustive ones; blocks along the last axis, and once along axis -2 (padded)."""
    from mx.mx_ops import quantize_mx_op
    from mx.specs import finalize_mx_specs

    specs = finalize_mx_specs({"w_elem_format": "fp8_e4m3", "a_elem_format": "fp8_e4m3", "block_size": 32,
                               "custom_cuda": False})
    formats = {"e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2", "e2m1": "fp4_e2m1"}
    weights = random_inputs()["bf16_weights_32x256"]
    cases = []
    for element, elem_format in formats.items():
        runs = [(name, x, "nearest", -1) for name, x in mx_inputs()]
        runs += [(name, x, "even", -1) for name, x in mx_inputs() if "edge" in name or name == EXHAUSTIVE]
        # Blocks down the columns (20 rows: padded to 32), and a row length that is not whole blocks.
        runs += [("bf16_weights_20x64", weights[:20, :64].clone(), "nearest", -2),
                 ("bf16_weights_4x200", weights[:4, :200].clone(), "nearest", -1)]
        for name, x, rounding, axis in runs:
            fake = quantize_mx_op(x, specs, elem_format=elem_format, axes=[axis], round=rounding)
            suffix = "" if axis == -1 else "_axis-2"
            cases.append(mx_case(f"mx_{element}_{rounding}_{name}{suffix}", name, x, element, None, None, fake,
                                 rounding=rounding, axis=axis))
    return cases, {"stack": "microxcaling", "microxcaling_commit": microxcaling_commit()}


def microxcaling_commit() -> str:
    """The commit the checkout's mx/ came from, if it says (a file COMMIT beside mx/), else unknown."""
    import mx

    marker = Path(mx.__file__).parent.parent / "COMMIT"
    return marker.read_text().strip() if marker.exists() else "unknown"


# ------------------------------------------------------------------------------------------------
# modelopt's MX real quant (MXFP4QTensor, MXFP8QTensor: pure PyTorch)
# ------------------------------------------------------------------------------------------------


def modelopt_cases() -> tuple[list[dict], dict]:
    """MXFP4QTensor.quantize(x, 32) / dequantize and MXFP8QTensor.quantize(x) / dequantize, CPU."""
    import modelopt
    from modelopt.torch.quantization.qtensor import MXFP4QTensor, MXFP8QTensor

    weights = random_inputs()["bf16_weights_32x256"]
    cases = []
    for name, x in mx_inputs() + [("bf16_weights_4x200", weights[:4, :200].clone())]:
        if torch.isfinite(x).all() and x.shape[-1] % 32 == 0:  # MXFP4QTensor: finite x, whole blocks per row
            tensor, scale = MXFP4QTensor.quantize(x, 32)
            cases.append(mx_case(f"mx_e2m1_{name}", name, x, "e2m1", scale, tensor._quantized_data,
                                 tensor.dequantize(scale=scale, block_sizes={-1: 32})))
        tensor, scale = MXFP8QTensor.quantize(x)
        cases.append(mx_case(f"mx_e4m3_{name}", name, x, "e4m3", scale, tensor._quantized_data,
                             tensor.dequantize(scale=scale)))
    return cases, {"stack": "modelopt", "modelopt_version": modelopt.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stack", required=True,
                        choices=("torchao", "compressed-tensors", "transformer-engine", "microxcaling", "modelopt"))
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
    elif args.stack == "microxcaling":
        cases, meta = microxcaling_cases()
    elif args.stack == "modelopt":
        cases, meta = modelopt_cases()
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
