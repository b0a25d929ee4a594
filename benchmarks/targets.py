"""The compiled backend's speed targets, read from one device run's JSON: a report, never a gate.

    python3 benchmarks/targets.py DIR [--json FILE]

DIR holds what one device run wrote (`bash scripts/gpu_check.sh targets` writes all three):
    DIR/small/ptq_gpu.json    benchmarks/ptq_gpu.py --shapes small (plain, modelopt, compiled,
                              compiled_folded, compiled_fallback; 48 calibration batches)
    DIR/large/ptq_gpu.json    the same for --shapes large
    DIR/kernels/gpu_report.json   benchmarks/gpu_report.py --shapes main
A file or row that is missing leaves its targets "not measured". Each target is a ratio of the
same run (to its plain forward, its plain calibration, its device copy, or modelopt's forward),
so it compares like with like; the card is printed with the table, since ratios differ between
an H100 and an H200. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

RECIPES = ("fp8_default-fp8_kv", "nvfp4_default-fp8_cast_kv")


@dataclass
class Target:
    name: str
    limit: str  # "<= 1.08" or ">= 2.5"
    value: Optional[float]  # None: not measured in this run

    @property
    def met(self) -> Optional[bool]:
        if self.value is None:
            return None
        bound = float(self.limit.split()[1])
        return self.value <= bound if self.limit.startswith("<=") else self.value >= bound


def _rows(path: Path) -> dict[tuple[str, str], dict]:
    """(recipe, variant) -> row of a ptq_gpu.json; {} when the file is missing."""
    if not path.is_file():
        return {}
    return {(row["recipe"], row["variant"]): row for row in json.loads(path.read_text())["rows"] if "error" not in row}


def _ratio(rows: dict, recipe: str, variant: str, of: Callable[[dict], float], to: Callable[[dict], float],
           baseline: tuple[str, str] = ("-", "plain")) -> Optional[float]:
    row, base = rows.get((recipe, variant)), rows.get(baseline)
    if row is None or base is None:
        return None
    return of(row) / to(base)


def _forward_ms(row: dict) -> float:
    return row["forward"]["median_ms"]


def _calibration_s(row: dict) -> float:
    return row["calibration_s"]


def _first_forward_over_steady_s(row: dict) -> Optional[float]:
    """How much longer than a steady forward the first forward after calibration took, in s."""
    warm_up = row["forward"].get("warm_up_each_ms")
    return None if not warm_up else (warm_up[0] - row["forward"]["median_ms"]) / 1e3


def ptq_targets(rows: dict, shape: str) -> list[Target]:
    large = shape == "large"
    targets = []
    for recipe in RECIPES:
        short = recipe.split("-")[0]
        targets.append(Target(f"{shape} {short}: compiled forward / plain", "<= 1.08" if large else "<= 1.15",
                              _ratio(rows, recipe, "compiled", _forward_ms, _forward_ms)))
        targets.append(Target(f"{shape} {short}: folded forward / plain (rq.fold_weights)", "<= 1.08" if large else "<= 1.15",
                              _ratio(rows, recipe, "compiled_folded", _forward_ms, _forward_ms)))
        if not large:
            modelopt = rows.get((recipe, "modelopt"))
            compiled = rows.get((recipe, "compiled"))
            targets.append(Target(f"{shape} {short}: modelopt forward / compiled forward", ">= 2.5",
                                  None if modelopt is None or compiled is None else _forward_ms(modelopt) / _forward_ms(compiled)))
        targets.append(Target(f"{shape} {short}: calibration / plain forwards", "<= 1.10",
                              _ratio(rows, recipe, "compiled", _calibration_s, _calibration_s)))
        compiled = rows.get((recipe, "compiled"))
        targets.append(Target(f"{shape} {short}: first forward after calibration - steady, s", "<= 2.0",
                              None if compiled is None else _first_forward_over_steady_s(compiled)))
        targets.append(Target(f"{shape} {short}: fast launch off, forward / plain", "<= 1.15" if large else "<= 2.0",
                              _ratio(rows, recipe, "compiled_fallback", _forward_ms, _forward_ms)))
        fallback, modelopt = rows.get((recipe, "compiled_fallback")), rows.get((recipe, "modelopt"))
        targets.append(Target(f"{shape} {short}: modelopt forward / fast launch off forward", ">= 1.0",
                              None if fallback is None or modelopt is None else _forward_ms(modelopt) / _forward_ms(fallback)))
    return targets


KERNEL_TARGETS = (
    ("fp8_fake_given", "FP8 fake quant, amax given (modelopt-cpu flavor)", ">= 0.97"),
    ("fp8_fake_given_cuda_flavor", "FP8 fake quant, amax given (modelopt-cuda flavor)", ">= 0.97"),
    ("nvfp4_fake_given", "NVFP4 fake quant, amax given", ">= 0.94"),
    ("nvfp4_fake_computed", "NVFP4 fake quant, amax computed", ">= 0.62"),
    ("nvfp4_real_given", "NVFP4 real quant, amax given", ">= 0.90"),
)


def kernel_targets(report: Optional[dict]) -> list[Target]:
    """End-to-end ratios to a device copy at the main shape (gpu_report.json's timing.main)."""
    timing = {} if report is None else report.get("timing", {}).get("main", {})
    return [Target(f"kernel: {label}, end to end / copy", limit, timing.get(key, {}).get("ratio")) for key, label, limit in KERNEL_TARGETS]


def evaluate(folder: Path) -> tuple[str, list[Target]]:
    """(the card, every target) of the run in `folder`."""
    small, large = _rows(folder / "small" / "ptq_gpu.json"), _rows(folder / "large" / "ptq_gpu.json")
    kernels_path = folder / "kernels" / "gpu_report.json"
    report = json.loads(kernels_path.read_text()) if kernels_path.is_file() else None
    cards = {json.loads(p.read_text()).get("device") for p in (folder / "small" / "ptq_gpu.json", folder / "large" / "ptq_gpu.json", kernels_path)
             if p.is_file()}
    card = ", ".join(sorted(c for c in cards if c)) or "unknown card"
    return card, ptq_targets(large, "large") + ptq_targets(small, "small") + kernel_targets(report)


def format_table(card: str, targets: list[Target]) -> str:
    lines = [f"{card}: each value a ratio within this one run", "", "| target | limit | value | met |", "| --- | --- | --- | --- |"]
    for target in targets:
        value = "not measured" if target.value is None else f"{target.value:.3f}"
        met = {None: "-", True: "yes", False: "no"}[target.met]
        lines.append(f"| {target.name} | {target.limit} | {value} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the run's output folder (small/, large/, kernels/)")
    parser.add_argument("--json", type=Path, default=None, help="also write the targets as JSON here")
    args = parser.parse_args(argv)
    card, targets = evaluate(args.folder)
    print(format_table(card, targets))
    if args.json is not None:
        args.json.write_text(json.dumps({"device": card, "targets": [asdict(t) | {"met": t.met} for t in targets]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
