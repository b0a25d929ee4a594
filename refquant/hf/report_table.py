"""The PTQ report as text (refquant.hf.report's PTQReport.to_table and sensitivity_table): one line
per quantizer with its amax and its error on the evaluation batch, the disabled ones collapsed, the
lowest SQNRs, totals, coverage, quality, and the sensitivity ranking.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import TYPE_CHECKING, Optional

from .placement import is_weight_quantizer
from ..quant.metrics import QuantizerError

if TYPE_CHECKING:
    from .report import PTQReport, QuantizerRow, SensitivityReport


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


def ptq_table(report: PTQReport, show_disabled: bool = False, sort_by: Optional[str] = None) -> str:
    """PTQReport.to_table: the report as text."""
    lines = [
        f"refquant PTQ of {report.model}: recipe {report.recipe or '(none)'}, algorithm {report.algorithm}, "
        f"backend {report.backend}, flavor {report.flavor}",
        f"calibration: {report.calib_batches} batches, {report.calib_tokens} tokens"
        + (f" over {report.world_size} ranks" if report.world_size > 1 else "")
        + f"; PTQ took {report.seconds:.1f} s",
        "",
    ]
    shown = [r for r in report.quantizers if r.enabled or show_disabled]
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
    disabled = [r for r in report.quantizers if not r.enabled]
    if disabled and not show_disabled:
        groups = Counter(re.sub(r"\.\d+\.", ".*.", r.name) for r in disabled)
        lines.append(f"\ndisabled ({len(disabled)}):")
        lines += [f"  {pattern}" + (f"  x{count}" if count > 1 else "") for pattern, count in groups.items()]
    measured = sorted((r for r in report.quantizers if r.error is not None), key=_worst_first_key("sqnr"))
    if measured and sort_by is None:
        lines.append("\nlowest SQNR (worst first):")
        for kind, rows in (("weights", [r for r in measured if is_weight_quantizer(r.name)]),
                           ("activations", [r for r in measured if not is_weight_quantizer(r.name)])):
            if rows:
                lines.append(f"  {kind}: " + ", ".join(f"{r.name} {_sqnr_text(r.error)} dB" for r in rows[:3]))
    lines.append("\ntotals: " + ", ".join(f"{key} {value}" for key, value in report.totals.items()))
    lines += _experts_and_coverage_lines(report)
    if report.unmatched_rules:
        lines.append(f"recipe rules that matched no quantizer ({len(report.unmatched_rules)}):")
        lines += [f"  {text}" for text in report.unmatched_rules]
    if report.quality is not None:
        q = report.quality
        lines.append(
            f"\nquality on {q.eval_tokens} eval tokens: logit error max {q.max_abs_logit_error:.4g}, "
            f"mean {q.mean_abs_logit_error:.4g}; top-1 agreement {q.top1_agreement:.1%}"
        )
        if q.perplexity_original is not None:
            lines.append(
                f"perplexity: original {q.perplexity_original:.4f}, quantized {q.perplexity_quantized:.4f} "
                f"({(q.perplexity_quantized / q.perplexity_original - 1):+.2%})"
            )
    if report.sensitivity is not None:
        lines += ["", sensitivity_table(report.sensitivity)]
    return "\n".join(lines)


def _experts_and_coverage_lines(report: PTQReport) -> list[str]:
    lines = []
    if report.coverage is not None:
        lines.append(report.coverage.text())
    if report.experts_without_tokens:
        lines.append(
            f"experts no calibration token reached ({len(report.experts_without_tokens)}; their weight scales come "
            "from the weights, their input scales from the layer's shared input quantizer, as modelopt's): "
            + ", ".join(report.experts_without_tokens)
        )
    lines += [f"warning: {text}" for text in report.warnings]
    return lines


def sensitivity_table(sensitivity: Optional[SensitivityReport]) -> str:
    """The sensitivity ranking (worst first) and the suggested recipe rules, as text."""
    s = sensitivity
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
