"""The vector files in tests/vectors/: each decompresses to the exact bytes its generator wrote (the
sha256 in SHA256SUMS, which agrees with manifest.json, the original provenance record of the first
ten files), and none is missing. docs/test_vectors.md describes them."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import VECTORS, vector_bytes, vector_sha256sums

PACKED = sorted(path.name.removesuffix(".xz") for path in VECTORS.glob("*.pt.xz"))


def test_sha256sums_lists_exactly_the_packed_files():
    assert PACKED and sorted(vector_sha256sums()) == PACKED


@pytest.mark.parametrize("name", PACKED)
def test_packed_file_decompresses_to_the_original_bytes(name):
    assert hashlib.sha256(vector_bytes(name)).hexdigest() == vector_sha256sums()[name]


def test_every_file_of_the_manifest_is_packed_with_its_sha256():
    manifest = json.loads((VECTORS / "manifest.json").read_text())["files"]
    sums = vector_sha256sums()
    assert {name: entry["sha256"] for name, entry in manifest.items()} == {name: sums.get(name) for name in manifest}
