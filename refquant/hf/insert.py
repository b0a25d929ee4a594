"""insert_quantizers: modelopt's quantizers into a model, where `mtq.quantize` puts them
(docs/modelopt_behaviour.md §12), and the quantized modules it makes.

Which modules get which quantizers is refquant.hf.placement; attention modules get theirs from
refquant.hf.attention, fused MoE experts theirs from refquant.hf.experts. Here: QuantLinear,
QuantEmbedding, the norm-input mixin, and the slots of the module types modelopt quantizes by
rules refquant does not implement (UnsupportedQuantizer: refuse_unsupported_quantizers raises when
a recipe turns one on).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..numerics.checks import Flavor
from . import placement
from .attention import check_attention_hookable, is_attention_module, quant_attention_class
from .experts import check_experts_forward, find_experts, force_eager_experts, is_quant_experts, quant_experts_class
from .dispatch import check_forward_rebindable, rebind_forward
from .swap import quant_class
from ..quant.quantizer import QuantizerConfig, SharedInputResult, TensorQuantizer, named_quantizers, quantizer_sees_each_call

LINEAR_QUANTIZER_NAMES = placement.QUANTIZER_NAMES[placement.LINEAR]


class QuantLinearMixin:
    """modelopt's QuantLinear: output_quantizer(linear(input_quantizer(x), weight_quantizer(W), b)).

    Mixed in front of the layer's own class (a QuantLinear is still an nn.Linear), so the layer's
    name, weight and bias are untouched; the weight is fake-quantized from the master weight at
    every forward, nothing is cached (docs/modelopt_behaviour.md §6.3).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input = _through(self.input_quantizer, input)
        output = F.linear(input, _through(self.weight_quantizer, self.weight), self.bias)
        return _through(self.output_quantizer, output)


def _through(quantizer: TensorQuantizer, x: torch.Tensor) -> torch.Tensor:
    """quantizer(x). A disabled quantizer returns x: it is not called (recipes leave the output
    quantizer off, a folded weight's quantizer is off), a module call less in a host-bound
    forward, unless a hook or a subclass wants to see the call (quantizer_sees_each_call)."""
    return quantizer(x) if quantizer.is_enabled or quantizer_sees_each_call(quantizer) else x


class QuantEmbeddingMixin:
    """modelopt's QuantEmbedding: output_quantizer(embedding(ids, weight_quantizer(W))). Its
    input_quantizer exists (for names and recipe patterns) but is never called and never enabled:
    the input is integer token ids."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight_quantizer(self.weight)
        output = F.embedding(
            input, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
        return self.output_quantizer(output)


class HardDisabledQuantizer(TensorQuantizer):
    """A quantizer slot that stays off whatever a recipe says (modelopt's
    HardDisabledTensorQuantizer): a wildcard rule such as `*input_quantizer` is absorbed, not
    applied, because the embedding's input is token ids."""

    def set_config(self, config: QuantizerConfig) -> None:
        super().set_config(replace(config, enable=False))

    def set_enabled(self, enable: bool) -> None:
        super().set_enabled(False)


class QuantInputMixin:
    """modelopt's QuantInputBase (nn.LayerNorm and the other norms, activations and poolings it
    registers): output_quantizer(forward(input_quantizer(x), ...)); of a tuple output only the
    first element passes the output quantizer."""

    def forward(self, input: torch.Tensor, *args, **kwargs):
        output = super().forward(self.input_quantizer(input), *args, **kwargs)
        if isinstance(output, tuple):
            return (self.output_quantizer(output[0]), *output[1:])
        return self.output_quantizer(output)


