"""Post-training quantization of a PyTorch / transformers model: insert, apply a recipe, calibrate,
report. Semantics are modelopt's `mtq.quantize(model, cfg, forward_loop)`
(docs/modelopt_behaviour.md §6, §7, §9).

    report = quantize_model(model, recipe, calib_batches, eval_batch=batch)   # in place
    print(report.to_table())

1. insert_quantizers (refquant.hf.insert), on the module types modelopt quantizes
   (refquant.hf.placement): every nn.Linear becomes a QuantLinear with `input_quantizer`,
   `weight_quantizer`, `output_quantizer`; every attention module gets `q_bmm_quantizer`,
   `k_bmm_quantizer`, `v_bmm_quantizer`, `p_bmm_quantizer` (refquant.hf.attention); every
   nn.Embedding gets `weight_quantizer`, `output_quantizer` and an `input_quantizer` that never
   turns on (its input is token ids); every nn.LayerNorm (and the other norms, activations and
   poolings modelopt registers) gets `input_quantizer` and `output_quantizer`; GPT-2's Conv1D
   becomes a QuantLinear, its weight transposed in place to [out, in]; fused MoE experts (3-D
   weights, refquant.hf.experts) get an input quantizer per projection, shared by the experts, and
   a weight quantizer per expert (`gate_up_proj_input_quantizer`,
   `gate_up_proj_weight_quantizers.{i}`, ...; gpt-oss: one of each per projection). A subclass that
   overrides forward gets none, as in modelopt (Gemma's scaled embedding). Names are modelopt's, so
   recipe patterns mean the same (`model.layers.0.self_attn.k_bmm_quantizer`). All start disabled.
2. apply_recipe (refquant.quant.recipe): the recipe's rules, in order, later wins.
3. max calibration (refquant.hf.calibrate, docs/modelopt_behaviour.md §6.1): model.eval(); every
   enabled quantizer stops quantizing and starts collecting max|x| (constant-amax ones only pass
   data through); every weight passes once through its weight quantizer; the forward loop runs over
   the calibration batches without gradients; each quantizer stores what it saw as `_amax` and
   quantizes from then on. Under torch.distributed each rank calibrates its share of the batches
   and the amaxes are all-reduced with MAX (refquant.quant.distributed), so every rank ends with
   what one process gets from all of them.
4. the report (refquant.hf.report; its text, refquant.hf.report_table): a row per quantizer,
   totals, weight coverage, and with an evaluation batch the quality against the original model
   (refquant.hf.quality) and each quantizer's error on it (refquant.quant.metrics).

A model spread over devices by accelerate (device_map, dispatch_model, offload) quantizes exactly as
on one device: its hooks are made to call the quantized forwards (refquant.hf.dispatch).
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from typing import Any, Iterable, Optional

from torch import nn

from ..numerics.checks import Flavor, largest_values
from .coverage import WeightCoverage, coverage_warning, weight_coverage
from .experts import is_quant_experts
from .insert import insert_quantizers, refuse_unsupported_quantizers
from .calibrate import max_calibrate
from .quality import eval_logits, quality_report
from .placement import is_weight_quantizer
from .report import PTQReport, QuantizerRow
from ..quant.distributed import rank_and_world, stop_together
from ..quant.quantizer import TensorQuantizer, all_quantizers_off, named_quantizers
from ..quant.metrics import collect_quantizer_errors

# The flow's parts, importable from here too.
from .insert import (  # noqa: F401
    LINEAR_QUANTIZER_NAMES, HardDisabledQuantizer, QuantEmbedding, QuantEmbeddingMixin, QuantInputMixin, QuantLinear,
    QuantLinearMixin, UnsupportedQuantizer,
)
from .calibrate import run_batch  # noqa: F401
from .report import QualityReport, SensitivityReport, SensitivityRow  # noqa: F401
from .report_table import ERROR_SORT_KEYS  # noqa: F401

CALIBRATION_ALGORITHMS = ("max", None)


def _quantizer_rows(quantizers: list[tuple[str, TensorQuantizer]], last_rule: dict[str, int]) -> list[QuantizerRow]:
    """The report's row of each quantizer; the amaxes read back at once (refquant.numerics.checks.largest_values)."""
    rows = [_quantizer_row(name, q, last_rule.get(name)) for name, q in quantizers]
    stored = [(row, q.amax) for row, (_, q) in zip(rows, quantizers) if q.amax is not None]
    for (row, _), value in zip(stored, largest_values([amax for _, amax in stored])):
        row.amax = value
    return rows


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
    if amax is not None:  # row.amax: filled in by _quantizer_rows
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
    weight_names = {name for name, _ in quantizers if is_weight_quantizer(name)}
    return any(
        rule.cfg is not None and rule.enable is not False and weight_names.intersection(application.matches.get(index, ()))
        for index, rule in enumerate(recipe.quant_cfg)
    )



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
                original_logits = eval_logits(model, eval_batch)
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
        refuse_unsupported_quantizers(quantizers)

    batches = tokens = 0
    if algorithm == "max":
        batches, tokens = max_calibrate(model, calib_batches, progress=progress)

    quality = None
    errors = {}
    if original_logits is not None:
        with collect_quantizer_errors(model) as meter:  # measured beside the quantizers: no bit changes
            quantized_logits = eval_logits(model, eval_batch)
        quality = quality_report(original_logits, quantized_logits, eval_batch)
        errors = meter.results()
    rows = _quantizer_rows(quantizers, last_rule)
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
