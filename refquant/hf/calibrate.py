"""max calibration (docs/modelopt_behaviour.md §6.1), and how a batch goes into the model.

max_calibrate, in place: every enabled quantizer stops quantizing and collects max|x| (constant-amax
ones only pass data through); every weight passes once through its weight quantizer; the forward
loop runs over the calibration batches without gradients; each quantizer then stores what it saw
as its amax. Under torch.distributed the amaxes (and the MoE experts' token counts) are reduced
over the ranks (refquant.quant.distributed).

Two things modelopt's forward loop does not do, neither of which changes an amax: the forwards
ask for the last position's logits alone where no quantizer watches the output head
(_unwatched_logits), and the MoE experts' grouped-matmul checks run beside the forwards, a batch
run again where one fails (_run_batches; refquant.hf.grouped_linear.ChecksBeside).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterable, Optional

import torch
from torch import nn

from .insert import enabled_weight_views, refuse_unsupported_quantizers, weight_quantizer_modules
from .experts import is_fused_experts, is_quant_experts, synchronize_token_counts
from .dispatch import execution_device, loaded_weights, require_loaded
from .grouped_linear import ChecksBeside, checks_beside
from .placement import is_weight_quantizer
from ..quant.distributed import rank_and_world, synchronize_calibration
from ..quant.quantizer import TensorQuantizer, collect_slices, finish_calibrations, named_quantizers, refuse_folded


def run_batch(model: nn.Module, batch: Any, **extra: Any) -> Any:
    """model(**batch) for a dict (tensors moved to the model's device), model(input_ids=batch) for a
    tensor of token ids [batch, seq], with the `extra` keyword arguments the batch does not set. A
    model spread by accelerate takes the batch on its execution device
    (refquant.hf.dispatch.execution_device), never on the meta device of offloaded weights."""
    device = execution_device(model)
    if isinstance(batch, torch.Tensor):
        return model(input_ids=batch.to(device), **extra)
    if isinstance(batch, dict):
        return model(**{**extra, **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}})
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


def _unwatched_logits(model: nn.Module) -> dict:
    """{"logits_to_keep": 1} where the model's forward takes it (transformers' causal LMs) and no
    enabled quantizer sits in its output head: calibration reads no logit, and the head's output
    for every position is the largest tensor of a forward (4096 tokens of a 151k vocabulary: 1.2
    GB in bf16); the hidden states before the head are computed as they are without it. Else {}."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or any(isinstance(m, TensorQuantizer) and m.is_enabled for m in head.modules()):
        return {}
    try:
        takes = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if takes else {}


def _calibration_run(model: nn.Module, batch: Any, extra: dict) -> None:
    """run_batch for calibration: with `extra` (_unwatched_logits) unless the batch carries labels
    (a loss wants every position's logits)."""
    run_batch(model, batch, **(extra if not (isinstance(batch, dict) and "labels" in batch) else {}))


def _device_types(modules: list[nn.Module]) -> set[str]:
    return {parameter.device.type for module in modules for parameter in module.parameters(recurse=False)}


def _run_batches(model: nn.Module, batches: Iterable[Any], beside: Optional[ChecksBeside],
                 quantizers: list[tuple[str, Any]], experts: list[nn.Module]) -> tuple[int, int]:
    """The forward loop over the calibration batches: (batches, tokens) run. With `beside`
    (refquant.hf.grouped_linear.ChecksBeside) the experts' row-count checks run beside the
    forwards: each batch is kept with what calibration held before it until its checks have all
    passed, and a batch that used counts whose check failed is run again from there, with every
    batch after it (_settle)."""
    count = tokens = 0
    extra = _unwatched_logits(model)
    if beside is None:
        for batch in batches:
            _calibration_run(model, batch, extra)
            count += 1
            tokens += batch_tokens(batch)
        return count, tokens
    state = _CalibrationState(quantizers, experts)
    kept: list[tuple[int, Any, tuple]] = []  # (index, batch, state before it) while its checks are open
    for batch in batches:
        kept.append((count, _own_copy(batch), state.taken()))
        beside.batch = count
        _calibration_run(model, batch, extra)
        count += 1
        tokens += batch_tokens(batch)
        _settle(model, beside, state, kept, extra, wait_all=False)
    _settle(model, beside, state, kept, extra, wait_all=True)
    return count, tokens


def _settle(model: nn.Module, beside: ChecksBeside, state: "_CalibrationState", kept: list, extra: dict,
            wait_all: bool) -> None:
    """Take the checks' verdicts that are in (all of them with wait_all); from the first batch
    that used counts that failed, put back what calibration held before it and run it and the
    kept batches after it again (their keys now take the per-expert calls), until no verdict
    fails; then forget the batches whose checks have all passed."""
    failed = beside.poll(wait_all)
    while failed is not None:
        later = beside.poll(wait_all=True)  # every open verdict, so one run again covers them
        failed = failed if later is None else min(failed, later)
        first = next(position for position, entry in enumerate(kept) if entry[0] >= failed)
        state.put_back(kept[first][2])
        for position in range(first, len(kept)):
            index, batch, _ = kept[position]
            kept[position] = (index, batch, state.taken())
            beside.batch = index
            _calibration_run(model, batch, extra)
        failed = beside.poll(wait_all=True)
    oldest = beside.oldest_open_batch()
    kept[:] = [] if oldest is None else [entry for entry in kept if entry[0] >= oldest]


def _own_copy(batch: Any) -> Any:
    """The batch's tensors copied: a kept batch is run again as it was, whatever its maker does
    with the tensors it gave."""
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, dict):
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch  # run_batch refuses it


class _CalibrationState:
    """What a calibration forward changes: each quantizer's collected maxima and each MoE
    experts module's token counts (taken before a batch, put back to run it again)."""

    def __init__(self, quantizers: list[tuple[str, Any]], experts: list[nn.Module]):
        self._calibrators = [q._calibrator for _, q in quantizers if q._calibrator is not None]
        self._experts = experts

    def taken(self) -> tuple:
        return ([calibrator.state() for calibrator in self._calibrators],
                [None if m.calibration_tokens is None else list(m.calibration_tokens) for m in self._experts])

    def put_back(self, taken: tuple) -> None:
        for calibrator, state in zip(self._calibrators, taken[0]):
            calibrator.restore(state)
        for module, counts in zip(self._experts, taken[1]):
            module.calibration_tokens = None if counts is None else list(counts)


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
            experts = [module for module in modules if is_quant_experts(module)]
            with checks_beside(_device_types(experts)) if experts else contextlib.nullcontext() as beside:
                batches, tokens = _run_batches(model, iterator, beside, quantizers, experts)
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
