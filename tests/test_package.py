"""The package as users import it: the public names, a fast `import refquant`, `rq.compiled` on first
use, and the command line as a module and as the console script."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib

import pytest
from conftest import REPO

import refquant as rq
from refquant.cli import main

PUBLIC_NAMES = [
    "FP8Tensor", "NVFP4Tensor", "PTQReport", "QuantRule", "QuantizerConfig", "Recipe", "TensorQuantizer",
    "apply_recipe", "compress_weights", "export_checkpoint", "fold_weights", "formats", "fp8_fake_quant",
    "fp8_quantize", "insert_quantizers", "load_checkpoint", "load_recipe", "nvfp4_fake_quant", "nvfp4_quantize",
    "quantize_model", "select_recipe", "testing",
]


def python_output(*args: str) -> str:
    """stdout of `python3 ARGS` in a fresh interpreter started in the repository root (so it imports
    this checkout's refquant); fails when it exits nonzero."""
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_public_names_are_unchanged_and_all_resolve():
    assert rq.__all__ == PUBLIC_NAMES
    for name in rq.__all__:
        assert getattr(rq, name) is not None, name


def test_import_refquant_does_not_import_compiled_or_dynamo():
    loaded = python_output(
        "-c",
        "import sys, refquant\n"
        "print(sorted(m for m in ('refquant.compiled', 'torch._dynamo', 'torch._inductor') if m in sys.modules))",
    )
    assert loaded == "[]"


def test_compiled_works_after_a_plain_import_refquant():
    result = python_output(
        "-c",
        "import sys, torch\n"
        "import refquant as rq\n"
        "assert 'compiled' in dir(rq) and 'refquant.compiled' not in sys.modules\n"
        "x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)\n"
        "rq.testing.assert_bitexact(rq.compiled.nvfp4_quantize(x, 3.0), rq.nvfp4_quantize(x, 3.0))\n"
        "assert rq.compiled is sys.modules['refquant.compiled']\n"
        "print('ok')",
    )
    assert result == "ok"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'refquant' has no attribute 'no_such_name'"):
        getattr(rq, "no_such_name")


def test_console_script_points_at_the_cli_main():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module_name, _, function = scripts["refquant"].partition(":")
    assert getattr(importlib.import_module(module_name), function) is main


def test_python_m_refquant_lists_the_three_commands():
    usage = python_output("-m", "refquant", "--help")
    for command in ("quantize", "recipes", "demo"):
        assert command in usage, command
