"""Quantizers in the fused MoE experts of transformers 5, placed, named and calibrated as
modelopt 0.47 does (docs/modelopt_behaviour.md §11).

transformers 5 keeps a layer's experts in one module holding 3-D parameters, one slice per
expert, and runs them in a loop over the experts that received tokens. modelopt recognizes two
layouts and wraps each (modelopt/torch/quantization/plugins/huggingface.py):

  fused       `_QuantFusedExperts` / `_QuantNonGatedFusedExperts`: a module with `num_experts`,
              a 3-D `down_proj` and a 3-D `gate_up_proj` (gated: Qwen2/3-MoE, Mixtral, OLMoE,
              DeepSeek-V3, GraniteMoE, Ernie-4.5-MoE, ...) or a 3-D `up_proj` with no gate
              (non-gated, NemotronH). Each expert calls `F.linear(x, gate_up_proj[i])`, then
              `F.linear(h, down_proj[i])`. Quantizers: `{first}_input_quantizer` and
              `down_proj_input_quantizer`, one per projection shared by all experts (engines
              use one input scale per projection), and `{first}_weight_quantizers.{i}`,
              `down_proj_weight_quantizers.{i}`, one per expert.
  transposed  `_QuantGptOssExperts` (gpt-oss): weights (E, in, out), used as `x @ W[i] + b[i]`.
              One quantizer per projection for all experts: `gate_up_proj_input_quantizer` (the
              hidden states, once, before routing), `gate_up_proj_weight_quantizer` (the whole
              3-D weight, fake-quantized transposed so NVFP4's blocks run along `in`),
              `down_proj_input_quantizer`, `down_proj_weight_quantizer`.

During the forward, the module's own computation runs unchanged with `F.linear` (fused) or
`Tensor.__matmul__` (transposed) swapped, for that forward only, for a function that puts the
input and the weight through the expert's quantizers. An expert's slice is recognized by where
it lies in the 3-D parameter's storage (which projection, which expert). A forward that
reached none of them while a quantizer is on raises, so another experts implementation
(`grouped_mm`, `batched_mm`) can never leave a model silently unquantized; insert_quantizers
sets `config._experts_implementation = "eager"` as modelopt does.

Same bits, less work: when the class's forward is transformers' eager experts forward word for
word (most MoE families), refquant.hf.experts_loop runs it in a loop of its own, with the
quantizers where the swapped F.linear would put them and the same bits, at one device sync a layer.
In the swapped forward, a shared input quantizer with a fixed per-tensor amax quantizes the hidden
states once before they are routed (each token's row is quantized alone, so gathering rows after
quantizing gives the bits of quantizing the gathered rows), and each projection's per-expert
weights are fake-quantized a group of experts at a time, in one numerics call with one amax per
expert (refquant.quant.quantizer.SliceQuantizers), when the forward first asks for one of them.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.quantizer import SliceQuantizers, TensorQuantizer, quantizer_sees_each_call, quantizes_with_fixed_amax
from .experts_loop import loop_forward, runs_eager_forward
from .swap import quant_class, swapped

EAGER = "eager"  # the experts implementation that calls F.linear per expert
# Experts classes modelopt quantizes with wrappers of their own that refquant does not implement:
# their forwards use torch.bmm / matmul or per-expert modules in ways the fused layout does not.
UNSUPPORTED_EXPERTS = {
    "Llama4TextExperts": "Llama 4",
    "DbrxExperts": "DBRX",
    "DbrxExpertGLU": "DBRX",
    "DbrxFFN": "DBRX",
}
# Config attributes modelopt walks when it forces the eager experts implementation.
NESTED_CONFIGS = ("text_config", "vision_config", "audio_config", "speech_config")


@dataclass(frozen=True)
class ExpertsLayout:
    """How a fused experts module stores its weights.

    kind:       "fused" (F.linear with W[i] of shape (out, in)) or "transposed" (gpt-oss:
                x @ W[i] with W[i] of shape (in, out)).
    first_proj: the first projection's parameter, "gate_up_proj" or (non-gated) "up_proj".
    gated:      whether the first projection holds gate and up (split on export).
    """

    kind: str
    first_proj: str
    gated: bool

    @property
    def projections(self) -> tuple[str, str]:
        return (self.first_proj, "down_proj")


FUSED_GATED = ExpertsLayout("fused", "gate_up_proj", True)
FUSED_NON_GATED = ExpertsLayout("fused", "up_proj", False)
TRANSPOSED = ExpertsLayout("transposed", "gate_up_proj", True)


def _is_3d(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 3


def _is_gpt_oss_experts(cls: type) -> bool:
    return cls.__name__ == "GptOssExperts" and cls.__module__.startswith("transformers.models.gpt_oss")


def _matches_fused_layout(module: nn.Module) -> Optional[ExpertsLayout]:
    """modelopt's structural rule (_fused_experts_wrapper_class): `num_experts`, a 3-D down_proj,
    and a 3-D gate_up_proj (gated), or a 3-D up_proj with neither gate_proj nor gate_up_proj."""
    if not hasattr(module, "num_experts") or not _is_3d(getattr(module, "down_proj", None)):
        return None
    gate_up = getattr(module, "gate_up_proj", None)
    if _is_3d(gate_up):
        return FUSED_GATED
    if _is_3d(getattr(module, "up_proj", None)) and getattr(module, "gate_proj", None) is None and gate_up is None:
        return FUSED_NON_GATED
    return None


def experts_layout(name: str, module: nn.Module) -> Optional[ExpertsLayout]:
    """The layout of a transformers experts module that modelopt quantizes, or None for any other
    module. Raises ValueError for an experts class modelopt quantizes with a wrapper refquant
    does not implement (Llama 4, DBRX), naming the family."""
    cls = getattr(module, "_refquant_original_class", type(module))
    if cls.__name__ in UNSUPPORTED_EXPERTS and cls.__module__.startswith("transformers."):
        raise ValueError(
            f"cannot quantize {name} ({cls.__name__}): modelopt quantizes {UNSUPPORTED_EXPERTS[cls.__name__]} "
            "experts with a wrapper of its own, which refquant does not implement, so its weights "
            "would be left unquantized. Quantize another family (Qwen2/3-MoE, Mixtral, OLMoE, "
            "DeepSeek-V3, gpt-oss, GraniteMoE, Ernie-4.5-MoE), or leave the experts out of the model."
        )
    if _is_gpt_oss_experts(cls):
        return TRANSPOSED
    return _matches_fused_layout(module)


def is_quant_experts(module: nn.Module) -> bool:
    return isinstance(module, QuantExpertsMixin)


def is_fused_experts(module: nn.Module) -> bool:
    """A quantized fused experts module: one weight quantizer per expert slice."""
    return isinstance(module, QuantFusedExpertsMixin)


def force_eager_experts(model: nn.Module) -> bool:
    """modelopt's force_eager_experts_impl_on_the_fly: when the model has fused experts, set
    `_experts_implementation = "eager"` on its config and nested configs, so each expert runs
    through F.linear (the default, "grouped_mm", calls torch._grouped_mm and would bypass the
    quantizers). Returns whether it did. Changes the model's config, as modelopt does."""
    if not any(_matches_fused_layout(m) is not None for m in model.modules()):
        return False

    def force(config) -> None:
        if config is None:
            return
        if hasattr(config, "_experts_implementation"):
            config._experts_implementation = EAGER
        for attribute in NESTED_CONFIGS:
            if hasattr(config, attribute):
                force(getattr(config, attribute))

    force(getattr(model, "config", None))
    return True


