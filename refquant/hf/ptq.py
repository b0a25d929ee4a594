"""Post-training quantization of a PyTorch / transformers model: insert, apply a recipe, calibrate,
report. Semantics are modelopt's `mtq.quantize(model, cfg, forward_loop)`
(docs/modelopt_behaviour.md §6, §7, §9).

    report = quantize_model(model, recipe, calib_batches, eval_batch=batch)   # in place
    print(report.to_table())

1. insert_quantizers, on the module types modelopt quantizes (refquant.hf.placement): every
   nn.Linear becomes a QuantLinear with `input_quantizer`, `weight_quantizer`, `output_quantizer`;
   every attention module gets `q_bmm_quantizer`, `k_bmm_quantizer`, `v_bmm_quantizer`,
   `p_bmm_quantizer` (refquant.hf.attention); every nn.Embedding gets `weight_quantizer`,
   `output_quantizer` and an `input_quantizer` that never turns on (its input is token ids); every
   nn.LayerNorm (and the other norms, activations and poolings modelopt registers) gets
   `input_quantizer` and `output_quantizer`; GPT-2's Conv1D becomes a QuantLinear, its weight
   transposed in place to [out, in]. A subclass that overrides forward gets none, as in modelopt
   (Gemma's scaled embedding). Names are modelopt's, so recipe patterns mean the same
   (`model.layers.0.self_attn.k_bmm_quantizer`). All start disabled.
2. apply_recipe (refquant.quant.recipe): the recipe's rules, in order, later wins.
3. max calibration (docs/modelopt_behaviour.md §6.1): model.eval(); every enabled quantizer stops
   quantizing and starts collecting max|x| (constant-amax ones only pass data through); every
   weight passes once through its weight quantizer; the forward loop runs over the calibration
   batches without gradients; each quantizer stores what it saw as `_amax` and quantizes from then
   on. Under torch.distributed each rank calibrates its share of the batches and the amaxes are
   all-reduced with MAX (refquant.quant.distributed), so every rank ends with what one process gets
   from all of them.

A model spread over devices by accelerate (device_map, dispatch_model, offload) quantizes exactly as
on one device: its hooks are made to call the quantized forwards (refquant.hf.dispatch).
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from dataclasses_json import DataClassJsonMixin
from torch import nn

from ..numerics.checks import Flavor
from . import placement
from .coverage import WeightCoverage, coverage_warning, weight_coverage
from .attention import check_attention_hookable, is_attention_module, quant_attention_class
from .experts import (
    check_experts_forward, find_experts, force_eager_experts, is_quant_experts, quant_experts_class,
    synchronize_token_counts,
)
from .dispatch import check_forward_rebindable, execution_device, loaded_weights, rebind_forward, require_loaded
from ..quant.distributed import rank_and_world, stop_together, synchronize_calibration
from ..quant.quantizer import QuantizerConfig, SharedInputResult, TensorQuantizer, all_quantizers_off, named_quantizers
from ..quant.metrics import QuantizerError, collect_quantizer_errors

LINEAR_QUANTIZER_NAMES = placement.QUANTIZER_NAMES[placement.LINEAR]
CALIBRATION_ALGORITHMS = ("max", None)


# --- quantized modules ------------------------------------------------------------------------
class QuantLinearMixin:
    """modelopt's QuantLinear: output_quantizer(linear(input_quantizer(x), weight_quantizer(W), b)).

    Mixed in front of the layer's own class (a QuantLinear is still an nn.Linear), so the layer's
    name, weight and bias are untouched; the weight is fake-quantized from the master weight at
    every forward, nothing is cached (docs/modelopt_behaviour.md §6.3).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input = self.input_quantizer(input)
        weight = self.weight_quantizer(self.weight)
        output = F.linear(input, weight, self.bias)
        # A disabled quantizer returns its input: not calling it (recipes leave the output
        # quantizer off) saves a module call a layer, host time in a host-bound forward.
        return self.output_quantizer(output) if self.output_quantizer.is_enabled else output


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


