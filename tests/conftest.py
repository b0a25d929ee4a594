"""Shared test fixtures: where the spec's vectors live, and how to load them."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# CI runs the property tests on a fixed sequence of examples (reproducible, never flaky); a local
# run explores new random examples every time.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parent.parent
VECTORS = Path(os.environ.get("REFQUANT_VECTORS", REPO.parent / "shared" / "spec" / "vectors"))


@lru_cache(maxsize=None)
def load_vectors(name: str) -> dict:
    path = VECTORS / name
    if not path.exists():
        pytest.fail(f"vector file {path} is missing; set REFQUANT_VECTORS to the spec's vectors/ folder")
    return torch.load(path, weights_only=True)


def vector_cases(name: str) -> list[dict]:
    return load_vectors(name)["cases"]


def find_case(name: str, case_name: str) -> dict:
    for case in vector_cases(name):
        if case["name"] == case_name:
            return case
    raise KeyError(f"{case_name} not in {name}")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
