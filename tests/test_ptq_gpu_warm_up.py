"""benchmarks/ptq_gpu.py's calibration timing: with --warm-up-calibration each quantizing variant's
timed calibration comes after the same quantization of a copy on --warm-up-batches batches of
other tokens, whose time is kept apart; with the paired runs, a plain copy's forwards over the same batches are timed right before
and right after each calibration. Either way the timed run's quantizers are those of a run
without it (bit for bit against modelopt's)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import ptq_gpu  # noqa: E402


def _rows(out: Path, *extra: str, paired: bool = False) -> dict:
    argv = ["--out", str(out), "--shapes", "tiny", "--recipes", "fp8_default-fp8_kv", "--variants", "plain", "modelopt",
            "reference", "--batches", "2", "--batch-size", "1", "--seq", "16", "--repeats", "1",
            *([] if paired else ["--no-paired"]), "--no-export", "--device", "cpu", *extra]
    assert ptq_gpu.main(argv) == 0
    return {row["variant"]: row for row in json.loads((out / "ptq_gpu.json").read_text())["rows"]}


def test_warm_up_is_timed_apart_and_leaves_the_calibration_as_it_was(tmp_path):
    if not ptq_gpu.modelopt_available():
        pytest.skip("modelopt does not import")
    warm = _rows(tmp_path / "warm", "--warm-up-calibration", "--warm-up-batches", "2")
    cold = _rows(tmp_path / "cold")
    for variant in ("modelopt", "reference"):
        assert warm[variant]["warm_up_s"] > 0
        assert "warm_up_s" not in cold[variant]
    # the grouped experts' one-time checks made in the timed calibration: refquant's rows count them
    # (none on the CPU, where the per-expert calls stay); modelopt has none
    assert warm["reference"]["row_counts_checked"] == 0 and "row_counts_checked" not in warm["modelopt"]
    assert warm["plain"]["warm_up_s"] > 0 and cold["plain"]["warm_up_s"] > 0  # plain's warm-up forward, always
    for rows in (warm, cold):
        same = rows["reference"]["vs_modelopt"]
        assert same["amax_same"] == same["amax_compared"] > 0
        assert same["logits_differing"] == 0


def test_each_calibration_is_paired_with_a_plain_copys_forwards_around_it(tmp_path, capsys):
    if not ptq_gpu.modelopt_available():
        pytest.skip("modelopt does not import")
    rows = _rows(tmp_path / "paired", paired=True)
    assert "paired_calibration" not in rows["plain"]
    for variant in ("modelopt", "reference"):
        paired = rows[variant]["paired_calibration"]
        assert paired["plain_before_s"] > 0 and paired["plain_after_s"] > 0
        baseline = (paired["plain_before_s"] + paired["plain_after_s"]) / 2
        assert paired["ratio"] == pytest.approx(rows[variant]["calibration_s"] / baseline)
    assert "forwards_ratio" not in rows["modelopt"]["paired_calibration"]  # modelopt's calibration is timed whole
    paired = rows["reference"]["paired_calibration"]
    assert paired["forwards_ratio"] == pytest.approx(rows["reference"]["calibration_forwards_s"]
                                                     / ((paired["plain_before_s"] + paired["plain_after_s"]) / 2))
    assert f"[paired {paired['forwards_ratio']:.2f}]" in capsys.readouterr().out
    same = rows["reference"]["vs_modelopt"]
    assert same["amax_same"] == same["amax_compared"] > 0
    assert same["logits_differing"] == 0