def refuse_unsupported_quantizers(model: nn.Module) -> None:
    """Raise ValueError naming the model class, the first enabled UnsupportedQuantizer and recipe
    rules that would turn them all off."""
    enabled = [(name, q) for name, q in named_quantizers(model) if isinstance(q, UnsupportedQuantizer) and q.is_enabled]
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


class QuantLinear(QuantLinearMixin, nn.Linear):
    pass


class QuantEmbedding(QuantEmbeddingMixin, nn.Embedding):
    pass


_QUANT_CLASSES: dict[type, type] = {nn.Linear: QuantLinear, nn.Embedding: QuantEmbedding}
_MIXINS = {placement.LINEAR: QuantLinearMixin, placement.EMBEDDING: QuantEmbeddingMixin, placement.INPUT: QuantInputMixin}


def _quant_class(mixin: type, cls: type) -> type:
    """QuantLinear / QuantEmbedding, or for another class (a subclass of those layers, a norm) a
    mixin class made once."""
    if cls not in _QUANT_CLASSES:
        _QUANT_CLASSES[cls] = type(f"Quant{cls.__name__}", (mixin, cls), {})
    return _QUANT_CLASSES[cls]


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
    for name, module, _ in experts:
        check_experts_forward(name, module)
    for name, module in conv1ds + converted + attentions + [(name, m) for name, m, _ in experts]:
        check_forward_rebindable(name, module)

    for name, module in conv1ds:
        _conv1d_as_linear(name, module)
    converted += conv1ds
    kinds.update((name, placement.LINEAR) for name, _ in conv1ds)
    for name, module in converted:
        kind = kinds[name]
        module.__class__ = _quant_class(_MIXINS[kind], type(module))
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

    quantizers = named_quantizers(model)
    shared = SharedInputResult()  # q/k/v (and gate/up) input quantizers share one tensor
    for name, quantizer in quantizers:
        quantizer.name, quantizer.backend, quantizer.flavor = name, backend, flavor
        quantizer.shared_input_result = shared
    return [name for name, _ in quantizers]


def _insert_expert_quantizers(model: nn.Module, experts: list, backend: str, flavor: str) -> None:
    """modelopt's fused-experts wrappers on every experts module (refquant.hf.experts), and its
    eager experts implementation forced on the config."""
    for _, module, layout in experts:
        module.__class__ = quant_experts_class(type(module), layout)
        rebind_forward(module)
        module._setup_expert_quantizers(backend, flavor)
    force_eager_experts(model)


# --- calibration ------------------------------------------------------------------------------
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


def _batch_tokens(batch: Any) -> int:
    ids = batch if isinstance(batch, torch.Tensor) else batch.get("input_ids") if isinstance(batch, dict) else None
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


def _is_weight_quantizer(name: str) -> bool:
    """A weight quantizer: `...weight_quantizer`, or an expert's `...weight_quantizers.3`."""
    return name.endswith("weight_quantizer") or re.search(r"weight_quantizers\.\d+$", name) is not None


def _calibrate_weights(model: nn.Module) -> None:
    """modelopt's weight_only_quantize: each enabled weight quantizer sees its weight once, so
    weights calibrate even where the forward never reaches them. Weights accelerate offloaded are
    loaded as their layer's hook loads them around a forward."""
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinearMixin, QuantEmbeddingMixin)) and module.weight_quantizer.is_enabled:
            with loaded_weights(module):
                module.weight_quantizer(require_loaded(f"{name}.weight", module.weight))
        elif is_quant_experts(module):
            _calibrate_expert_weights(name, module)