class UnsupportedQuantizer(TensorQuantizer):
    """A quantizer slot of a module modelopt quantizes with rules refquant does not implement
    (refquant.hf.placement: convolutions, GPT-2's Conv1D, ...). It carries modelopt's name, so
    recipe patterns match as in modelopt, and nothing calls it; refuse_unsupported_quantizers
    raises when a recipe leaves one on."""

    def __init__(self, reason: str, model_class: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reason = reason
        self.model_class = model_class


def refuse_unsupported_quantizers(quantizers: list[tuple[str, TensorQuantizer]]) -> None:
    """Raise ValueError naming the model class, the first enabled UnsupportedQuantizer among a
    model's (name, quantizer) pairs (named_quantizers) and recipe rules that would turn them all off."""
    enabled = [(name, q) for name, q in quantizers if isinstance(q, UnsupportedQuantizer) and q.is_enabled]
    if not enabled:
        return
    name, quantizer = enabled[0]
    leaves = sorted({n.rsplit(".", 2)[-2] for n, _ in enabled})
    rules = " and ".join(f'quantizer_name = "*.{leaf}.*", enable = false' for leaf in leaves)
    raise ValueError(
        f"{quantizer.model_class}: the recipe turns on {name} ({len(enabled)} such quantizers), but refquant "
        f"does not quantize {quantizer.reason} as modelopt does, so this model family is not supported. "
        f"Quantize it with modelopt, or leave those layers unquantized with last recipe rules {rules}."
    )


def weight_quantizer_modules(model: nn.Module, named_modules: Optional[list[tuple[str, nn.Module]]] = None
                             ) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every layer or fused-experts module with an enabled weight quantizer
    (asked without loading an offloaded module's weights: a view of a meta tensor is enough).
    named_modules: model.named_modules() listed already, where the caller walked the tree."""
    for name, module in model.named_modules() if named_modules is None else named_modules:
        if isinstance(module, (QuantLinearMixin, QuantEmbeddingMixin)) or is_quant_experts(module):
            if next(enabled_weight_views(module), None) is not None:
                yield name, module


def enabled_weight_views(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, TensorQuantizer]]:
    """(its name in the module, the tensor a weight quantizer sees, that quantizer) for each enabled
    weight quantizer of a module of weight_quantizer_modules: a layer's weight, or an expert's
    slice of a fused weight (gpt-oss: each whole weight, transposed), as modelopt's weight
    calibration passes them. Read them while the weights are loaded (offloaded ones are on the
    meta device)."""
    if isinstance(module, (QuantLinearMixin, QuantEmbeddingMixin)):
        if module.weight_quantizer.is_enabled:
            yield "weight", module.weight, module.weight_quantizer
        return
    for name, view, quantizer in module.weights_for_calibration():
        if quantizer.is_enabled:
            yield name, view, quantizer


# modelopt's QuantLinear and QuantEmbedding; a subclass of those layers, or a norm, gets its own
# class the same way when a model holds one
QuantLinear = quant_class(QuantLinearMixin, nn.Linear)
QuantEmbedding = quant_class(QuantEmbeddingMixin, nn.Embedding)
_MIXINS = {placement.LINEAR: QuantLinearMixin, placement.EMBEDDING: QuantEmbeddingMixin, placement.INPUT: QuantInputMixin}


def _is_quantized(module: nn.Module) -> bool:
    return isinstance(module, (QuantLinearMixin, QuantEmbeddingMixin, QuantInputMixin)) or hasattr(
        type(module), "_refquant_original_class"
    )


def _has_unsupported_slots(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight_quantizer", None), UnsupportedQuantizer)


def _conv1d_as_linear(name: str, module: nn.Module) -> None:
    """modelopt's _QuantConv1D.convert: transformers' Conv1D (weight [in, out], addmm) becomes an
    nn.Linear with its weight transposed in place to [out, in], contiguous."""
    weight = module.weight
    if weight.device.type == "meta":
        raise ValueError(
            f"{name} is a transformers Conv1D whose weight is offloaded (on the meta device); quantizing it "
            "transposes the weight in place, as modelopt does. Load the model without offload."
        )
    module.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=weight.requires_grad)
    module.out_features, module.in_features = module.weight.shape
    module.__class__ = nn.Linear


def insert_quantizers(model: nn.Module, *, backend: str = "reference", flavor: Flavor = "modelopt-cpu") -> list[str]:
    """Give `model` modelopt's quantizer submodules, in place; returns every quantizer's full name.

    Placement follows modelopt's registry of quantized module types (refquant.hf.placement).
    Idempotent: layers that already have quantizers keep them (and their amax); calling again only
    sets `backend` and `flavor` on all of them. Raises ValueError when the model has no nn.Linear,
    when an attention module cannot be hooked (refquant.hf.attention.check_attention_hookable), when
    the model holds an RNN (modelopt's QuantRNN is not implemented), or when a layer's forward is
    replaced on the instance by something other than accelerate's hook (refquant.hf.dispatch:
    accelerate's hooks are made to call the quantized forward).
    """
    named = list(model.named_modules())
    kinds = {name: placement.placement_kind(m) for name, m in named}
    if not any(kinds[name] in (placement.LINEAR, placement.CONV1D) or isinstance(m, QuantLinearMixin) for name, m in named):
        raise ValueError(
            f"no quantizable layers in {type(model).__name__}: refquant quantizes nn.Linear layers "
            "(and K/V in their attention modules) and found none. Pass a transformers causal LM "
            "such as Llama, Mistral, Qwen2 or Qwen3."
        )
    for name, module in named:
        if isinstance(module, placement.RNN_TYPES):
            raise ValueError(
                f"{type(model).__name__}: {name} is a {type(module).__name__}, which modelopt quantizes with its "
                "QuantRNN; refquant does not, so this model family is not supported."
            )
    attentions = [(name, m) for name, m in named if is_attention_module(m) and not _is_quantized(m)]
    for name, module in attentions:
        check_attention_hookable(name or type(model).__name__, module)  # all checked before any change
    conv1ds = [(name, m) for name, m in named if kinds[name] == placement.CONV1D]
    converted = [(name, m) for name, m in named if kinds[name] in _MIXINS and not _is_quantized(m)]
    experts = [(name, m, layout) for name, m, layout in find_experts(model) if not _is_quantized(m)]
    for name, module, layout in experts:
        check_experts_forward(name, module, layout)
    for name, module in conv1ds + converted + attentions + [(name, m) for name, m, _ in experts]:
        check_forward_rebindable(name, module)

    for name, module in conv1ds:
        _conv1d_as_linear(name, module)
    converted += conv1ds
    kinds.update((name, placement.LINEAR) for name, _ in conv1ds)
    for name, module in converted:
        kind = kinds[name]
        module.__class__ = quant_class(_MIXINS[kind], type(module))
        rebind_forward(module)  # an accelerate hook calls the quantized forward from now on
        for quantizer_name in placement.QUANTIZER_NAMES[kind]:
            if kind == placement.EMBEDDING and quantizer_name == "input_quantizer":
                quantizer = HardDisabledQuantizer(backend=backend, flavor=flavor)
            else:
                quantizer = TensorQuantizer(backend=backend, flavor=flavor)
            module.add_module(quantizer_name, quantizer)
    for name, module in named:
        if kinds[name] == placement.UNSUPPORTED and not _has_unsupported_slots(module):
            reason = placement.unsupported_reason(module)
            for quantizer_name in placement.QUANTIZER_NAMES[placement.LINEAR]:
                module.add_module(
                    quantizer_name,
                    UnsupportedQuantizer(reason, type(model).__name__, backend=backend, flavor=flavor),
                )
    for _, module in attentions:
        module.__class__ = quant_attention_class(type(module))
        rebind_forward(module)
        module._setup_bmm_quantizers(backend, flavor)
    _insert_expert_quantizers(model, experts, backend, flavor)

    after = list(model.named_modules())
    _new_modules_in_parents_mode(named, after)
    quantizers = named_quantizers(model, after)
    shared = SharedInputResult()  # q/k/v (and gate/up) input quantizers share one tensor
    for name, quantizer in quantizers:
        quantizer.name, quantizer.backend, quantizer.flavor = name, backend, flavor
        quantizer.shared_input_result = shared
    return [name for name, _ in quantizers]


def _new_modules_in_parents_mode(before: list[tuple[str, nn.Module]], after: list[tuple[str, nn.Module]]) -> None:
    """Each module the insertion added (quantizers, their lists) takes its parent's training
    flag, as model.eval() or model.train() would have set it: a new nn.Module starts in training
    mode, so a model in eval mode would otherwise hold quantizers in training mode, and max
    calibration would switch the whole model to eval and back (two walks of every module) to
    leave it in one mode. `before` and `after`: model.named_modules() before and after the
    insertion (a parent comes before its children)."""
    existing = {id(module) for _, module in before}
    by_name = dict(after)
    for name, module in after:
        if id(module) not in existing and name:
            module.training = by_name[name.rpartition(".")[0]].training


def _insert_expert_quantizers(model: nn.Module, experts: list, backend: str, flavor: str) -> None:
    """modelopt's fused-experts wrappers on every experts module (refquant.hf.experts), and its
    eager experts implementation forced on the config."""
    for _, module, layout in experts:
        module.__class__ = quant_experts_class(type(module), layout)
        rebind_forward(module)
        module._setup_expert_quantizers(backend, flavor)
    force_eager_experts(model)