# --- the quantized modules --------------------------------------------------------------------
class QuantExpertsMixin:
    """Common part of the quantized experts: which quantizers, calibration counts, the checks."""

    _refquant_original_class: type
    _refquant_layout: ExpertsLayout

    def _setup_expert_quantizers(self, backend: str, flavor: str) -> None:
        raise NotImplementedError

    def expert_quantizers(self) -> Iterator[TensorQuantizer]:
        """Each projection's input quantizer, then its weight quantizer(s), in registration order."""
        for projection in self._refquant_layout.projections:
            input_q, weight_q = self.projection_quantizers(projection)
            yield input_q
            yield from weight_q if isinstance(weight_q, nn.ModuleList) else (weight_q,)

    def _quantizers_on_and_calibrating(self) -> tuple[bool, bool]:
        """(whether any of the experts' quantizers is on, whether any is calibrating), in one pass:
        every forward asks, and a layer has two quantizers per expert."""
        on = calibrating = False
        for quantizer in self.expert_quantizers():
            on = on or quantizer.is_enabled
            calibrating = calibrating or quantizer.is_calibrating
        return on, calibrating

    def _check_experts_implementation(self) -> None:
        implementation = getattr(getattr(self, "config", None), "_experts_implementation", None)
        if implementation not in (None, EAGER):
            raise ValueError(
                f"{type(self).__name__} runs its experts with experts_implementation={implementation!r}, "
                "which does not call F.linear per expert, so its quantizers would be bypassed. "
                "Use the eager implementation, as modelopt forces it: "
                "model.set_experts_implementation('eager') (rq.insert_quantizers sets it)."
            )

    def _bypassed(self, implementation_calls: int, tokens: int) -> None:
        if implementation_calls == 0 and tokens > 0:
            raise ValueError(
                f"{type(self).__name__} ran its forward on {tokens} tokens without the per-expert "
                f"{'F.linear' if self._refquant_layout.kind == 'fused' else 'matmul'} calls its quantizers "
                "sit on, so they were bypassed (experts implementation "
                f"{getattr(getattr(self, 'config', None), '_experts_implementation', None)!r}). Use "
                "model.set_experts_implementation('eager'), or disable the experts' quantizers in the recipe."
            )

    def reset_token_counts(self) -> None:
        """Forget the counts: none until a forward counts with a quantizer calibrating."""
        self.calibration_tokens = None

    def _token_counts(self) -> list[int]:
        """The counts this calibration adds to (started at zero by its first counting forward)."""
        if self.calibration_tokens is None:
            self.calibration_tokens = [0] * self.num_experts
        return self.calibration_tokens

    def experts_without_tokens(self) -> list[int]:
        """The experts that no calibration token reached; empty when no calibrating forward
        counted (no calibration yet, or the experts' quantizers all off)."""
        counts = getattr(self, "calibration_tokens", None) or []
        return [index for index, count in enumerate(counts) if count == 0]


