"""The pytest-benchmark suites' options, and the kernel and PTQ tables printed at the end of a run
(benchmarks/README.md says how to run, save and compare them)."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

ON_CUDA = torch.cuda.is_available()

# Filled by test_bench_kernels.py and test_bench_ptq.py as their tests run, printed last:
# kernel rows by shape and operation (gpu_report.py's timing layout), PTQ rows in run order.
TABLES: dict = {"kernels": {}, "ptq": []}


def pytest_addoption(parser) -> None:
    group = parser.getgroup("refquant benchmarks")
    group.addoption("--kernel-shapes", default="main" if ON_CUDA else "tiny",
                    help="comma-separated gpu_report.py shapes for the kernel table (main, small, skinny, tiny); "
                    "default main on a GPU, tiny on a CPU")
    group.addoption("--ptq-shapes", default="small" if ON_CUDA else "tiny,tiny_moe",
                    help="comma-separated ptq_gpu.py shapes for the PTQ table (tiny, tiny_moe, small, large, moe); "
                    "default small on a GPU, tiny and tiny_moe on a CPU")
    group.addoption("--ptq-recipes", default=None,
                    help="comma-separated recipes for the PTQ table; default ptq_gpu.py's three on a GPU, "
                    "fp8_default-fp8_kv and nvfp4_default-fp8_cast_kv on a CPU")
    group.addoption("--ptq-args", default=None,
                    help="ptq_gpu.py options for the PTQ runs, e.g. \"--repeats 10 --no-paired\"; default its own "
                    "on a GPU, \"--batches 2 --batch-size 1 --seq 32 --repeats 2\" on a CPU")
    group.addoption("--modelopt-fp8-extension", action="store_true",
                    help="build modelopt's FP8 CUDA extension (about 70 s) for the FP8 rows' modelopt column")


@pytest.fixture(scope="session")
def tables() -> dict:
    return TABLES


def pytest_terminal_summary(terminalreporter) -> None:
    import gpu_report
    import ptq_gpu

    device = torch.cuda.get_device_name() if ON_CUDA else "cpu"
    if TABLES["kernels"]:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            gpu_report.print_table(TABLES["kernels"], device)
        terminalreporter.write_sep("=", "kernel table (ratios to a device copy; extra_info in the JSON)")
        terminalreporter.write(printed.getvalue() + "\n")
    if TABLES["ptq"]:
        terminalreporter.write_sep("=", "PTQ table (extra_info in the JSON)")
        terminalreporter.write(f"{device}, torch {torch.__version__}\n" + ptq_gpu.format_table(TABLES["ptq"]) + "\n")
