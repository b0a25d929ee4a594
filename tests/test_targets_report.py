"""benchmarks/targets.py reads one device run's JSON into the compiled backend's targets (a report:
no time is asserted here or there). Checked on the run files kept in benchmarks/results."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))

import targets  # noqa: E402


def _run_folder(tmp_path: Path, small: str | None, large: str | None, kernels: str | None) -> Path:
    for sub, name, file in (("small", small, "ptq_gpu.json"), ("large", large, "ptq_gpu.json"), ("kernels", kernels, "gpu_report.json")):
        if name is not None:
            (tmp_path / sub).mkdir()
            shutil.copy(RESULTS / name, tmp_path / sub / file)
    return tmp_path


def test_targets_of_a_kept_run_are_the_ratios_of_its_json(tmp_path):
    folder = _run_folder(tmp_path, "ptq_gpu_small_h100_2026-12-06_folded.json", "ptq_gpu_large_h100_2026-12-06.json",
                         "gpu_report_h100_2026-12-06.json")
    card, found = targets.evaluate(folder)
    assert card == "NVIDIA H100 80GB HBM3"
    by_name = {t.name: t for t in found}
    small = {(r["recipe"], r["variant"]): r for r in json.loads((folder / "small" / "ptq_gpu.json").read_text())["rows"]}
    plain = small[("-", "plain")]["forward"]["median_ms"]
    compiled = small[("fp8_default-fp8_kv", "compiled")]["forward"]["median_ms"]
    modelopt = small[("fp8_default-fp8_kv", "modelopt")]["forward"]["median_ms"]
    assert by_name["small fp8_default: compiled forward / plain"].value == pytest.approx(compiled / plain)
    assert by_name["small fp8_default: modelopt forward / compiled forward"].value == pytest.approx(modelopt / compiled)
    kernels = json.loads((folder / "kernels" / "gpu_report.json").read_text())["timing"]["main"]
    real = by_name["kernel: NVFP4 real quant, amax given, end to end / copy"]
    assert real.value == kernels["nvfp4_real_given"]["ratio"] and real.met == (real.value >= 0.90)
    # the large run had no modelopt or fast-launch-off rows: those targets say so
    assert by_name["large fp8_default: fast launch off, forward / plain"].value is None
    assert by_name["large fp8_default: fast launch off, forward / plain"].met is None
    table = targets.format_table(card, found)
    assert table.startswith("NVIDIA H100 80GB HBM3") and "not measured" in table


def test_a_run_folder_without_files_measures_nothing(tmp_path):
    card, found = targets.evaluate(tmp_path)
    assert card == "unknown card" and found and all(t.value is None and t.met is None for t in found)
    assert targets.main([str(tmp_path), "--json", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["device"] == "unknown card"