def _storage_of(parameter: torch.Tensor) -> tuple[int, torch.device, int, int, int]:
    """(storage address, device, storage offset, stride along dim 0, slices) of a 3-D parameter."""
    return (parameter.untyped_storage().data_ptr(), parameter.device, parameter.storage_offset(),
            parameter.stride(0), parameter.shape[0])


def _slice_index(storage: tuple[int, torch.device, int, int, int], weight: torch.Tensor, weight_address: int) -> Optional[int]:
    """Which slice of a 3-D parameter (its _storage_of) the view `weight` is, from where it lies in
    the parameter's storage (modelopt's _get_expert_idx_from_first_proj); None when it is not a
    view of that storage. weight_address: weight.untyped_storage().data_ptr(), read once by the
    caller for all the parameters it tries."""
    address, device, offset, stride, slices = storage
    if weight.device != device or weight_address != address:
        return None
    index = (weight.storage_offset() - offset) // stride if stride else 0
    return index if 0 <= index < slices else None


class QuantFusedExpertsMixin(QuantExpertsMixin):
    """modelopt's _QuantFusedExperts (gated) and _QuantNonGatedFusedExperts: per-expert weight
    quantizers in nn.ModuleLists, one input quantizer per projection shared by all experts."""

    def _setup_expert_quantizers(self, backend: str, flavor: str) -> None:
        first = self._refquant_layout.first_proj
        count = self.num_experts
        # modelopt's registration order (named_modules order)
        self.add_module(f"{first}_input_quantizer", TensorQuantizer(backend=backend, flavor=flavor))
        self.add_module(f"{first}_weight_quantizers", nn.ModuleList(TensorQuantizer(backend=backend, flavor=flavor) for _ in range(count)))
        self.add_module("down_proj_input_quantizer", TensorQuantizer(backend=backend, flavor=flavor))
        self.add_module("down_proj_weight_quantizers", nn.ModuleList(TensorQuantizer(backend=backend, flavor=flavor) for _ in range(count)))
        self._refquant_slice_quantizers = {
            projection: SliceQuantizers(getattr(self, f"{projection}_weight_quantizers"))
            for projection in self._refquant_layout.projections
        }
        self.calibration_tokens: Optional[list[int]] = None

    def projection_quantizers(self, projection: str) -> tuple[TensorQuantizer, nn.ModuleList]:
        """(shared input quantizer, per-expert weight quantizers) of "gate_up_proj"/"up_proj" or "down_proj"."""
        return getattr(self, f"{projection}_input_quantizer"), getattr(self, f"{projection}_weight_quantizers")

    def slice_quantizers(self, projection: str) -> SliceQuantizers:
        """The projection's weight quantizers, applied to a stack of expert slices in one call."""
        return self._refquant_slice_quantizers[projection]

    def weights_for_calibration(self) -> Iterator[tuple[str, torch.Tensor, TensorQuantizer]]:
        """modelopt's iter_weights_for_calibration: ("projection.i", expert i's slice, its weight
        quantizer)."""
        for projection, weight, quantizers in self.weight_slices_for_calibration():
            for index, quantizer in enumerate(quantizers):
                yield f"{projection}.{index}", weight[index], quantizer

    def weight_slices_for_calibration(self) -> Iterator[tuple[str, torch.Tensor, nn.ModuleList]]:
        """(projection, its 3-D weight, its per-expert weight quantizers): weights_for_calibration's
        slices a projection at a time."""
        for projection in self._refquant_layout.projections:
            yield projection, getattr(self, projection), self.projection_quantizers(projection)[1]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        on, calibrating = self._quantizers_on_and_calibrating()
        if not on:
            return super().forward(hidden_states, *args, **kwargs)
        self._check_experts_implementation()
        counts = self._token_counts() if calibrating else None
        if self._refquant_layout is FUSED_GATED and runs_eager_forward(self._refquant_original_class) and not kwargs and len(args) == 2:
            output = loop_forward(self, hidden_states, *args, count_tokens=counts)
            if output is not None:
                return output
        first, _ = self._refquant_layout.projections
        parameters = {projection: getattr(self, projection) for projection in self._refquant_layout.projections}
        storages = {projection: _storage_of(parameter) for projection, parameter in parameters.items()}
        expert_weight = self._grouped_expert_weights(parameters)
        first_input_q = getattr(self, f"{first}_input_quantizer")
        routed_input_quantized = False
        if quantizes_with_fixed_amax(first_input_q) and not quantizer_sees_each_call(first_input_q):
            hidden_states = first_input_q(hidden_states)  # once, before routing: same bits per row
            routed_input_quantized = True
        calls = 0
        original_linear = F.linear

        def quantized_linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
            nonlocal calls
            address = weight.untyped_storage().data_ptr()
            for projection, storage in storages.items():
                index = _slice_index(storage, weight, address)
                if index is not None:
                    break
            else:
                raise ValueError(
                    f"{type(self).__name__}: an F.linear call in the experts forward used a weight of shape "
                    f"{tuple(weight.shape)} that is no expert's slice of {' or '.join(parameters)}; refquant "
                    "cannot tell which quantizer it belongs to."
                )
            calls += 1
            input_q, _ = self.projection_quantizers(projection)
            if projection == first:
                if counts is not None:
                    counts[index] += input.shape[0]
                if not routed_input_quantized:
                    input = input_q(input)
            else:
                input = input_q(input)
            return original_linear(input, expert_weight(projection, index, weight), bias)

        with swapped(F, "linear", quantized_linear):
            output = super().forward(hidden_states, *args, **kwargs)
        self._bypassed(calls, hidden_states.shape[0] if hidden_states.dim() else 0)
        return output

    def _grouped_expert_weights(self, parameters: dict[str, torch.Tensor]):
        """expert_weight(projection, index, weight): expert `index`'s slice `weight` through its
        weight quantizer. Where that is exact (SliceQuantizers), the slices of a group of
        consecutive experts (refquant.hf.experts_loop.experts_per_group) are fake-quantized in one
        call when the forward first asks for one of them, and kept until it asks for another
        group: the experts' forwards visit experts in ascending order, so each group is quantized
        once, and one group's quantized weights a projection are held at a time (modelopt holds
        one expert's)."""
        from .experts_loop import experts_per_group

        size = experts_per_group(self)
        held: dict[str, tuple[int, Optional[torch.Tensor]]] = {}

        def expert_weight(projection: str, index: int, weight: torch.Tensor) -> torch.Tensor:
            parameter = parameters[projection]
            # a part of the expert's slice goes to its quantizer alone, as modelopt's call on that view
            whole = (weight.shape == parameter.shape[1:] and weight.stride() == parameter.stride()[1:]
                     and weight.storage_offset() == parameter.storage_offset() + index * parameter.stride(0))
            if whole:
                start = index - index % size
                entry = held.get(projection)
                if entry is None or entry[0] != start:
                    group = parameter[start:start + size]
                    entry = held[projection] = (start, self.slice_quantizers(projection)(group, first=start))
                if entry[1] is not None:
                    return entry[1][index - start]
            return self.projection_quantizers(projection)[1][index](weight)

        return expert_weight


