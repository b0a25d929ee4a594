"""Folded weights: each weight's fake quantization computed once and stored in its place, for
evaluation (modelopt's mtq.fold_weight).

A quantized layer fake-quantizes its master weight at every forward (nothing is cached, as in
modelopt): on a large model that is a read and a write of every weight a forward (docs/ptq.md,
"Folded weights", has a measurement). Once calibration is over the weights and their amax no longer
change, so fold_weights writes each weight's fake-quantized values over it, in place, and switches
its weight quantizer off. Later forwards give the same bits (the stored weight is what the
quantizer returned for it; the activations' quantizers are untouched) with no weight quantization
and no extra memory.

The master weights are gone afterwards, so a folded model cannot be exported (the exporter needs
them to compute the packed weights and scales: NVFP4's block scales come from the unquantized
values) nor calibrated again; both refuse with an error, and a folded weight quantizer refuses to
be switched back on (it would quantize twice). Export from the model before folding, or from a
copy.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .dispatch import require_loaded
from .insert import enabled_weight_views, weight_quantizer_modules
from ..quant.quantizer import TensorQuantizer, named_quantizers


def _weights_with_quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, torch.Tensor, TensorQuantizer]]:
    """(weight's name, parameter, the view its quantizer sees, that quantizer) of every enabled
    weight quantizer, as calibration passes them (refquant.hf.insert.enabled_weight_views)."""
    for name, module in weight_quantizer_modules(model):
        for weight_name, view, quantizer in enabled_weight_views(module):
            yield f"{name}.{weight_name}", view if view._base is None else view._base, view, quantizer


def fold_weights(model: nn.Module) -> list[str]:
    """Store each enabled weight quantizer's output in place of its weight and switch that
    quantizer off (see the module docstring); returns the folded quantizers' names.

    Raises ValueError, before changing anything, while calibration runs, when a weight is on the
    meta device (offloaded without its layer's hook), or when a weight to fold is shared with
    another module (tied embeddings: folding would change the other one too).
    """
    found = list(_weights_with_quantizers(model))
    quantizer_names = {id(q): n for n, q in named_quantizers(model)}
    owners: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(parameter), []).append(name)
    for name, parameter, _, quantizer in found:
        if not quantizer.is_quantizing:
            raise ValueError(f"{quantizer_names[id(quantizer)]} is still calibrating; fold weights after calibration.")
        require_loaded(name, parameter)
        if len(owners.get(id(parameter), [])) > 1:
            raise ValueError(
                f"{' and '.join(owners[id(parameter)])} are one tensor (tied weights); folding the quantized one "
                "would change the other too. Untie them (config.tie_word_embeddings = False) or leave this "
                "weight unquantized."
            )
    with torch.no_grad():
        for _, _, view, quantizer in found:
            view.copy_(quantizer(view.contiguous()))
    for _, _, _, quantizer in found:
        quantizer.mark_folded()
    return [quantizer_names[id(quantizer)] for _, _, _, quantizer in found]
