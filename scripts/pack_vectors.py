"""Pack test-vector files into the repository: tests/vectors/NAME.pt.xz (lzma) and NAME.pt's line in
tests/vectors/SHA256SUMS (the sha256 of the original bytes, which the tests check after they
decompress it in memory; tests/conftest.py load_vectors).

    python3 scripts/pack_vectors.py PATH/NAME.pt [PATH/OTHER.pt ...]
    python3 scripts/pack_vectors.py --check    # every packed file against SHA256SUMS

Each file must load with torch.load(weights_only=True), as the tests load it. It is compressed,
decompressed again and compared byte for byte before anything is written; a file already packed
under the same name is replaced, and its SHA256SUMS line with it. SHA256SUMS is in sha256sum's
format: `xz -dk tests/vectors/*.xz && cd tests/vectors && sha256sum -c SHA256SUMS` checks it too.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import sys
from pathlib import Path

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "vectors"
SUMS = VECTORS / "SHA256SUMS"


def read_sums() -> dict[str, str]:
    if not SUMS.exists():
        return {}
    return {name: digest for digest, name in (line.split(maxsplit=1) for line in SUMS.read_text().splitlines() if line.strip())}


def write_sums(sums: dict[str, str]) -> None:
    SUMS.write_text("".join(f"{sums[name]}  {name}\n" for name in sorted(sums)))


def pack(source: Path) -> str:
    """Write VECTORS/<source.name>.xz; return the sha256 of the original bytes."""
    import torch

    if source.suffix != ".pt":
        raise SystemExit(f"{source}: not a .pt file; only torch.save files of test vectors are packed here.")
    original = source.read_bytes()
    try:
        torch.load(io.BytesIO(original), weights_only=True)
    except Exception as error:  # what the tests would hit, said before anything is written
        raise SystemExit(f"{source}: torch.load(weights_only=True) fails ({error}); the tests load vectors that way.")
    packed = lzma.compress(original, preset=6)
    if lzma.decompress(packed) != original:
        raise SystemExit(f"{source}: the lzma round trip changed the bytes; nothing written.")
    (VECTORS / f"{source.name}.xz").write_bytes(packed)
    print(f"{source.name}: {len(original):,} -> {len(packed):,} bytes")
    return hashlib.sha256(original).hexdigest()


def check() -> int:
    """0 when the packed files and SHA256SUMS name the same files and every hash matches."""
    sums = read_sums()
    packed = {path.name.removesuffix(".xz") for path in VECTORS.glob("*.pt.xz")}
    problems = [f"{name}: packed but not in SHA256SUMS" for name in sorted(packed - set(sums))]
    problems += [f"{name}: in SHA256SUMS but not packed" for name in sorted(set(sums) - packed)]
    for name in sorted(packed & set(sums)):
        if hashlib.sha256(lzma.decompress((VECTORS / f"{name}.xz").read_bytes())).hexdigest() != sums[name]:
            problems.append(f"{name}: decompresses to bytes whose sha256 is not SHA256SUMS's")
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(packed)} packed files, {len(problems)} problems")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help=".pt files to pack")
    parser.add_argument("--check", action="store_true", help="check every packed file against SHA256SUMS")
    args = parser.parse_args()
    if not args.files and not args.check:
        parser.error("give .pt files to pack, or --check")
    VECTORS.mkdir(parents=True, exist_ok=True)
    if args.files:
        sums = read_sums()
        for source in args.files:
            sums[source.name] = pack(source)
            write_sums(sums)  # after each file, so an error later leaves no packed file unlisted
    return check()


if __name__ == "__main__":
    raise SystemExit(main())