class QuantTransposedExpertsMixin(QuantExpertsMixin):
    """modelopt's _QuantGptOssExperts: one quantizer per projection for all experts; the hidden
    states quantized before routing; weights fake-quantized transposed; the down projection's
    input quantized at each expert's second matmul."""

    def _setup_expert_quantizers(self, backend: str, flavor: str) -> None:
        for name in ("gate_up_proj_input_quantizer", "gate_up_proj_weight_quantizer",
                     "down_proj_input_quantizer", "down_proj_weight_quantizer"):
            self.add_module(name, TensorQuantizer(backend=backend, flavor=flavor))
        self.calibration_tokens: Optional[list[int]] = None

    def projection_quantizers(self, projection: str) -> tuple[TensorQuantizer, TensorQuantizer]:
        return getattr(self, f"{projection}_input_quantizer"), getattr(self, f"{projection}_weight_quantizer")

    def weights_for_calibration(self) -> Iterator[tuple[str, torch.Tensor, TensorQuantizer]]:
        """modelopt's _TransposedExpertsCalibMixin: (projection, each whole weight transposed to
        (E, out, in), the projection's weight quantizer)."""
        for projection in self._refquant_layout.projections:
            yield projection, getattr(self, projection).transpose(-1, -2), self.projection_quantizers(projection)[1]

    def _transposed_weight(self, projection: str) -> torch.Tensor:
        """modelopt's _transposed_quantize: the quantizer sees (E, out, in), contiguous."""
        weight = getattr(self, projection)
        quantizer = self.projection_quantizers(projection)[1]
        if not quantizer.is_enabled:
            return weight  # what the round trip through a quantizer that is off gives
        return quantizer(weight.transpose(-1, -2).contiguous()).transpose(-1, -2)

    def forward(self, hidden_states: torch.Tensor, router_indices=None, routing_weights=None):
        on, calibrating = self._quantizers_on_and_calibrating()
        if not on:
            return super().forward(hidden_states, router_indices, routing_weights)
        self._check_experts_implementation()
        if calibrating and router_indices is not None:
            hits = torch.bincount(router_indices.reshape(-1), minlength=self.num_experts).tolist()
            self.calibration_tokens = [a + b for a, b in zip(self._token_counts(), hits[: self.num_experts])]
        parameters = {projection: getattr(self, projection) for projection in self._refquant_layout.projections}
        storages = {projection: _storage_of(parameter) for projection, parameter in parameters.items()}
        weights = {projection: self._transposed_weight(projection) for projection in parameters}
        hidden_states = self.gate_up_proj_input_quantizer(hidden_states)
        calls = 0
        original_matmul = torch.Tensor.__matmul__

        def quantized_matmul(left: torch.Tensor, right: torch.Tensor):
            nonlocal calls
            address = right.untyped_storage().data_ptr() if isinstance(right, torch.Tensor) else None
            for projection, storage in storages.items():
                index = _slice_index(storage, right, address) if address is not None else None
                if index is not None:
                    break
            else:
                return original_matmul(left, right)
            calls += 1
            if projection == "down_proj":
                left = self.down_proj_input_quantizer(left)
            return torch.matmul(left, weights[projection][index])

        with swapped(torch.Tensor, "__matmul__", quantized_matmul):
            output = super().forward(hidden_states, router_indices, routing_weights)
        self._bypassed(calls, hidden_states.shape[0] if hidden_states.dim() else 0)
        return output


