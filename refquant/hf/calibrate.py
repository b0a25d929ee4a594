"""max calibration (docs/modelopt_behaviour.md §6.1), and how a batch goes into the model.

max_calibrate, in place: every enabled quantizer stops quantizing and collects max|x| (constant-amax
ones only pass data through); every weight passes once through its weight quantizer; the forward
loop runs over the calibration batches without gradients; each quantizer then stores what it saw
as its amax. Under torch.distributed the amaxes (and the MoE experts' token counts) are reduced
over the ranks (refquant.quant.distributed).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from .insert import enabled_weight_views, refuse_unsupported_quantizers, weight_quantizer_modules
from .experts import is_fused_experts, is_quant_experts, synchronize_token_counts
from .dispatch import execution_device, loaded_weights, require_loaded
from .placement import is_weight_quantizer
from ..quant.distributed import rank_and_world, synchronize_calibration
from ..quant.quantizer import collect_slices, finish_calibrations, named_quantizers, refuse_folded


def run_batch(model: nn.Module, batch: Any) -> Any:
    """model(**batch) for a dict (tensors moved to the model's device), model(input_ids=batch) for a
    tensor of token ids [batch, seq]. A model spread by accelerate takes the batch on its execution
    device (refquant.hf.dispatch.execution_device), never on the meta device of offloaded weights."""
    device = execution_device(model)
    if isinstance(batch, torch.Tensor):
        return model(input_ids=batch.to(device))
    if isinstance(batch, dict):
        return model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    raise ValueError(
        f"a calibration / evaluation batch must be a dict of model inputs or a tensor of input_ids, "
        f"got {type(batch).__name__}."
    )


def batch_tokens(batch: Any) -> int:
    """The number of token ids in a batch (its input_ids' elements); 0 when it has none."""
    ids = batch if isinstance(batch, torch.Tensor) else batch.get("input_ids") if isinstance(batch, dict) else None
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


def _calibrate_weights(model: nn.Module, named_modules: Optional[list[tuple[str, nn.Module]]] = None) -> None:
    """modelopt's weight_only_quantize: each enabled weight quantizer sees its weight once, so
    weights calibrate even where the forward never reaches them (fused experts: each projection's
    slices in one reduction, refquant.quant.quantizer.collect_slices). Weights accelerate
    offloaded are loaded as their layer's hook loads them around a forward. named_modules:
    model.named_modules() listed already."""
    for name, module in weight_quantizer_modules(model, named_modules):
        with loaded_weights(module):
            if is_fused_experts(module):
                for projection, weight, quantizers in module.weight_slices_for_calibration():
                    collect_slices(quantizers, require_loaded(f"{name}.{projection}", weight), range(weight.shape[0]))
                continue
            for weight_name, view, quantizer in enabled_weight_views(module):
                quantizer(require_loaded(f"{name}.{weight_name}", view))


def max_calibrate(model: nn.Module, calib_batches: Iterable[Any], *, progress: bool = True) -> tuple[int, int]:
    """modelopt's max calibration (docs/modelopt_behaviour.md §6.1) over the model's enabled
    quantizers, in place.

    Under torch.distributed (initialized, world size > 1) `calib_batches` are this rank's share:
    after the forward loop every collected amax is all-reduced with MAX
    (refquant.quant.distributed), so every rank ends with the amax one process gets from all the
    batches; every rank must run the same model and recipe.
    Returns (batches, tokens) seen, by all ranks together. Raises ValueError when no batch came
    although an enabled activation quantizer needs one (it would silently fall back to a per-call
    amax, docs/modelopt_behaviour.md §10.13).
    """
    named_modules = list(model.named_modules())  # one walk of the module tree for what follows
    quantizers = named_quantizers(model, named_modules)
    refuse_unsupported_quantizers(quantizers)
    refuse_folded(quantizers, "calibrate")  # its forwards would see quantized weights, not the masters
    was_training = model.training
    # model.eval() and model.train() walk every module; a model all in eval mode already (the
    # usual case) ends as it would after both
    modules = [module for _, module in named_modules]
    switches_mode = any(module.training for module in modules)
    if switches_mode:
        model.eval()
    for _, quantizer in quantizers:
        quantizer.start_calibration()
    for module in modules:
        if is_quant_experts(module):
            module.reset_token_counts()
    rank, world = rank_and_world()
    batches = tokens = 0
    failure: Optional[Exception] = None
    with torch.no_grad():
        try:
            _calibrate_weights(model, named_modules)
            iterator = calib_batches
            if progress and rank == 0:
                from tqdm.auto import tqdm

                iterator = tqdm(calib_batches, desc="calibrating", unit="batch", leave=False)
            for batch in iterator:
                run_batch(model, batch)
                batches += 1
                tokens += batch_tokens(batch)
        except Exception as error:
            if world == 1:
                raise
            failure = error  # the other ranks learn of it in the exchange below, then all raise
    if world > 1:
        batches, tokens = synchronize_calibration(
            quantizers, batches=batches, tokens=tokens, error=failure,
            weight_quantizers={name for name, _ in quantizers if is_weight_quantizer(name)},
            fallback_device=lambda name: execution_device(model.get_submodule(name.rpartition(".")[0])),
        )
        synchronize_token_counts(model)
    # (asked only when no batch came: the names' pattern costs ~1,000 matches on an MoE model)
    needs_data = [name for name, q in quantizers if q.is_calibrating and not is_weight_quantizer(name)] if batches == 0 else []
    finish_calibrations(quantizer for _, quantizer in quantizers)  # every collected amax checked finite first
    if switches_mode:
        model.train(was_training)  # as modelopt's calibrate
    if batches == 0 and needs_data:
        raise ValueError(
            f"calib_batches gave no batch, but {len(needs_data)} enabled activation quantizers (e.g. "
            f"{needs_data[0]}) need calibration data. Pass at least one batch."
        )
    return batches, tokens
