"""Compile refquant/compiled/nvfp4_triton.py's kernel for an H100 (sm_90) without a GPU and show its SASS.

    pip install triton==3.6.0   # a CPU machine is enough: Triton ships ptxas and nvdisasm
    python3 scripts/triton_sass.py [--dtype bf16|fp16|fp32] [--sass FILE]

Prints the instruction count, the register count and the most common instructions: how the
kernel's structure was read while making it (docs/compiled.md, "NVFP4 real quant"). Pointers are
specialized as 16-byte aligned, as a real launch of an allocator-made tensor is.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--sass", help="also write the full SASS here")
    args = parser.parse_args()

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import refquant.compiled.nvfp4_triton as kernels

    signature = {"x_ptr": "*" + args.dtype, "global_scale_ptr": "*fp32", "packed_ptr": "*u8", "block_scale_ptr": "*fp8e4nv", "n_blocks": "i32"}
    constants = {
        "E2M1_MAX_": 6.0,
        "E4M3_MAX_": 448.0,
        "E4M3_MIN_": 2.0**-9,
        "G_MIN": kernels.THRESHOLD_PATH_MIN_GLOBAL_SCALE,
        "G_MAX": kernels.THRESHOLD_PATH_MAX_GLOBAL_SCALE,
        "BF16_PAIRS": args.dtype == "bf16",
        "BLOCKS": kernels.BLOCKS_PER_PROGRAM,
        "ANY_DTYPE_BLOCKS": kernels.ANY_DTYPE_BLOCKS_PER_PROGRAM,
    }
    signature.update({name: "constexpr" for name in constants})
    aligned = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind.startswith("*") or kind == "i32"}
    source = ASTSource(fn=kernels._nvfp4_blocks_kernel, signature=signature, constexprs=constants, attrs=aligned)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": kernels.NUM_WARPS})

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        Path(cubin).write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
    counts = collections.Counter(
        match.group(2).split(".")[0]
        for match in (re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line) for line in sass.splitlines())
        if match
    )
    registers = re.search(r"REG:(\d+)", usage)
    print(f"{args.dtype}: {sum(counts.values())} instructions, {registers.group(1) if registers else '?'} registers a thread")
    print(", ".join(f"{name} {n}" for name, n in counts.most_common(20)))
    if args.sass:
        Path(args.sass).write_text(sass)


if __name__ == "__main__":
    main()