def _calibrate_expert_weights(name: str, module: nn.Module) -> None:
    """modelopt's iter_weights_for_calibration of the fused experts: each expert's slice through
    its own weight quantizer (gpt-oss: each whole weight, transposed, through the projection's)."""
    with loaded_weights(module):
        for weight, quantizer in module.weights_for_calibration():
            if quantizer.is_enabled:
                quantizer(require_loaded(f"{name} expert weights", weight))


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
    refuse_unsupported_quantizers(model)
    was_training = model.training
    model.eval()
    quantizers = named_quantizers(model)
    for _, quantizer in quantizers:
        quantizer.start_calibration()
    for module in model.modules():
        if is_quant_experts(module):
            module.reset_token_counts()
    rank, world = rank_and_world()
    batches = tokens = 0
    failure: Optional[Exception] = None
    with torch.no_grad():
        try:
            _calibrate_weights(model)
            iterator = calib_batches
            if progress and rank == 0:
                from tqdm.auto import tqdm

                iterator = tqdm(calib_batches, desc="calibrating", unit="batch", leave=False)
            for batch in iterator:
                run_batch(model, batch)
                batches += 1
                tokens += _batch_tokens(batch)
        except Exception as error:
            if world == 1:
                raise
            failure = error  # the other ranks learn of it in the exchange below, then all raise
    if world > 1:
        batches, tokens = synchronize_calibration(
            quantizers, batches=batches, tokens=tokens, error=failure,
            weight_quantizers={name for name, _ in quantizers if _is_weight_quantizer(name)},
            fallback_device=lambda name: execution_device(model.get_submodule(name.rpartition(".")[0])),
        )
    if world > 1:
        synchronize_token_counts(model)
    needs_data = [
        name for name, q in quantizers
        if q.is_calibrating and not _is_weight_quantizer(name)
    ]
    for _, quantizer in quantizers:
        quantizer.finish_calibration()
    model.train(was_training)  # as modelopt's calibrate
    if batches == 0 and needs_data:
        raise ValueError(
            f"calib_batches gave no batch, but {len(needs_data)} enabled activation quantizers (e.g. "
            f"{needs_data[0]}) need calibration data. Pass at least one batch."
        )
    return batches, tokens


# --- the report -------------------------------------------------------------------------------
@dataclass
class QuantizerRow(DataClassJsonMixin):
    """One quantizer after PTQ. amax_source: "calibrated" (a stored amax), "constant" (448, never
    calibrated), "dynamic" (no stored amax: taken from each call's data), or "off" (disabled).
    amax: the per-tensor value, or the largest channel's for per-channel; amax_shape [] per tensor.
    error: SQNR, relative error, clipped and zeroed shares on the evaluation batch (None without one)."""

    name: str
    format: str
    enabled: bool
    amax_source: str
    amax: Optional[float] = None
    amax_shape: list[int] = field(default_factory=list)
    amax_dtype: Optional[str] = None
    axis: Any = None
    rule: Optional[int] = None  # index of the last recipe rule that matched it
    error: Optional[QuantizerError] = None  # what it did on the eval batch (refquant.quant.metrics)


@dataclass
class QualityReport(DataClassJsonMixin):
    """The quantized model against the original on one evaluation batch (logits in fp32)."""

    eval_tokens: int
    max_abs_logit_error: float
    mean_abs_logit_error: float
    top1_agreement: float  # fraction of positions whose argmax token is unchanged
    perplexity_original: Optional[float] = None  # next-token perplexity; None without input_ids
    perplexity_quantized: Optional[float] = None


@dataclass
class SensitivityRow(DataClassJsonMixin):
    """The model with only one unit (a decoder block, or one layer's quantizers) quantized, against
    the original on the evaluation batch (refquant.hf.sensitivity)."""

    unit: str  # "model.layers.3" (a block), "model.layers.3.mlp.down_proj" (a layer)
    patterns: list[str]  # recipe quantizer_name globs that match exactly this unit's enabled quantizers
    quantizers: int
    max_abs_logit_error: float
    mean_abs_logit_error: float
    top1_agreement: float
    perplexity: Optional[float] = None


