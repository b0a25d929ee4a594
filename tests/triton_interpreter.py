"""Running refquant's Triton kernels on the CPU through Triton's interpreter, for tests.

The interpreter is chosen when a kernel is defined (TRITON_INTERPRET=1 read by triton.jit), so a
check runs in a subprocess that imports the kernels afresh: `mismatches_in_interpreter("module",
"function")` calls tests/module.py's function("cpu") there, which returns a list of what differs,
and gives that list back. Tests skip where Triton is not installed (CI's CPU machine) or cannot
run the kernels' loops (numpy 2.4 refuses the interpreter's loop bounds; 2.2 takes them). The
interpreter computes in numpy: its fp32 -> bf16 conversion rounds toward zero where a GPU rounds
to nearest, so a kernel's bf16 arithmetic is held to the reference on CUDA only."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def skip_unless_interpreter_runs() -> None:
    """pytest.skip where the interpreter cannot run our kernels here."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs Triton (its interpreter runs the kernels on the CPU)")
    import numpy

    try:
        int(numpy.zeros(1))  # what the interpreter does with a runtime loop bound
    except TypeError:
        pytest.skip(f"Triton's interpreter runs loops over runtime bounds with numpy 2.2, not {numpy.__version__}")


def mismatches_in_interpreter(module: str, function: str) -> list[str]:
    """tests/<module>.py's function("cpu") run in a subprocess with Triton's interpreter; its list
    of mismatches (a failure of the subprocess itself fails the test with its output)."""
    skip_unless_interpreter_runs()
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); import importlib; "
              f"print(json.dumps(getattr(importlib.import_module({module!r}), {function!r})('cpu')))")
    env = {**os.environ, "TRITON_INTERPRET": "1", "REFQUANT_FAST_LAUNCH": "0"}
    done = subprocess.run([sys.executable, "-c", script, str(TESTS)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=TESTS.parent)
    if done.returncode != 0:
        pytest.fail(f"{module}.{function} in Triton's interpreter failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
