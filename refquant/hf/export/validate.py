"""What load_checkpoint checks before it trusts a checkpoint folder, each failure a ValueError that
names the file and the key or tensor:

  JSON      every document parses, and refquant_quantizers.json has the keys and types it reads;
  files     an index's weight_map names files inside the folder; a safetensors file is complete
            (its size covers what its header describes) and readable;
  tensors   every tensor a deployment reads for a quantized layer (weight, weight_scale,
            weight_scale_2, input_scale) and each K/V scale is there, of its dtype and shape, finite
            and not negative; plain tensors have the model's shapes and are finite;
  agreement refquant_quantizers.json's layers agree with its quantizer configs, every scale its
            quantizers promise has an amax, and hf_quant_config.json, config.json's
            quantization_config and the K/V scales are what those quantizers give (checked on the
            loaded model with plan_export, the exporter's own rules).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ...numerics.checks import FLAVORS
from ...numerics.formats import NVFP4_BLOCK_SIZE
from ...quant.backends import BACKENDS
from ...quant.quantizer import child_quantizer
from .configs import LAYER_QUANT_ALGO, quantization_config
from .plan import ExportPlan, layer_format
from .tensors import writes_input_scale

def checkpoint_error(path: Path, key: str, problem: str, fix: str = "The checkpoint is damaged; export it again.") -> ValueError:
    return ValueError(f"{path}: {key}: {problem}. {fix}")


# --- JSON documents ---------------------------------------------------------------------------


def read_json(path: Path, what: str) -> dict:
    """The JSON object in `path`; ValueError when it is missing, not JSON or not an object."""
    if not path.is_file():
        raise ValueError(f"{path} is missing: {what}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error}). The checkpoint is damaged; export it again.") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(document).__name__}. The checkpoint is damaged; export it again.")
    return document


def _require(path: Path, document: dict, key: str, types: tuple, wanted: str, where: str = "") -> Any:
    full = f"{where}{key}"
    if key not in document:
        raise checkpoint_error(path, full, "missing")
    value = document[key]
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise checkpoint_error(path, full, f"expected {wanted}, got {type(value).__name__} {value!r:.80}")
    return value


def float_dtype(path: Path, key: str, name: object) -> torch.dtype:
    """The torch floating-point dtype `name` ("bfloat16") read from `key` of the file at `path`;
    anything else raises checkpoint_error naming both."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise checkpoint_error(path, key, f"{name!r} is not a torch floating-point dtype")
    return dtype


def check_state_document(path: Path, state: dict) -> None:
    """refquant_quantizers.json's keys and types (format and version already checked)."""
    backend = _require(path, state, "backend", (str,), "a string")
    if backend not in BACKENDS:
        raise checkpoint_error(path, "backend", f"{backend!r} is not one of {', '.join(BACKENDS)}")
    flavor = _require(path, state, "flavor", (str,), "a string")
    if flavor not in FLAVORS:
        raise checkpoint_error(path, "flavor", f"{flavor!r} is not one of {', '.join(FLAVORS)}")
    if state.get("attn_implementation") is not None:
        _require(path, state, "attn_implementation", (str,), "a string or null")
    for name, dtype in _require(path, state, "buffer_dtypes", (dict,), "an object").items():
        float_dtype(path, f"buffer_dtypes.{name}", dtype)
    for name, fmt in _require(path, state, "layers", (dict,), "an object").items():
        if fmt not in LAYER_QUANT_ALGO:
            raise checkpoint_error(path, f"layers.{name}", f"{fmt!r} is not a layer format ({', '.join(LAYER_QUANT_ALGO)})")
    for name, entry in _require(path, state, "quantizers", (dict,), "an object").items():
        where = f"quantizers.{name}."
        if not isinstance(entry, dict):
            raise checkpoint_error(path, where[:-1], f"expected an object, got {type(entry).__name__}")
        config = _require(path, entry, "config", (dict,), "an object", where)
        _require(path, config, "format", (str,), "a string", f"{where}config.")
        _require(path, config, "enable", (bool,), "true or false", f"{where}config.")
        _require(path, config, "use_constant_amax", (bool,), "true or false", f"{where}config.")
        if "axis" not in config:
            raise checkpoint_error(path, f"{where}config.axis", "missing")
        if entry.get("amax", None) is not None:
            _check_encoded_amax(path, f"{where}amax", _require(path, entry, "amax", (dict,), "an object or null", where))