@dataclass
class SensitivityReport(DataClassJsonMixin):
    """One row per unit, the most costly first (by mean absolute logit error), and recipe rules
    that would keep the `keep` worst units unquantized."""

    granularity: str  # "block" or "layer"
    rows: list[SensitivityRow]
    perplexity_original: Optional[float]
    keep: int
    suggested_rules: str  # quant_cfg items in TOML, to paste at the end of a recipe's quant_cfg
    seconds: float = 0.0


ERROR_SORT_KEYS = ("sqnr", "rel_error", "clipped", "zeroed")


def _worst_first_key(sort_by: str):
    """Sort key over QuantizerRows for `sort_by`: the worst first, rows without a number last."""
    if sort_by not in ERROR_SORT_KEYS:
        raise ValueError(f"sort_by={sort_by!r} is not known; use one of {', '.join(ERROR_SORT_KEYS)} (or None: module order).")
    attribute = {"sqnr": "sqnr_db"}.get(sort_by, sort_by)
    sign = 1.0 if sort_by == "sqnr" else -1.0  # low SQNR is bad; high error and shares are bad

    def key(row: "QuantizerRow") -> tuple[int, float]:
        value = getattr(row.error, attribute, None) if row.error is not None else None
        return (1, 0.0) if value is None else (0, sign * value)

    return key


def _sqnr_text(error: Optional[QuantizerError]) -> str:
    sqnr = None if error is None else error.sqnr_db
    return "-" if sqnr is None else f"{sqnr:.2f}" if math.isfinite(sqnr) else "inf" if sqnr > 0 else "-inf"


def _error_cells(error: Optional[QuantizerError]) -> str:
    """SQNR dB, rel err, clip %, zero %, and NVFP4's fallback and saturated block %."""
    if error is None:
        return f"{'-':>7} {'-':>8} {'-':>7} {'-':>7} {'-':>7} {'-':>7}"
    percent = lambda share: "-" if share is None else f"{100 * share:.3g}"  # noqa: E731
    sqnr = _sqnr_text(error)
    rel_error = "-" if error.rel_error is None else f"{error.rel_error:.4f}"
    return (f"{sqnr:>7} {rel_error:>8} {percent(error.clipped):>7} {percent(error.zeroed):>7} "
            f"{percent(error.block_scale_fallback):>7} {percent(error.block_scale_saturated):>7}")


