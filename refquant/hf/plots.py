"""Pictures of a PTQ report: SQNR per quantizer by depth, amax per layer, the sensitivity ranking.

    written = plot_report(report, "plots/", model_name="my-llama")   # -> [Path, ...] of PNGs

matplotlib is an optional dependency (`pip install matplotlib`, or the `plot` extra), imported
only here and only when a plot is made; without it require_matplotlib raises MissingPlotDependency
with that instruction. Figures are drawn on matplotlib.figure.Figure (the Agg canvas), never
through pyplot, so no global backend or state is touched.
"""

from __future__ import annotations

import io
import math
import re
from collections import Counter
from pathlib import Path
from typing import Optional

from .placement import is_weight_quantizer
from .report import PTQReport, QuantizerRow

INSTALL_HINT = "pip install matplotlib (or pip install 'refquant[plot]')"
DPI = 100
_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.*)$")  # "model.layers.3.mlp.down_proj..." -> prefix, 3, rest


class MissingPlotDependency(ImportError):
    """matplotlib is not installed; the message says how to install it."""


def require_matplotlib() -> None:
    """Raise MissingPlotDependency (an ImportError) unless matplotlib can be imported."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as error:
        raise MissingPlotDependency(f"plots need matplotlib, which is not installed ({error}): {INSTALL_HINT}.") from None


def _figure(width: float, height: float):
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_png(fig, path: Path) -> Path:
    """PNG at DPI, reduced to a 256-colour palette (line art: a quarter of the bytes, same look;
    the octree method keeps the few pixels of a thin line's colour, median cut merges them)."""
    from PIL import Image  # matplotlib's own dependency

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    with Image.open(buffer) as image:
        octree = getattr(Image, "Quantize", Image).FASTOCTREE  # Pillow >= 9.1 has the enum, older the constant
        image.convert("RGB").quantize(colors=256, method=octree).save(path, format="PNG", optimize=True)
    return path


def _depth_and_kind(name: str) -> tuple[Optional[int], str]:
    """(block index or None, short kind): "model.layers.3.mlp.down_proj.input_quantizer" ->
    (3, "mlp.down_proj"); "model.layers.0.self_attn.k_bmm_quantizer" -> (0, "self_attn.k_bmm")."""
    match = _BLOCK.match(name)
    depth, rest = (int(match.group(2)), match.group(3)) if match else (None, name)
    kind = re.sub(r"\.(input|weight|output)_quantizer$", "", rest)
    return depth, kind.removesuffix("_quantizer")


def _joined_label(kinds: list[str]) -> str:
    """"self_attn.q_proj", "self_attn.k_proj" -> "self_attn.q_proj / k_proj" (same data, one line)."""
    first = kinds[0]
    prefix = first.rpartition(".")[0] + "." if "." in first else ""
    return " / ".join([first] + [k.removeprefix(prefix) for k in kinds[1:]])


def _title(what: str, report: PTQReport, model_name: Optional[str]) -> str:
    return f"{what}\n{model_name or report.model} · recipe {report.recipe or '(none)'}"


def _by_depth_panels(fig, report: PTQReport, value, ylabel: str, *, log: bool, why_missing, min_span: float = 0) -> int:
    """Weights (top) and activations (bottom): one line per quantizer kind over block index, the
    same colour and marker for a kind in both panels; kinds with identical values (q/k/v_proj see
    the same input) share a line; a quantizer outside the blocks (lm_head) sits right of them.
    A linear y axis spans at least `min_span`. `value(row)` gives the y value or None (left out; `why_missing(row)` says why, in the panel
    title). Returns the number of points drawn."""
    rows = [r for r in report.quantizers if r.enabled]
    kinds = list(dict.fromkeys(_depth_and_kind(r.name)[1] for r in rows))
    style = {kind: (f"C{i % 10}", "osD^v<>ph*"[i % 10]) for i, kind in enumerate(kinds)}
    depths = [d for d in (_depth_and_kind(r.name)[0] for r in rows) if d is not None]
    last = max(depths) if depths else -1
    extra: dict[str, int] = {}  # quantizers outside the blocks -> x position
    axes = fig.subplots(2, 1, sharex=True)
    drawn = 0
    for ax, (title, weights) in zip(axes, (("weights", True), ("activations: linear inputs, K/V cache", False))):
        series: dict[str, dict[int, float]] = {}
        missing: Counter = Counter()
        for row in rows:
            if is_weight_quantizer(row.name) != weights:
                continue
            depth, kind = _depth_and_kind(row.name)
            y = value(row)
            if y is None:
                missing[why_missing(row)] += 1
                continue
            if depth is None:
                depth = extra.setdefault(kind, last + 1 + len(extra))
            series.setdefault((kind, row.format), {})[depth] = y
        lines: dict[tuple, list[str]] = {}  # (format, points) -> kinds
        for (kind, format), points in series.items():
            lines.setdefault((format, tuple(sorted(points.items()))), []).append(kind)
        for (format, points), same in lines.items():
            color, marker = style[same[0]]
            xs, ys = zip(*points)
            ax.plot(xs, ys, color=color, marker=marker, linewidth=1.2, markersize=5, label=f"{_joined_label(same)} ({format})")
            drawn += len(xs)
        if log and lines:
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")
            low, high = ax.get_ylim()
            decades = math.log10(high / low)  # label every tick within about a decade, 2-3-5 up to two
            labelled = "123456789" if decades < 1.2 else "235" if decades < 2 else ""
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _, labelled=labelled: f"{v:g}" if f"{v:.0e}"[0] in labelled else ""))
            ax.tick_params(axis="y", which="minor", labelsize=8)
        elif min_span and lines:
            low, high = ax.get_ylim()
            if high - low < min_span:  # small differences stay small on the page
                middle = (high + low) / 2
                ax.set_ylim(middle - min_span / 2, middle + min_span / 2)
        note = "; ".join(f"{count} {reason}" for reason, count in missing.items())
        ax.set_title(title + (f"   (not drawn: {note})" if note else ""), fontsize=10, loc="left")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if lines:
            ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="quantizer (format)", title_fontsize=8)
        else:
            ax.text(0.5, 0.5, "none", transform=ax.transAxes, ha="center", va="center", color="gray")
    ticks = list(range(last + 1)) + list(extra.values())
    axes[-1].set_xticks(ticks, [str(t) for t in range(last + 1)] + list(extra))
    axes[-1].set_xlabel("decoder block (model.layers.N)")
    return drawn


