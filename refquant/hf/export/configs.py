"""hf_quant_config.json and config.json's `quantization_config`: modelopt's own rules for the
formats refquant writes (quant_utils.py, unified_export_hf.py). Plain dictionaries, no tensors."""

from __future__ import annotations

import json
from typing import Optional

from ...numerics.formats import NVFP4_BLOCK_SIZE

# The modelopt release whose checkpoint layout we write. hf_quant_config.json names modelopt as the
# producer because the runtimes pick their modelopt loader by that name; refquant_quantizers.json
# records that refquant wrote it.
MODELOPT_FORMAT_VERSION = "0.47.0"
# modelopt's per-layer format names (quant_utils.py, get_quantization_format) -> hf_quant_config.
LAYER_QUANT_ALGO = {"fp8": "FP8", "nvfp4": "NVFP4", "w4a16_nvfp4": "W4A16_NVFP4"}


def _layer_config(fmt: str) -> dict:
    config = {"quant_algo": LAYER_QUANT_ALGO[fmt]}
    if fmt != "fp8":
        config["group_size"] = NVFP4_BLOCK_SIZE
    return config


def layer_quant_config(formats: dict[str, Optional[str]]) -> dict:
    """modelopt's process_layer_quant_config: one format -> its fields plus exclude_modules
    (summarised with prefix wildcards); several -> "MIXED_PRECISION" with quantized_layers."""
    quantized = {name: _layer_config(fmt) for name, fmt in formats.items() if fmt is not None}
    excluded = [name for name, fmt in formats.items() if fmt is None]
    result: dict = {"quant_algo": None, "kv_cache_quant_algo": None, "quantized_layers": quantized}
    distinct = {json.dumps(config, sort_keys=True) for config in quantized.values()}
    if len(distinct) > 1:
        result["quant_algo"] = "MIXED_PRECISION"
    elif len(distinct) == 1:
        result.update(next(iter(quantized.values())))
        result["exclude_modules"] = sorted(summarise_excluded(excluded, list(quantized)))
        result.pop("quantized_layers")
    return result


def summarise_excluded(unquantized: list[str], quantized: list[str]) -> set[str]:
    """modelopt's _prefix_wildcard_summarize_exclude_modules: cover the unquantized layer names
    with "prefix*" (or "prefix.*") wildcards that match no quantized layer."""
    negative = set()
    for name in quantized:
        negative.add(name)
        negative.update(name[:i] + "*" for i in range(len(name) + 1))

    def candidates(name: str):
        for i, char in enumerate(name):
            if char == ".":
                yield [name[:i] + "*"]
                yield [name[:i], name[:i] + ".*"]
        yield [name]

    summary: set[str] = set()
    for name in unquantized:
        chosen: list[str] = []
        for wildcards in candidates(name):
            if any(w in negative for w in wildcards):
                continue
            if all(w in summary for w in wildcards):
                chosen = []
                break
            chosen = wildcards
            break
        if len(chosen) == 2 and sorted(chosen, key=len)[1] == sorted(chosen, key=len)[0] + ".*":
            summary.add(sorted(chosen, key=len)[1])
        else:
            summary.update(chosen)
    return summary


def _weights_group(bits: int, group_size: Optional[int]) -> dict:
    group = {"dynamic": False, "num_bits": bits, "type": "float"}
    if group_size is not None:
        group["group_size"] = group_size
    return group


def _config_group(quant_algo: str, group_size: Optional[int]) -> dict:
    if quant_algo == "FP8":
        return {"input_activations": _weights_group(8, None), "weights": _weights_group(8, None)}
    if quant_algo == "NVFP4":
        return {"input_activations": _weights_group(4, group_size), "weights": _weights_group(4, group_size)}
    return {"weights": _weights_group(4, group_size)}  # W4A16_NVFP4


def quantization_config(hf_quant_config: dict) -> dict:
    """config.json's `quantization_config`: modelopt's convert_hf_quant_config_format for the
    formats refquant writes (the llm-compressor style the runtimes read)."""
    details = hf_quant_config["quantization"]
    algo = details.get("quant_algo")
    converted: dict = {}
    if algo in ("FP8", "NVFP4", "W4A16_NVFP4"):
        group = _config_group(algo, details.get("group_size", NVFP4_BLOCK_SIZE))
        converted["config_groups"] = {"group_0": {**group, "targets": ["Linear"]}}
    elif algo == "MIXED_PRECISION":
        by_config: dict[tuple, list[str]] = {}
        for layer, config in details["quantized_layers"].items():
            by_config.setdefault(tuple(sorted(config.items())), []).append(layer)
        converted["config_groups"] = {}
        for index, (key, layers) in enumerate(by_config.items()):
            config = dict(key)
            group = _config_group(config["quant_algo"], config.get("group_size"))
            converted["config_groups"][f"group_{index}"] = {**group, "targets": sorted(layers)}
        converted["quantized_layers"] = details["quantized_layers"]
    excluded = details.get("exclude_modules")
    converted["ignore"] = excluded if excluded is not None else []
    if algo:
        converted["quant_algo"] = algo
    kv_algo = details.get("kv_cache_quant_algo")
    if kv_algo:
        converted["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"} if kv_algo == "FP8" else kv_algo
    converted["producer"] = hf_quant_config["producer"]
    converted["quant_method"] = "modelopt"
    return converted