@dataclass
class PTQReport(DataClassJsonMixin):
    model: str
    recipe: Optional[str]
    algorithm: Optional[str]
    backend: str
    flavor: str
    calib_batches: int
    calib_tokens: int
    quantizers: list[QuantizerRow]
    totals: dict[str, int]
    unmatched_rules: list[str]
    quality: Optional[QualityReport] = None
    seconds: float = 0.0
    world_size: int = 1  # torch.distributed ranks that calibrated, each on its share of the batches
    sensitivity: Optional[SensitivityReport] = None
    coverage: Optional[WeightCoverage] = None  # linear and expert weight parameters quantized
    experts_without_tokens: list[str] = field(default_factory=list)  # "model.layers.1.mlp.experts.3"
    warnings: list[str] = field(default_factory=list)

    def row(self, name: str) -> QuantizerRow:
        for row in self.quantizers:
            if row.name == name:
                return row
        raise KeyError(f"no quantizer named {name!r} in the report")

    def to_table(self, show_disabled: bool = False, sort_by: Optional[str] = None) -> str:
        """The report as text: a header, one line per enabled quantizer (all with show_disabled)
        with its error on the eval batch, the disabled ones collapsed over layer indices, the
        lowest SQNRs, totals, unmatched rules, quality, sensitivity. sort_by: None (module
        order), "sqnr", "rel_error", "clipped" or "zeroed", the worst first."""
        lines = [
            f"refquant PTQ of {self.model}: recipe {self.recipe or '(none)'}, algorithm {self.algorithm}, "
            f"backend {self.backend}, flavor {self.flavor}",
            f"calibration: {self.calib_batches} batches, {self.calib_tokens} tokens"
            + (f" over {self.world_size} ranks" if self.world_size > 1 else "")
            + f"; PTQ took {self.seconds:.1f} s",
            "",
        ]
        shown = [r for r in self.quantizers if r.enabled or show_disabled]
        if sort_by is not None:
            shown.sort(key=_worst_first_key(sort_by))
        width = max([len(r.name) for r in shown] + [9])
        lines.append(
            f"{'quantizer':<{width}}  {'format':<8} {'enabled':<7} {'amax':>12}  {'source':<10} {'dtype':<8} "
            f"{'SQNR dB':>7} {'rel err':>8} {'clip %':>7} {'zero %':>7} {'S=1 %':>7} {'S448 %':>7}  rule"
        )
        for r in shown:
            if r.amax is None:
                amax = "-"
            elif r.amax_shape:
                amax = f"max {r.amax:.5g} {tuple(r.amax_shape)}"
            else:
                amax = f"{r.amax:.6g}"
            lines.append(
                f"{r.name:<{width}}  {r.format:<8} {str(r.enabled).lower():<7} {amax:>12}  "
                f"{r.amax_source:<10} {r.amax_dtype or '-':<8} {_error_cells(r.error)}  {'' if r.rule is None else r.rule}"
            )
        if any(r.error is not None for r in shown):
            lines.append(
                "(on the eval batch: SQNR = 10 log10(sum x^2 / sum (x - q(x))^2); rel err = ||x - q(x)|| / ||x||; "
                "clip = |x| saturated (over half a step beyond the largest value at its scale); zero = nonzero x "
                "that became 0; NVFP4 blocks: S=1 = scale fell back to 1.0, S448 = E4M3 block scale saturated at 448; "
                "docs/ptq.md has the exact definitions)"
            )
        disabled = [r for r in self.quantizers if not r.enabled]
        if disabled and not show_disabled:
            groups = Counter(re.sub(r"\.\d+\.", ".*.", r.name) for r in disabled)
            lines.append(f"\ndisabled ({len(disabled)}):")
            lines += [f"  {pattern}" + (f"  x{count}" if count > 1 else "") for pattern, count in groups.items()]
        measured = sorted((r for r in self.quantizers if r.error is not None), key=_worst_first_key("sqnr"))
        if measured and sort_by is None:
            lines.append("\nlowest SQNR (worst first):")
            for kind, rows in (("weights", [r for r in measured if _is_weight_quantizer(r.name)]),
                               ("activations", [r for r in measured if not _is_weight_quantizer(r.name)])):
                if rows:
                    lines.append(f"  {kind}: " + ", ".join(f"{r.name} {_sqnr_text(r.error)} dB" for r in rows[:3]))
        lines.append("\ntotals: " + ", ".join(f"{key} {value}" for key, value in self.totals.items()))
        lines += self._experts_and_coverage_lines()
        if self.unmatched_rules:
            lines.append(f"recipe rules that matched no quantizer ({len(self.unmatched_rules)}):")
            lines += [f"  {text}" for text in self.unmatched_rules]
        if self.quality is not None:
            q = self.quality
            lines.append(
                f"\nquality on {q.eval_tokens} eval tokens: logit error max {q.max_abs_logit_error:.4g}, "
                f"mean {q.mean_abs_logit_error:.4g}; top-1 agreement {q.top1_agreement:.1%}"
            )
            if q.perplexity_original is not None:
                lines.append(
                    f"perplexity: original {q.perplexity_original:.4f}, quantized {q.perplexity_quantized:.4f} "
                    f"({(q.perplexity_quantized / q.perplexity_original - 1):+.2%})"
                )
        if self.sensitivity is not None:
            lines += ["", self.sensitivity_table()]
        return "\n".join(lines)

    def _experts_and_coverage_lines(self) -> list[str]:
        lines = []
        if self.coverage is not None:
            lines.append(self.coverage.text())
        if self.experts_without_tokens:
            lines.append(
                f"experts no calibration token reached ({len(self.experts_without_tokens)}; their weight scales come "
                "from the weights, their input scales from the layer's shared input quantizer, as modelopt's): "
                + ", ".join(self.experts_without_tokens)
            )
        lines += [f"warning: {text}" for text in self.warnings]
        return lines

    def sensitivity_table(self) -> str:
        """The sensitivity ranking (worst first) and the suggested recipe rules, as text."""
        s = self.sensitivity
        if s is None:
            return "no sensitivity run (quantize with --sensitivity, or refquant.hf.sensitivity.measure_sensitivity)"
        width = max([len(r.unit) for r in s.rows] + [4])
        lines = [
            f"sensitivity: one {s.granularity} quantized at a time, the rest unquantized ({len(s.rows)} runs, "
            f"{s.seconds:.1f} s), the most costly first"
            + ("" if s.perplexity_original is None else f" (original perplexity {s.perplexity_original:.4f})") + ":",
            f"  {'unit':<{width}}  {'quantizers':>10}  {'logit err mean':>14}  {'max':>9}  {'top-1':>7}  perplexity",
        ]
        for r in s.rows:
            perplexity = "-" if r.perplexity is None else f"{r.perplexity:.4f}"
            lines.append(
                f"  {r.unit:<{width}}  {r.quantizers:>10}  {r.mean_abs_logit_error:>14.5g}  "
                f"{r.max_abs_logit_error:>9.4g}  {r.top1_agreement:>7.1%}  {perplexity}"
            )
        if s.suggested_rules:
            lines += ["", f"to keep the {s.keep} most costly unquantized, add these rules at the end of the recipe's quant_cfg:",
                      s.suggested_rules]
        return "\n".join(lines)


