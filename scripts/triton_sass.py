"""Compile refquant.compiled's NVFP4 Triton kernels for sm_90 (H100, H200) without a GPU and show their SASS.

    pip install triton==3.6.0   # a CPU machine is enough: Triton ships ptxas and nvdisasm
    python3 scripts/triton_sass.py [--kernel real|fake] [--dtype bf16|fp16|fp32] [--sass FILE]

Prints the instruction count, the register count and the most common instructions: how the
kernels' structure is read (docs/compiled.md, "Layer 2: three Triton kernels"). Pointers are
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
    parser.add_argument("--kernel", default="real", choices=["real", "fake"], help="nvfp4_triton.py (real quant) or nvfp4_fake_triton.py")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--sass", help="also write the full SASS here")
    parser.add_argument("--blocks", type=int, help="blocks a program (default: the module's)")
    parser.add_argument("--warps", type=int, help="warps a program (default: the module's)")
    parser.add_argument("--unaligned-x", action="store_true", help="x not 16-byte aligned (a view at an offset): Triton may then lay a block over several threads")
    parser.add_argument("--ttgir", help="also write the TTGIR (the layouts Triton chose) here")
    args = parser.parse_args()

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if args.kernel == "real":
        import refquant.compiled.nvfp4_triton as kernels

        fn, num_warps = kernels._nvfp4_blocks_kernel, kernels.NUM_WARPS
        signature = {"x_ptr": "*" + args.dtype, "scale_source_ptr": "*fp32", "global_scale_ptr": "*fp32", "packed_ptr": "*u8",
                     "block_scale_ptr": "*fp8e4nv", "n_blocks": "i32"}
        # as nvfp4_quantize(x, amax, flavor="modelopt-cuda") launches it
        constants = kernels.kernel_constants(bf16_pairs=args.dtype == "bf16" and not args.unaligned_x, scale_from=kernels.FROM_AMAX_TIMES_RCP_2688)
    else:
        import refquant.compiled.nvfp4_fake_triton as kernels

        fn, num_warps = kernels._nvfp4_fake_kernel, kernels.NUM_WARPS
        signature = {"x_ptr": "*" + args.dtype, "amax_ptr": "*fp32", "y_ptr": "*" + args.dtype, "n_blocks": "i32"}
        constants = kernels.kernel_constants()
    if args.blocks:
        constants["BLOCKS"] = args.blocks
    num_warps = args.warps or num_warps
    signature.update({name: "constexpr" for name in constants})
    aligned = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items())
               if (kind.startswith("*") or kind == "i32") and not (args.unaligned_x and name == "x_ptr")}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=aligned)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

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
    if args.ttgir:
        Path(args.ttgir).write_text(kernel.asm["ttgir"])


if __name__ == "__main__":
    main()
