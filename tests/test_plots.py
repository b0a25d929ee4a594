"""`refquant quantize --sensitivity --plot DIR`: the error columns in the main job's table, the new
fields in the JSON report, the PNGs, and a clear failure (before any work) without matplotlib.
Also scripts/make_format_figures.py, which draws docs/figures from the library's functions."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import REPO
from refquant.cli import main

pytest.importorskip("transformers")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_png(path, width: int, max_bytes: int = 80_000) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    assert int.from_bytes(data[16:20], "big") == width, path  # the IHDR width
    assert len(data) < max_bytes, (path, len(data))


def test_main_job_prints_error_columns_and_writes_plots_and_sensitivity(in_tmp, capsys):
    pytest.importorskip("matplotlib")
    code = main(["quantize", "--no-progress", "--calib-batches", "2", "--seq-len", "64", "--sensitivity",
                 "--plot", "plots", "--report-json", "report.json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = captured.out
    assert "SQNR dB" in out and "rel err" in out and "clip %" in out and "zero %" in out and "S=1 %" in out
    assert "lowest SQNR (worst first)" in out
    assert "sensitivity: one block quantized at a time" in out and 'enable = false }' in out
    for name in ("sqnr_by_depth.png", "amax_by_depth.png", "sensitivity.png"):
        assert f"plot written to plots/{name}" in out
        assert_png(in_tmp / "plots" / name, width=900)
    report = json.loads((in_tmp / "report.json").read_text())
    row = next(r for r in report["quantizers"] if r["name"] == "model.layers.0.mlp.down_proj.input_quantizer")
    assert row["error"]["blocks"] > 0 and 0 < row["error"]["rel_error"] < 1
    assert report["sensitivity"]["granularity"] == "block" and len(report["sensitivity"]["rows"]) == 4


def test_help_names_the_new_options():
    from refquant.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    text = subparsers.choices["quantize"].format_help()
    for option in ("--sort", "--sensitivity", "{block,layer}", "--plot", "pip install matplotlib"):
        assert option in text, option


def test_sort_option_lists_the_worst_sqnr_first(in_tmp, capsys):
    code = main(["quantize", "--no-progress", "--calib-batches", "1", "--seq-len", "32", "--sort", "sqnr",
                 "--recipe", "fp8_default-fp8_cast_kv"])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("model.layers.")]
    sqnr_column = lines[0].split().index("calibrated") + 2  # name format enabled amax source dtype SQNR
    sqnrs = [float(line.split()[sqnr_column]) for line in lines if "calibrated" in line]
    assert sqnrs == sorted(sqnrs) and len(sqnrs) > 10


def hide_matplotlib(monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError


def test_plot_without_matplotlib_fails_clearly_before_any_work(in_tmp, capsys, monkeypatch):
    hide_matplotlib(monkeypatch)
    code = main(["quantize", "--no-progress", "--plot", "plots", "--report-json", "r.json"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--plot plots: plots need matplotlib, which is not installed" in err and "pip install matplotlib" in err
    assert "refquant[plot]" in err
    assert list(in_tmp.iterdir()) == []  # no checkpoint, no report, no folder


def test_plot_functions_without_matplotlib_raise_an_import_error_that_says_what_to_install(monkeypatch, tmp_path):
    from refquant.hf.plots import MissingPlotDependency, plot_report

    hide_matplotlib(monkeypatch)
    with pytest.raises(MissingPlotDependency, match=r"pip install matplotlib \(or pip install 'refquant\[plot\]'\)"):
        plot_report(None, tmp_path / "plots")
    assert issubclass(MissingPlotDependency, ImportError)


def test_plot_into_a_file_is_refused(in_tmp, capsys):
    pytest.importorskip("matplotlib")
    (in_tmp / "plots").write_text("not a folder")
    code = main(["quantize", "--no-progress", "--plot", "plots"])
    assert code == 2 and "--plot plots: exists and is not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in in_tmp.iterdir()) == ["plots"]


def test_plots_need_the_errors_of_an_eval_batch(tmp_path):
    pytest.importorskip("matplotlib")
    import refquant as rq
    from refquant.hf.plots import plot_report, plot_sensitivity

    from test_metrics import tiny_llama, token_ids

    report = rq.quantize_model(tiny_llama(1), rq.load_recipe("fp8_default-fp8_cast_kv"), [token_ids(1, 8)], progress=False)
    with pytest.raises(ValueError, match="no quantization error to plot: pass eval_batch"):
        plot_report(report, tmp_path)
    with pytest.raises(ValueError, match="no sensitivity ranking: run with --sensitivity"):
        plot_sensitivity(report, tmp_path / "s.png")


def test_format_figures_script_draws_both_figures(tmp_path):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("make_format_figures", REPO / "scripts" / "make_format_figures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--out", str(tmp_path)]) == 0
    for name in ("fp8_e4m3_grid.png", "nvfp4_block_grid.png"):
        assert_png(tmp_path / name, width=900)
        assert (REPO / "docs" / "figures" / name).is_file(), f"docs/figures/{name}: run scripts/make_format_figures.py"