def _quantizer_row(name: str, quantizer: TensorQuantizer, rule: Optional[int]) -> QuantizerRow:
    config = quantizer.config
    row = QuantizerRow(name=name, format=config.format, enabled=quantizer.is_enabled, amax_source="off",
                       axis=config.axis, rule=rule)
    if config.use_constant_amax:
        source = "constant"
    elif quantizer.is_calibrated:
        source = "calibrated"
    else:
        source = "dynamic"
    amax = quantizer.amax
    if amax is not None:
        row.amax = float(amax.float().max())
        row.amax_shape = [] if amax.numel() == 1 else list(amax.shape)
        row.amax_dtype = str(amax.dtype).removeprefix("torch.")
    if quantizer.is_enabled:
        row.amax_source = source
    return row


def _rule_text(index: int, rule: Any) -> str:
    parts = [f"rule {index}: quantizer_name={rule.quantizer_name!r}"]
    if getattr(rule, "origin", ""):
        parts.append(f"({rule.origin})")
    if getattr(rule, "parent_class", None):
        parts.append(f"parent_class={rule.parent_class!r}")
    if getattr(rule, "cfg", None) is not None:
        parts.append(f"cfg format={rule.cfg.format}")
    if getattr(rule, "enable", None) is not None:
        parts.append(f"enable={str(rule.enable).lower()}")
    return " ".join(parts)


def _totals(rows: list[QuantizerRow]) -> dict[str, int]:
    enabled = [r for r in rows if r.enabled]
    totals = {"quantizers": len(rows), "enabled": len(enabled)}
    for key, count in sorted(Counter(r.format for r in enabled).items()):
        totals[key] = count
    for key, count in sorted(Counter(r.amax_source for r in enabled).items()):
        totals[key] = count
    totals["quantized_linears"] = sum(1 for r in enabled if r.name.endswith(".weight_quantizer"))
    totals["quantized_kv"] = sum(1 for r in enabled if r.name.endswith(("k_bmm_quantizer", "v_bmm_quantizer")))
    return totals


def _coverage_totals(coverage: WeightCoverage) -> dict[str, int]:
    return {
        "linear_weight_params": coverage.linear_params,
        "linear_weight_params_quantized": coverage.linear_quantized,
        "expert_weight_params": coverage.expert_params,
        "expert_weight_params_quantized": coverage.expert_quantized,
    }


