"""Which implementation of the numerics a quantizer calls: the eager reference or refquant.compiled.

Both expose the same functions with the same signatures and bits; "compiled" lowers the
reference's own functions through torch.compile.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS = ("reference", "compiled")


def numerics(backend: str) -> ModuleType:
    """The module holding fp8_fake_quant, nvfp4_fake_quant, fp8_quantize, nvfp4_quantize."""
    if backend == "reference":
        return importlib.import_module("refquant.numerics")
    if backend == "compiled":
        return importlib.import_module("refquant.compiled")
    raise ValueError(f"backend={backend!r} is not known; use one of {', '.join(map(repr, BACKENDS))}.")