def plot_sqnr_by_depth(report: PTQReport, path: Path, model_name: Optional[str] = None) -> Path:
    """SQNR (dB) of every measured quantizer by depth, weights and activations apart."""
    fig = _figure(9, 6.5)

    def sqnr(row: QuantizerRow) -> Optional[float]:
        value = None if row.error is None else row.error.sqnr_db
        return value if value is not None and math.isfinite(value) else None

    def why(row: QuantizerRow) -> str:
        return "not measured" if row.error is None or row.error.sqnr_db is None else "lossless (SQNR inf)"

    # at least 6.02 dB (one bit of precision) of y axis, so that a tenth of a dB does not fill the panel
    drawn = _by_depth_panels(fig, report, sqnr, "SQNR (dB), higher is better", log=False, why_missing=why, min_span=6.02)
    if not drawn:
        raise ValueError("the report has no quantization error to plot: pass eval_batch to quantize_model.")
    what = "SQNR = 10 log10(Σ x² / Σ (x − q(x))²) of each quantizer on the evaluation batch, by depth"
    fig.suptitle(_title(what, report, model_name), fontsize=11)
    return save_png(fig, path)


def plot_amax_by_depth(report: PTQReport, path: Path, model_name: Optional[str] = None) -> Path:
    """Calibrated amax of every quantizer by depth (log scale), weights and activations apart;
    constant-amax (448) and dynamic quantizers are left out and counted in the panel title."""
    fig = _figure(9, 6.5)

    def calibrated(row: QuantizerRow) -> Optional[float]:
        return row.amax if row.amax_source == "calibrated" and row.amax and row.amax > 0 else None

    def why(row: QuantizerRow) -> str:
        return {"constant": "with the constant amax 448", "dynamic": "with a per-call amax"}.get(row.amax_source, "amax 0")

    _by_depth_panels(fig, report, calibrated, "amax = max |x| in calibration", log=True, why_missing=why)
    what = "Calibrated amax of each quantizer, by depth (per-channel: the largest channel's)"
    fig.suptitle(_title(what, report, model_name), fontsize=11)
    return save_png(fig, path)