def quant_experts_class(cls: type, layout: ExpertsLayout) -> type:
    """The quantized class for an experts class (QuantQwen3MoeExperts, ...), made once."""
    mixin = QuantTransposedExpertsMixin if layout.kind == "transposed" else QuantFusedExpertsMixin
    return quant_class(mixin, cls, _refquant_original_class=cls, _refquant_layout=layout)


def find_experts(model: nn.Module) -> list[tuple[str, nn.Module, ExpertsLayout]]:
    """Every experts module of `model` modelopt quantizes, quantized or not, with its layout."""
    found = []
    for name, module in model.named_modules():
        layout = module._refquant_layout if is_quant_experts(module) else experts_layout(name, module)
        if layout is not None:
            found.append((name, module, layout))
    return found


@functools.lru_cache(maxsize=64)
def _forward_source(forward) -> Optional[str]:
    """The source of an experts class's forward, read once (a model has an experts module a
    layer); None where there is none to read."""
    try:
        return inspect.getsource(inspect.unwrap(forward))
    except (OSError, TypeError):
        return None


def check_experts_forward(name: str, module: nn.Module, layout: ExpertsLayout) -> None:
    """Raise ValueError unless the experts forward is one whose calls refquant can place
    quantizers on: its source calls F.linear (fused) or `@` (transposed); `layout` is the
    module's (find_experts)."""
    cls = getattr(module, "_refquant_original_class", type(module))
    source = _forward_source(cls.forward)
    if source is None:
        return  # no source to read: the per-forward check (calls counted) still guards it
    needed = "linear(" if layout.kind == "fused" else "@"
    if needed not in source:
        raise ValueError(
            f"cannot quantize {name} ({cls.__module__}.{cls.__name__}): its forward does not call "
            f"{'F.linear' if layout.kind == 'fused' else 'matmul (@)'} per expert, which is where modelopt's "
            f"{'_QuantFusedExperts' if layout.kind == 'fused' else '_QuantGptOssExperts'} places the experts' "
            "quantizers. This experts layout is not supported."
        )


def synchronize_token_counts(model: nn.Module) -> None:
    """Under torch.distributed: every rank's experts get the calibration token counts of all ranks
    together (each rank saw its share of the batches), so the report lists the experts no rank's
    token reached."""
    import torch.distributed as dist

    experts = [module for module in model.modules() if is_quant_experts(module)]
    local = [module.calibration_tokens for module in experts]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    for index, module in enumerate(experts):
        counted = [rank[index] for rank in gathered if rank[index] is not None]
        module.calibration_tokens = [sum(counts) for counts in zip(*counted)] if counted else None