def _experts_without_tokens(model: nn.Module) -> list[str]:
    """Each expert no calibration token reached, named as the checkpoint's expert modules are."""
    return [f"{name}.{index}" for name, module in model.named_modules() if is_quant_experts(module)
            for index in module.experts_without_tokens()]


def _asks_for_weights(recipe: Any, application: Any, quantizers: list) -> bool:
    """Whether a rule of the recipe gives some weight quantizer of the model a format, enabled."""
    weight_names = {name for name, _ in quantizers if _is_weight_quantizer(name)}
    return any(
        rule.cfg is not None and rule.enable is not False and weight_names.intersection(application.matches.get(index, ()))
        for index, rule in enumerate(recipe.quant_cfg)
    )


# --- quality ----------------------------------------------------------------------------------
def _eval_logits(model: nn.Module, batch: Any) -> torch.Tensor:
    """The model's logits on `batch` in eval mode (no dropout), as fp32; the mode is restored."""
    was_training = model.training
    with torch.no_grad():
        output = run_batch(model.eval(), batch)
    model.train(was_training)
    logits = output.logits if hasattr(output, "logits") else output[0] if isinstance(output, tuple) else output
    return logits.detach().float()


def _perplexity(logits: torch.Tensor, batch: Any) -> Optional[float]:
    """exp(mean next-token cross entropy); positions with attention_mask 0 are left out."""
    ids = batch if isinstance(batch, torch.Tensor) else batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.shape[-1] < 2:
        return None
    targets = ids[..., 1:].to(logits.device)
    losses = F.cross_entropy(logits[..., :-1, :].flatten(0, -2), targets.flatten(), reduction="none")
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if isinstance(mask, torch.Tensor):
        keep = mask[..., 1:].to(logits.device).flatten().bool()
        losses = losses[keep]
    return math.exp(float(losses.mean()))


def _quality(original: torch.Tensor, quantized: torch.Tensor, batch: Any) -> QualityReport:
    error = (quantized - original).abs()
    return QualityReport(
        eval_tokens=_batch_tokens(batch),
        max_abs_logit_error=float(error.max()),
        mean_abs_logit_error=float(error.mean()),
        top1_agreement=float((quantized.argmax(-1) == original.argmax(-1)).float().mean()),
        perplexity_original=_perplexity(original, batch),
        perplexity_quantized=_perplexity(quantized, batch),
    )


# --- the flow ---------------------------------------------------------------------------------
def _refuse_quantized_tied_weights(model: nn.Module, recipe: Any, last_rule: dict[str, int]) -> None:
    """Before calibrating: a weight quantizer enabled on a tied weight (lm_head under
    tie_word_embeddings) would give a checkpoint that loses it (refquant.hf.export.plan); name the
    rule that enabled it."""
    from .export.plan import quantized_tied_weights, tied_weight_problem

    for layer, partner in quantized_tied_weights(model).items():
        index = last_rule.get(f"{layer}.weight_quantizer")
        if index is None:
            cause = "Switch it off"
        else:
            rule = recipe.quant_cfg[index]
            cause = (f"Recipe {recipe.name} enables it in quant_cfg[{index}] ({rule.origin or 'rule'}: "
                     f"quantizer_name={rule.quantizer_name!r}): drop that rule")
        raise ValueError(
            f"{tied_weight_problem(layer, partner)}. {cause}, or end the recipe with "
            f"{{ quantizer_name = \"*{layer.rpartition('.')[2]}*\", enable = false }} as the shipped recipes do "
            f"(default_disabled_quantizers keeps lm_head unquantized). Nothing was calibrated."
        )


