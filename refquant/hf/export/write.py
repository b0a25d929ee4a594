"""export_checkpoint: the checkpoint's tensors, safetensors files and JSON configs, written
atomically into a new folder."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from .configs import quantization_config
from .plan import ExportPlan, plan_export
from .state import STATE_FILE, _state_document

MAX_SHARD_SIZE = "10GB"  # modelopt's default


def checkpoint_state_dict(model: nn.Module, plan: ExportPlan) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint: the model's own state with every quantizer buffer dropped,
    each quantized linear's weight replaced by its exported tensors, K/V scales added, tied
    aliases (lm_head tied to the embeddings) dropped as save_pretrained does."""
    quantizer_prefixes = tuple(f"{name}." for name in plan.quantizers)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith(quantizer_prefixes):
            continue
        layer, _, suffix = key.rpartition(".")
        if layer in plan.linears and suffix == "weight":
            for tensor_suffix, tensor in plan.linears[layer].tensors.items():
                out[f"{layer}.{tensor_suffix}"] = tensor
            continue
        out[key] = value
    out.update(plan.kv_scales)
    for alias, canonical in tied.items():
        if alias in out and canonical in out:
            del out[alias]
    return {key: value.detach().to("cpu").contiguous() for key, value in out.items()}


def _write_safetensors(state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=MAX_SHARD_SIZE)
    for filename, keys in split.filename_to_tensors.items():
        save_file({key: state_dict[key] for key in keys}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=4) + "\n")


def _write_configs(model: nn.Module, plan: ExportPlan, folder: Path) -> None:
    """config.json as save_pretrained writes it (architectures, dtype) plus quantization_config;
    generation_config.json when the model has one; hf_quant_config.json."""
    import copy

    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    weight = next(model.parameters())
    config.dtype = str(weight.dtype).removeprefix("torch.")
    config.save_pretrained(folder)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    config_path = folder / "config.json"
    document = json.loads(config_path.read_text())
    document["quantization_config"] = quantization_config(plan.hf_quant_config)
    _write_json(config_path, document)
    _write_json(folder / "hf_quant_config.json", plan.hf_quant_config)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        raise ValueError(
            f"output folder {str(out_dir)!r} already exists; refquant never writes into or over an "
            "existing checkpoint. Choose a new folder, or remove the old one first."
        )


def export_checkpoint(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write `model` (quantized and calibrated by rq.quantize_model) to the new folder `out_dir` as
    modelopt's unified Hugging Face checkpoint; returns its path. The model is not modified.

    Atomic: everything is written into a temporary sibling folder, renamed to `out_dir` only once
    complete; on any error the temporary folder is removed and `out_dir` does not appear.
    Raises ValueError when `out_dir` exists, when the model is not a transformers model (no
    `config`), when nothing is quantized or a quantizer lacks its calibrated amax, and for layer
    formats modelopt's export does not define.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    if getattr(model, "config", None) is None or not hasattr(model.config, "save_pretrained"):
        raise ValueError(
            f"{type(model).__name__} has no transformers config; export_checkpoint writes Hugging Face "
            "checkpoints of transformers models (e.g. AutoModelForCausalLM)."
        )
    plan = plan_export(model)
    state_dict = checkpoint_state_dict(model, plan)
    state_document = _state_document(model, plan)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write_configs(model, plan, staging)
        _write_safetensors(state_dict, staging)
        _write_json(staging / STATE_FILE, state_document)
        _check_out_dir(out_dir)  # someone may have created it meanwhile
        os.rename(staging, out_dir)  # atomic on one filesystem: the folder appears complete or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