def _check_encoded_amax(path: Path, key: str, amax: dict) -> None:
    float_dtype(path, f"{key}.dtype", amax.get("dtype"))
    shape = _require(path, amax, "shape", (list,), "a list of sizes", f"{key}.")
    if not all(isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape):
        raise checkpoint_error(path, f"{key}.shape", f"expected a list of sizes, got {shape!r}")
    values = _require(path, amax, "values", (list,), "a list of hex floats", f"{key}.")
    if len(values) != math.prod(shape):
        raise checkpoint_error(path, f"{key}.values", f"{len(values)} values for the shape {shape}")
    for value in values:
        try:
            number = float.fromhex(value)
        except (TypeError, ValueError):
            raise checkpoint_error(path, f"{key}.values", f"{value!r} is not a hex float (float.hex)") from None
        if not (math.isfinite(number) and number >= 0):
            raise checkpoint_error(path, f"{key}.values", f"{value!r} is not a finite amax >= 0")


# --- files ------------------------------------------------------------------------------------


def check_weight_map(index_path: Path, index: dict) -> dict[str, str]:
    """The index's weight_map: tensor name -> a safetensors file name in the checkpoint folder."""
    weight_map = _require(index_path, index, "weight_map", (dict,), "an object")
    for key, filename in weight_map.items():
        if not isinstance(filename, str):
            raise checkpoint_error(index_path, f"weight_map.{key}", f"expected a file name, got {filename!r}")
        if Path(filename).name != filename or filename in ("", ".", "..") or "\\" in filename:
            raise checkpoint_error(
                index_path, f"weight_map.{key}", f"{filename!r} is not a file name in the checkpoint folder",
                "A checkpoint's shards sit next to its index; refquant reads nothing outside the folder.")
    return weight_map


