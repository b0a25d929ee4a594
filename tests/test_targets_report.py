"""benchmarks/targets.py reads device runs' JSON into the compiled backend's targets (a report: no
time is asserted here or there). Checked on the run files kept in benchmarks/results, and on files
made to be incomplete."""

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


def _run_folder(folder: Path, small: str | None = None, large: str | None = None, kernels: str | None = None) -> Path:
    for sub, name, file in (("small", small, "ptq_gpu.json"), ("large", large, "ptq_gpu.json"), ("kernels", kernels, "gpu_report.json")):
        if name is not None:
            (folder / sub).mkdir(parents=True)
            shutil.copy(RESULTS / name, folder / sub / file)
    return folder


def _by_name(folders: list[Path]) -> dict[str, targets.Target]:
    return {t.name: t for t in targets.evaluate(folders)[1]}


def test_targets_of_kept_runs_are_the_ratios_and_comparisons_of_their_json(tmp_path):
    # two device calls' folders, as the targets and targets_large phases leave them
    first = _run_folder(tmp_path / "a", small="ptq_gpu_small_h100_2026-12-06_folded.json", kernels="gpu_report_h100_2026-12-06.json")
    second = _run_folder(tmp_path / "b", large="ptq_gpu_large_h100_2026-12-06.json")
    card, _ = targets.evaluate([first, second])
    assert card == "NVIDIA H100 80GB HBM3"
    by_name = _by_name([first, second])
    small = {(r["recipe"], r["variant"]): r for r in json.loads((first / "small" / "ptq_gpu.json").read_text())["rows"]}
    plain = small[("-", "plain")]["forward"]["median_ms"]
    compiled = small[("fp8_default-fp8_kv", "compiled")]["forward"]["median_ms"]
    modelopt = small[("fp8_default-fp8_kv", "modelopt")]["forward"]["median_ms"]
    assert by_name["small fp8_default: compiled forward / plain"].value == pytest.approx(compiled / plain)
    assert by_name["small fp8_default: modelopt forward / compiled forward"].value == pytest.approx(modelopt / compiled)
    assert by_name["small fp8_default: bits: compiled = modelopt (amax, logits)"].met is True
    assert by_name["small fp8_default: bits: fast launch off = compiled"].met is True
    kernels = json.loads((first / "kernels" / "gpu_report.json").read_text())["timing"]["main"]
    real = by_name["kernel: NVFP4 real quant, amax given, end to end / copy"]
    assert real.value == kernels["nvfp4_real_given"]["ratio"] and real.met == (real.value >= 0.90)
    large_compiled = by_name["large fp8_default: compiled forward / plain"]
    assert large_compiled.value is not None and large_compiled.met is (large_compiled.value <= 1.08)
    # the large run had no modelopt or fast-launch-off rows: those targets say so, never "met"
    for name in ("large fp8_default: fast launch off, forward / plain", "large fp8_default: bits: compiled = modelopt (amax, logits)"):
        assert by_name[name].value is None and by_name[name].met is None
    assert "not measured" in targets.format_table(card, list(by_name.values()))


def test_what_is_missing_cut_short_or_run_otherwise_is_not_measured(tmp_path):
    card, found = targets.evaluate([tmp_path])
    assert card == "unknown card" and found and all(t.value is None and t.met is None for t in found)
    assert targets.main([str(tmp_path), "--json", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["device"] == "unknown card"

    folder = _run_folder(tmp_path / "run", small="ptq_gpu_small_h100_2026-12-06_folded.json")
    path = folder / "small" / "ptq_gpu.json"
    document = json.loads(path.read_text())
    document["settings"]["batches"] = 8
    document["modelopt_fp8_extension"] = False
    for row in document["rows"]:
        if row["variant"] == "compiled_folded":
            del row["forward"]  # a row without what is read
        if row["variant"] == "compiled" and row["recipe"] == "nvfp4_default-fp8_cast_kv":
            row["fast_paths"]["kernel_launch"] = False
    path.write_text(json.dumps(document))
    by_name = _by_name([folder])
    assert by_name["small fp8_default: calibration / plain forwards (48 batches)"].value is None  # not 48 batches
    assert by_name["small fp8_default: modelopt forward / compiled forward"].value is None  # modelopt not at its best
    assert by_name["small fp8_default: (extra) folded forward / plain"].value is None
    assert by_name["small nvfp4_default: compiled forward / plain"].value is None  # fast launch off
    assert by_name["small fp8_default: compiled forward / plain"].value is not None
    path.write_text(path.read_text()[:100])  # cut short while written
    assert all(t.value is None for t in targets.evaluate([folder])[1])


def test_a_forward_target_says_which_of_its_forwards_were_host_bound(tmp_path):
    """The kept targets run: the 0.6B rows met a slow host (each quantized forward's host time
    near its time), the 6.7B rows are GPU-bound; the note says so, from the JSON's host times."""
    small = _run_folder(tmp_path / "a", small="ptq_gpu_small_h100_2026-12-06_targets.json")
    large = _run_folder(tmp_path / "b", large="ptq_gpu_large_h100_2026-12-06_targets.json")
    by_name = _by_name([small, large])
    rows = {(r["recipe"], r["variant"]): r["forward"] for r in json.loads((small / "small" / "ptq_gpu.json").read_text())["rows"]}
    compiled = rows[("fp8_default-fp8_kv", "compiled")]
    assert compiled["host_ms"] >= targets.HOST_BOUND_SHARE * compiled["median_ms"]
    note = by_name["small fp8_default: compiled forward / plain"].note
    assert note == f"compiled host-bound ({compiled['host_ms']:.1f} of {compiled['median_ms']:.1f} ms)"
    assert "plain" not in note  # the plain forward's host time (6.0 of 11.2 ms) was not
    assert by_name["large fp8_default: compiled forward / plain"].note == ""
    assert by_name["large fp8_default: bits: compiled = modelopt (amax, logits)"].note == ""
    table = targets.format_table("card", list(by_name.values()))
    assert f"| {note} |" in table
