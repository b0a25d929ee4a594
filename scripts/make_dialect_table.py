"""Write docs/dialects.md's difference tables: for each pair of dialects, how many elements differ
and at which step they part (refquant.dialects.compare), over every finite bf16 pattern (in
blocks of 16, global amax computed and given as 1.0) and seeded random tensors.

    python3 scripts/make_dialect_table.py            # prints the markdown; paste it into docs/dialects.md
"""

from __future__ import annotations

import itertools

import torch

from refquant.dialects import FP8_DIALECTS, NVFP4_DIALECTS, fp8_steps, nvfp4_steps
from refquant.dialects.compare import FP8_STEPS, STEPS, fp8_differences, nvfp4_differences


def inputs() -> list[tuple[str, torch.Tensor, float | None]]:
    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = patterns[torch.isfinite(patterns)].reshape(-1, 16)
    gen = torch.Generator().manual_seed(0)
    return [
        ("every finite bf16 pattern, amax computed", finite, None),
        ("every finite bf16 pattern, amax 1.0", finite, 1.0),
        ("random bf16 256x1024, std 0.02", (torch.randn(256, 1024, generator=gen) * 0.02).bfloat16(), None),
        ("random fp32 256x1024, std 3", torch.randn(256, 1024, generator=gen) * 3, None),
    ]


def table(title: str, names: list[str], run, compare, steps: tuple[str, ...]) -> list[str]:
    lines = [f"### {title}", "", "| dialects | elements | differ | " + " | ".join(steps) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in steps) + " |"]
    for label, x, amax in inputs():
        results = {}
        for name in names:
            try:
                results[name] = run(x, name, amax)
            except ValueError:
                continue  # the stack refuses this input (torchao: fp16; no NVFP4 here takes other shapes)
        lines.append(f"| **{label}** | | | " + " | ".join("" for _ in steps) + " |")
        for a, b in itertools.combinations(results, 2):
            differ, step = compare(x, results[a], results[b])
            counts = [int((step == i).sum()) for i in range(len(steps))]
            lines.append(f"| {a} / {b} | {x.numel():,} | {int(differ.sum()):,} | " + " | ".join(f"{c:,}" for c in counts) + " |")
        lines.append("")
    return lines


def main() -> int:
    lines = table("NVFP4", list(NVFP4_DIALECTS), nvfp4_steps, nvfp4_differences, STEPS)
    lines += table("FP8 E4M3, per tensor", list(FP8_DIALECTS), fp8_steps, fp8_differences, FP8_STEPS)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
