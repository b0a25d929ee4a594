"""The compiled backend's speed targets, read from device runs' JSON: a report, never a gate.

    python3 benchmarks/targets.py DIR [DIR ...] [--json FILE]

Each DIR is what one device call wrote; between them they hold (`bash scripts/gpu_check.sh
targets` writes the first and third, `targets_large` the second):
    small/ptq_gpu.json        benchmarks/ptq_gpu.py --shapes small (plain, modelopt, compiled,
                              compiled_folded, compiled_fallback; 48 calibration batches)
    large/ptq_gpu.json        the same for --shapes large
    kernels/gpu_report.json   benchmarks/gpu_report.py --shapes main
What is missing, cut short or unreadable leaves its targets "not measured"; so does a run whose
settings make a target meaningless (not 48 calibration batches, the fast launch off in a
compiled row, modelopt without its FP8 CUDA extension for the targets that compare with it).
Each speed target is a ratio within one run (to its plain forward, its plain calibration, its
device copy, or modelopt's forward); the bits rows say whether each variant's amaxes and logits
equal modelopt's (the fallback's also the compiled run's). A forward target notes which of its
forwards were host-bound (host time at least 0.9 of the forward's): their ratio is the host's
speed at that moment as much as refquant's. The cards are printed with the table: ratios differ
between an H100 and an H200. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

RECIPES = ("fp8_default-fp8_kv", "nvfp4_default-fp8_cast_kv")
CALIBRATION_BATCHES = 48


@dataclass
class Target:
    name: str
    limit: str  # "<= 1.08", ">= 2.5", "> 1.0" or "== 1" (bits: 1 when equal, 0 when not)
    value: Optional[float]  # None: not measured in these runs
    note: str = ""  # e.g. which of the compared forwards the host set the pace of

    @property
    def met(self) -> Optional[bool]:
        if self.value is None:
            return None
        relation, bound = self.limit.split()
        return {"<=": self.value <= float(bound), ">=": self.value >= float(bound), ">": self.value > float(bound),
                "==": self.value == float(bound)}[relation]


@dataclass
class Run:
    """One ptq_gpu.json: its rows by (recipe, variant), kept only when they have what is read."""

    rows: dict
    batches: Optional[int]
    modelopt_extension: Optional[bool]
    device: Optional[str]


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing, or cut short while written


def _run(path: Path) -> Run:
    document = _read(path) or {}
    rows = {}
    for row in document.get("rows", []):
        if "error" not in row and "forward" in row and "calibration_s" in row and "median_ms" in row["forward"]:
            rows[(row.get("recipe"), row.get("variant"))] = row
    return Run(rows, document.get("settings", {}).get("batches"), document.get("modelopt_fp8_extension"),
               document.get("device"))


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a / b


def _forward_ms(row: Optional[dict]) -> Optional[float]:
    return None if row is None else row["forward"]["median_ms"]


def _calibration_s(row: Optional[dict]) -> Optional[float]:
    return None if row is None else row["calibration_s"]


def _first_forward_over_steady_s(row: Optional[dict]) -> Optional[float]:
    """How much longer than a steady forward the first forward after calibration took, in s
    (ptq_gpu.py's first warm-up forward is the first forward after quantize_model)."""
    warm_up = None if row is None else row["forward"].get("warm_up_each_ms")
    return None if not warm_up else (warm_up[0] - row["forward"]["median_ms"]) / 1e3


HOST_BOUND_SHARE = 0.9  # a forward whose host time is at least this share of its time is host-bound


def _host_bound(**rows: Optional[dict]) -> str:
    """Which of the compared forwards were host-bound (the host issued them about as slowly as the
    GPU ran them, so their time is the host's speed at that moment): "compiled host-bound (20.0
    of 20.6 ms)", or "" when none was."""
    notes = []
    for label, row in rows.items():
        forward = {} if row is None else row["forward"]
        host, median = forward.get("host_ms"), forward.get("median_ms")
        if host is not None and median and host >= HOST_BOUND_SHARE * median:
            notes.append(f"{label} host-bound ({host:.1f} of {median:.1f} ms)")
    return "; ".join(notes)


def _same_bits(row: Optional[dict], key: str) -> Optional[float]:
    """1.0 when the row's comparison `key` (vs_modelopt, vs_compiled) found every amax and logit
    equal, 0.0 when not, None when there was none."""
    comparison = None if row is None else row.get(key)
    if not comparison:
        return None
    equal = comparison["amax_same"] == comparison["amax_compared"] and comparison["logits_differing"] == 0
    return 1.0 if equal else 0.0


def ptq_targets(run: Run, shape: str) -> list[Target]:
    large = shape == "large"
    full = run.batches == CALIBRATION_BATCHES
    modelopt_best = run.modelopt_extension is not False  # False: modelopt ran without its FP8 extension
    targets = []
    for recipe in RECIPES:
        short = recipe.split("-")[0]
        plain = run.rows.get(("-", "plain"))
        compiled = run.rows.get((recipe, "compiled"))
        if compiled is not None and not compiled.get("fast_paths", {}).get("kernel_launch", True):
            compiled = None  # the fast launch was off in this "compiled" row: not the run the targets are for
        folded = run.rows.get((recipe, "compiled_folded"))
        fallback = run.rows.get((recipe, "compiled_fallback"))
        modelopt = run.rows.get((recipe, "modelopt")) if modelopt_best else None
        name = f"{shape} {short}:"
        targets.append(Target(f"{name} compiled forward / plain", "<= 1.08" if large else "<= 1.15",
                              _ratio(_forward_ms(compiled), _forward_ms(plain)), _host_bound(compiled=compiled, plain=plain)))
        if not large:
            targets.append(Target(f"{name} modelopt forward / compiled forward", ">= 2.5",
                                  _ratio(_forward_ms(modelopt), _forward_ms(compiled)),
                                  _host_bound(modelopt=modelopt, compiled=compiled)))
        targets += [
            Target(f"{name} calibration / plain forwards ({CALIBRATION_BATCHES} batches)", "<= 1.10",
                   _ratio(_calibration_s(compiled), _calibration_s(plain)) if full else None),
            Target(f"{name} first forward after calibration - steady, s", "<= 2.0", _first_forward_over_steady_s(compiled)),
            Target(f"{name} fast launch off, forward / plain", "<= 1.15" if large else "<= 2.0",
                   _ratio(_forward_ms(fallback), _forward_ms(plain)), _host_bound(**{"fast launch off": fallback, "plain": plain})),
            Target(f"{name} modelopt forward / fast launch off forward", "> 1.0",
                   _ratio(_forward_ms(modelopt), _forward_ms(fallback)), _host_bound(modelopt=modelopt, **{"fast launch off": fallback})),
            Target(f"{name} (extra) folded forward / plain", "<= 1.08" if large else "<= 1.15",
                   _ratio(_forward_ms(folded), _forward_ms(plain)), _host_bound(folded=folded, plain=plain)),
            Target(f"{name} bits: compiled = modelopt (amax, logits)", "== 1", _same_bits(compiled, "vs_modelopt")),
            Target(f"{name} bits: folded = modelopt", "== 1", _same_bits(folded, "vs_modelopt")),
            Target(f"{name} bits: fast launch off = modelopt", "== 1", _same_bits(fallback, "vs_modelopt")),
            Target(f"{name} bits: fast launch off = compiled", "== 1", _same_bits(fallback, "vs_compiled")),
        ]
    return targets


KERNEL_TARGETS = (
    ("fp8_fake_given", "FP8 fake quant, amax given (modelopt-cpu flavor)", ">= 0.97"),
    ("fp8_fake_given_cuda_flavor", "FP8 fake quant, amax given (modelopt-cuda flavor)", ">= 0.97"),
    ("nvfp4_fake_given", "NVFP4 fake quant, amax given", ">= 0.94"),
    ("nvfp4_fake_computed", "NVFP4 fake quant, amax computed", ">= 0.62"),
    ("nvfp4_real_given", "NVFP4 real quant, amax given", ">= 0.90"),
)


def kernel_targets(report: Optional[dict]) -> list[Target]:
    """End-to-end ratios to a device copy at the main shape (gpu_report.json's timing.main), and
    whether each kernel's bits equal the eager reference's."""
    timing = {} if report is None else report.get("timing", {}).get("main", {})
    targets = []
    for key, label, limit in KERNEL_TARGETS:
        row = timing.get(key, {})
        targets.append(Target(f"kernel: {label}, end to end / copy", limit, row.get("ratio")))
        differing = row.get("differing_vs_eager")
        targets.append(Target(f"kernel: {label}, bits = the reference", "== 1", None if differing is None else float(differing == 0)))
    return targets


def _find(folders: list[Path], relative: str) -> Path:
    """The first of the folders that holds `relative`, else the path in the first folder."""
    return next((folder / relative for folder in folders if (folder / relative).is_file()), folders[0] / relative)


def evaluate(folders: list[Path]) -> tuple[str, list[Target]]:
    """(the cards, every target) of the runs in `folders`."""
    small, large = _run(_find(folders, "small/ptq_gpu.json")), _run(_find(folders, "large/ptq_gpu.json"))
    report = _read(_find(folders, "kernels/gpu_report.json"))
    cards = {c for c in (small.device, large.device, None if report is None else report.get("device")) if c}
    card = ", ".join(sorted(cards)) or "unknown card"
    return card, ptq_targets(large, "large") + ptq_targets(small, "small") + kernel_targets(report)


def format_table(card: str, targets: list[Target]) -> str:
    lines = [f"{card}: each value a ratio within one run", "", "| target | limit | value | met | note |",
             "| --- | --- | --- | --- | --- |"]
    for target in targets:
        value = "not measured" if target.value is None else f"{target.value:.3f}"
        met = {None: "-", True: "yes", False: "no"}[target.met]
        lines.append(f"| {target.name} | {target.limit} | {value} | {met} | {target.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", type=Path, nargs="+", help="the runs' output folders (small/, large/, kernels/)")
    parser.add_argument("--json", type=Path, default=None, help="also write the targets as JSON here")
    args = parser.parse_args(argv)
    card, targets = evaluate(args.folders)
    print(format_table(card, targets))
    if args.json is not None:
        args.json.write_text(json.dumps({"device": card, "targets": [asdict(t) | {"met": t.met} for t in targets]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