def plot_sensitivity(report: PTQReport, path: Path, model_name: Optional[str] = None, top: int = 20) -> Path:
    """The sensitivity ranking: mean |logit error| with only one unit quantized, the worst at the
    top (at most `top` units); the suggested-to-keep units highlighted; the whole quantized
    model's error as a dashed line."""
    sensitivity = report.sensitivity
    if sensitivity is None or not sensitivity.rows:
        raise ValueError("the report has no sensitivity ranking: run with --sensitivity (refquant.hf.sensitivity).")
    rows = sensitivity.rows[:top]
    fig = _figure(9, 1.2 + 0.32 * len(rows) + 1.0)
    ax = fig.subplots()
    positions = list(range(len(rows)))[::-1]
    colors = ["tab:red" if index < sensitivity.keep else "tab:blue" for index in range(len(rows))]
    ax.barh(positions, [r.mean_abs_logit_error for r in rows], color=colors, height=0.7)
    ax.set_yticks(positions, [r.unit for r in rows], fontsize=8)
    for y, row in zip(positions, rows):
        text = f" {row.mean_abs_logit_error:.3g}" + ("" if row.perplexity is None else f"  (ppl {row.perplexity:.1f})")
        ax.text(row.mean_abs_logit_error, y, text, va="center", fontsize=7)
    handles = [ax.bar([0], [0], color="tab:red", label=f"suggested to keep unquantized ({sensitivity.keep})")]
    if report.quality is not None:
        handles.append(ax.axvline(report.quality.mean_abs_logit_error, color="black", linestyle="--", linewidth=1,
                                  label=f"every quantizer on: {report.quality.mean_abs_logit_error:.3g}"))
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.set_xlim(0, max([r.mean_abs_logit_error for r in rows] + [report.quality.mean_abs_logit_error if report.quality else 0]) * 1.35)
    ax.set_xlabel(f"mean |logit error| against the original model, only this {sensitivity.granularity} quantized (fp32 logits)")
    shown = f"the {len(rows)} most costly of {len(sensitivity.rows)}" if len(sensitivity.rows) > len(rows) else f"all {len(rows)}"
    original = "" if sensitivity.perplexity_original is None else f"; original perplexity {sensitivity.perplexity_original:.1f}"
    ax.set_title(f"{shown} {sensitivity.granularity}s, the most costly at the top (ppl: perplexity with only it quantized{original})",
                 fontsize=9, loc="left")
    ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(_title(f"Sensitivity: one {sensitivity.granularity} quantized at a time", report, model_name), fontsize=11)
    return save_png(fig, path)


def plot_report(report: PTQReport, out_dir: str | Path, model_name: Optional[str] = None) -> list[Path]:
    """Write sqnr_by_depth.png, amax_by_depth.png and (with a sensitivity run) sensitivity.png into
    `out_dir` (created if needed); returns their paths. Raises MissingPlotDependency without
    matplotlib, ValueError when the report has no error metrics (no eval_batch)."""
    require_matplotlib()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--plot {out}: exists and is not a folder. Pass a folder for the PNGs.")
    out.mkdir(parents=True, exist_ok=True)
    written = [
        plot_sqnr_by_depth(report, out / "sqnr_by_depth.png", model_name),
        plot_amax_by_depth(report, out / "amax_by_depth.png", model_name),
    ]
    if report.sensitivity is not None:
        written.append(plot_sensitivity(report, out / "sensitivity.png", model_name))
    return written
