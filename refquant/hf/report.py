"""The PTQ report's types: what quantize_model returns, as dataclasses that read and write JSON
(to_json, from_json; the field order is the JSON's). Their text tables are
refquant.hf.report_table's.

    report = quantize_model(model, recipe, calib_batches, eval_batch=batch)
    print(report.to_table())
    report.row("model.layers.0.mlp.down_proj.weight_quantizer").amax
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from dataclasses_json import DataClassJsonMixin

from .coverage import WeightCoverage
from .report_table import ptq_table, sensitivity_table
from ..quant.metrics import QuantizerError


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
        return ptq_table(self, show_disabled, sort_by)

    def sensitivity_table(self) -> str:
        """The sensitivity ranking (worst first) and the suggested recipe rules, as text."""
        return sensitivity_table(self.sensitivity)
