"""Write docs/dialects.md's difference tables: for each pair of dialects, how many elements differ
and at which step they part (refquant.dialects.compare), over every finite bf16 pattern (NVFP4 and
FP8: in blocks of 16, global amax computed and given as 1.0; MX: in blocks of 32) and seeded
random tensors.

    python3 scripts/make_dialect_table.py            # prints the markdown; paste it into docs/dialects.md
"""

from __future__ import annotations

import itertools

import torch

from refquant.dialects import FP8_DIALECTS, MX_DIALECTS, NVFP4_DIALECTS, fp8_steps, mx_steps, nvfp4_steps
from refquant.dialects.compare import FP8_STEPS, MX_STEPS, STEPS, fp8_differences, mx_differences, nvfp4_differences


def inputs(with_global_amax: bool = True) -> list[tuple[str, torch.Tensor, float | None]]:
    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = patterns[torch.isfinite(patterns)].reshape(-1, 16)
    gen = torch.Generator().manual_seed(0)
    rows = [("every finite bf16 pattern, amax computed" if with_global_amax else "every finite bf16 pattern", finite, None)]
    if with_global_amax:
        rows.append(("every finite bf16 pattern, amax 1.0", finite, 1.0))
    return rows + [
        ("random bf16 256x1024, std 0.02", (torch.randn(256, 1024, generator=gen) * 0.02).bfloat16(), None),
        ("random fp32 256x1024, std 3", torch.randn(256, 1024, generator=gen) * 3, None),
    ]


def table(title: str, names: list[str], run, compare, steps: tuple[str, ...], with_global_amax: bool = True) -> list[str]:
    lines = [f"### {title}", "", "| dialects | elements | differ | " + " | ".join(steps) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in steps) + " |"]
    for label, x, amax in inputs(with_global_amax):
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
    titles = {"mxfp8_e4m3": "MXFP8 (E4M3)", "mxfp8_e5m2": "MXFP8 (E5M2)", "mxfp4": "MXFP4 (E2M1)"}
    for mx_format, dialects in MX_DIALECTS.items():
        def run(x, name, _amax, mx_format=mx_format):
            return mx_steps(x.reshape(-1, 32) if x.shape[-1] == 16 else x, name, mx_format)

        def compare(x, a, b):
            return mx_differences(x.reshape(-1, 32) if x.shape[-1] == 16 else x, a, b)

        lines += table(titles[mx_format], list(dialects), run, compare, MX_STEPS, with_global_amax=False)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