def quantize_model(
    model: nn.Module,
    recipe: Any,
    calib_batches: Iterable[Any],
    *,
    backend: str = "reference",
    flavor: Flavor = "modelopt-cpu",
    eval_batch: Any = None,
    progress: bool = True,
) -> PTQReport:
    """Quantize `model` in place with `recipe` (a refquant.quant.recipe.Recipe), calibrating on
    `calib_batches` (dicts for model(**batch), or input_ids tensors [batch, seq]).

    recipe=None keeps the quantizers' configs as they are (set them yourself after
    insert_quantizers) and runs max calibration. With `eval_batch`, the report's quality compares
    the quantized model's logits to the original's (taken before calibration, with every quantizer
    off), and each enabled quantizer's row carries what it did to the tensors of that evaluation
    forward (`error`, refquant.quant.metrics; measured beside it, no output bit changes). Under
    torch.distributed, `calib_batches` are this rank's share (max_calibrate); every rank must pass
    the same model and recipe. Raises ValueError when the recipe enables no quantizer in this
    model, when its algorithm is not max calibration, or on bad batches.
    """
    started = time.perf_counter()
    algorithm = "max" if recipe is None else recipe.algorithm
    if algorithm not in CALIBRATION_ALGORITHMS:
        raise ValueError(
            f"recipe {recipe.name!r} asks for algorithm {algorithm!r}; refquant calibrates with 'max' "
            "(or none). Set algorithm = \"max\" in the recipe."
        )
    with stop_together("before calibration"):  # a rank failing here stops the others at once
        insert_quantizers(model, backend=backend, flavor=flavor)
        original_logits = None
        if eval_batch is not None:
            # all quantizers off: a QuantLinear computes exactly what its nn.Linear did
            with all_quantizers_off(model):
                original_logits = _eval_logits(model, eval_batch)
        last_rule: dict[str, int] = {}
        unmatched: list[str] = []
        application = None
        if recipe is not None:
            from ..quant.recipe import apply_recipe, check_application

            application = apply_recipe(model, recipe)
            for index in sorted(application.matches):
                for name in application.matches[index]:
                    last_rule[name] = index
            unmatched = [_rule_text(i, rule) for i, rule in enumerate(recipe.quant_cfg) if not application.matches.get(i)]
            for notice in check_application(application, model):
                warnings.warn(notice, stacklevel=2)
        quantizers = named_quantizers(model)
        if not any(q.is_enabled for _, q in quantizers):
            raise ValueError(
                f"no quantizable layers in {type(model).__name__}: recipe "
                f"{getattr(recipe, 'name', None) or '(none)'} enables none of its {len(quantizers)} "
                "quantizers. Check the recipe's quantizer_name patterns against the model's module names."
            )
        _refuse_quantized_tied_weights(model, recipe, last_rule)
        refuse_unsupported_quantizers(model)

    batches = tokens = 0
    if algorithm == "max":
        batches, tokens = max_calibrate(model, calib_batches, progress=progress)

    quality = None
    errors = {}
    if original_logits is not None:
        with collect_quantizer_errors(model) as meter:  # measured beside the quantizers: no bit changes
            quantized_logits = _eval_logits(model, eval_batch)
        quality = _quality(original_logits, quantized_logits, eval_batch)
        errors = meter.results()
    rows = [_quantizer_row(name, q, last_rule.get(name)) for name, q in quantizers]
    for row in rows:
        row.error = errors.get(row.name)
    coverage = weight_coverage(model)
    report_warnings = []
    if application is not None and _asks_for_weights(recipe, application, quantizers):
        text = coverage_warning(coverage, recipe.name)
        if text is not None:
            warnings.warn(text, stacklevel=2)
            report_warnings.append(text)
    return PTQReport(
        model=type(model).__name__,
        recipe=getattr(recipe, "name", None),
        algorithm=algorithm,
        backend=backend,
        flavor=flavor,
        calib_batches=batches,
        calib_tokens=tokens,
        quantizers=rows,
        totals={**_totals(rows), **_coverage_totals(coverage)},
        unmatched_rules=unmatched,
        quality=quality,
        seconds=round(time.perf_counter() - started, 3),
        world_size=rank_and_world()[1],
        coverage=coverage,
        experts_without_tokens=_experts_without_tokens(model) if algorithm == "max" else [],
        warnings=report_warnings,
    )