def check_safetensors_file(path: Path) -> dict:
    """The header of a safetensors file (tensor name -> dtype, shape, data_offsets); ValueError
    naming the file when it is shorter than its header says (truncated) or its header is not one."""
    damaged = "The file is damaged (an interrupted copy or write?); copy or export it again."
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: truncated: {size} bytes, not even a safetensors header. {damaged}")
        (header_size,) = struct.unpack("<Q", prefix)
        if 8 + header_size > size:
            raise ValueError(f"{path}: truncated: {size} bytes, but its header alone is {8 + header_size}. {damaged}")
        try:
            header = json.loads(handle.read(header_size))
            ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ValueError(f"{path}: not a safetensors file (its header does not parse). {damaged}") from None
    expected = 8 + header_size + max(ends, default=0)
    if expected > size:
        raise ValueError(f"{path}: truncated: {size} bytes, but its header describes {expected}. {damaged}")
    return header


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, after check_safetensors_file; ValueError naming the
    file for anything safetensors cannot read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors_file(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: safetensors cannot read it ({error}). The file is damaged; copy or export it again.") from None


# --- tensors ----------------------------------------------------------------------------------


def expected_layer_tensors(fmt: str, module: nn.Module) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """suffix -> (dtype, shape) of what the export writes for a quantized layer of format `fmt`
    (refquant.hf.export.tensors.export_linear_tensors), its quantizers restored."""
    shape = tuple(module.weight.shape)
    rows, columns = shape[:-1], shape[-1]
    if fmt == "fp8":
        tensors = {"weight": (torch.float8_e4m3fn, shape), "weight_scale": (torch.float32, ())}
    else:
        blocks = -(-columns // NVFP4_BLOCK_SIZE)
        tensors = {
            "weight": (torch.uint8, (*rows, blocks * NVFP4_BLOCK_SIZE // 2)),
            "weight_scale": (torch.float8_e4m3fn, (*rows, blocks)),
            "weight_scale_2": (torch.float32, ()),
        }
    if writes_input_scale(fmt, child_quantizer(module, "input_quantizer")):
        tensors["input_scale"] = (torch.float32, ())
    return tensors


def check_tensor(path: Path, key: str, tensor: torch.Tensor, dtype: Optional[torch.dtype], shape: tuple, scale: bool = False) -> None:
    """dtype (None: any), shape, and every value finite (and >= 0 for a scale); no copy in fp32."""
    if dtype is not None and tensor.dtype != dtype:
        raise checkpoint_error(path, key, f"dtype {str(tensor.dtype).removeprefix('torch.')}, expected {str(dtype).removeprefix('torch.')}")
    if tuple(tensor.shape) != tuple(shape):
        raise checkpoint_error(path, key, f"shape {list(tensor.shape)}, expected {list(shape)}")
    if not tensor.is_floating_point():
        return
    if tensor.dtype == torch.float8_e4m3fn:  # no infinity; NaN is S.1111.111; negative: the sign bit on a nonzero
        bits = tensor.view(torch.uint8)
        bad = (bits & 0x7F) == 0x7F
        if scale:
            bad |= bits > 0x80
    else:
        bad = ~torch.isfinite(tensor)
        if scale:
            bad |= tensor < 0
    if bool(bad.any()):
        first = tensor.flatten()[bad.flatten()][0].float().item()
        what = "NaN, infinite or negative" if scale else "NaN or infinite"
        raise checkpoint_error(path, key, f"{int(bad.sum())} of its {tensor.numel()} values are {what} (e.g. {first})")


def checked_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[str, Optional[torch.dtype], tuple, bool]],
                    file_of: Callable[[str], Path], used: set[str], missing: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors `expected` names, each checked (check_tensor).

    expected: the caller's name for a tensor -> (its checkpoint key, dtype (None: any), shape, whether
    it is a scale). Returns the caller's name -> the tensor. A key not in `tensors` raises
    checkpoint_error with the problem `missing` ("missing: ..."); `file_of` gives the file a key
    comes from; every key read is added to `used`."""
    found = {}
    for name, (key, dtype, shape, scale) in expected.items():
        if key not in tensors:
            raise checkpoint_error(file_of(key), key, missing)
        check_tensor(file_of(key), key, tensors[key], dtype, shape, scale=scale)
        found[name] = tensors[key]
        used.add(key)
    return found


def check_dequantized(path: Path, name: str, weight: torch.Tensor) -> None:
    """A weight dequantized from its checkpoint tensors is finite (finite codes and scales can still
    overflow its dtype); `name` is the weight's, reported as "NAME (dequantized with its scales)"."""
    check_tensor(path, f"{name} (dequantized with its scales)", weight, None, tuple(weight.shape))


# --- agreement --------------------------------------------------------------------------------


def check_layer_formats(path: Path, layers: dict[str, str], model: nn.Module) -> None:
    """refquant_quantizers.json's `layers` name exactly the layers its quantizer configs quantize,
    each in the format those configs give (plan.layer_format)."""
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if child_quantizer(module, "weight_quantizer") is None:
            if name in layers:
                raise checkpoint_error(path, f"layers.{name}", "the model config.json builds has no quantized layer of that name")
            continue
        try:
            fmt = layer_format(name, module)
        except ValueError as error:
            raise checkpoint_error(path, f"quantizers.{name}", str(error).rstrip(".")) from None
        if fmt != layers.get(name):
            raise checkpoint_error(
                path, f"layers.{name}", f"says {layers.get(name)!r}, but the file's quantizer configs make the layer {fmt!r}")
    unknown = sorted(set(layers) - set(modules))
    if unknown:
        raise checkpoint_error(path, f"layers.{unknown[0]}", "the model config.json builds has no such layer")


def check_configs_agree(folder: Path, plan: ExportPlan, tensors: dict[str, torch.Tensor], file_of: dict[str, Path]) -> None:
    """hf_quant_config.json, config.json's quantization_config and the K/V scales are what the
    loaded model's quantizers give (plan_export of the loaded model: the exporter's rules)."""
    hf_path = folder / "hf_quant_config.json"
    document = read_json(hf_path, "export_checkpoint writes it; deployments read the quantization from it.")
    _check_same(hf_path, "quantization", _require(hf_path, document, "quantization", (dict,), "an object"),
                plan.hf_quant_config["quantization"])
    config_path = folder / "config.json"
    config = read_json(config_path, "a Hugging Face checkpoint has a config.json.")
    _check_same(config_path, "quantization_config", _require(config_path, config, "quantization_config", (dict,), "an object"),
                quantization_config(plan.hf_quant_config))
    for key, scale in plan.kv_scales.items():
        if not torch.equal(tensors[key].view(torch.int32), scale.to(torch.float32).reshape(()).cpu().view(torch.int32)):
            raise checkpoint_error(
                file_of[key], key, f"{tensors[key].item()!r} disagrees with refquant_quantizers.json, whose amax gives "
                f"{scale.item()!r}")


def _check_same(path: Path, key: str, found: dict, expected: dict) -> None:
    for name in sorted(set(found) | set(expected), key=str):
        if found.get(name) != expected.get(name):
            raise checkpoint_error(
                path, f"{key}.{name}", f"is {found.get(name)!r:.200}, but refquant_quantizers.json and the tensors give "
                f"{expected.get(name)!r:.200}")
