"""Tile sizes of refquant.compiled's NVFP4 Triton kernels on one GPU.

    python benchmarks/probes/nvfp4_tiles.py --out DIR [--real] [--shapes main,...]

For each shape (the issue's 8192 x 16384 bf16 and the PTQ shapes' activations and weights) and each
(blocks a program, warps) pair: the kernel's device time (torch.profiler, kernels only), its ratio
to a device copy of the same tensor timed the same way, and whether its bits equal the reference's
(inductor's compile of refquant.numerics.nvfp4.nvfp4_fake_quant, and the eager reference on the
main shape). Also, in the same run: that inductor kernel and modelopt's fp4_fake_quant_block where
it imports. With --real, the same for the real-quant kernel (refquant/compiled/nvfp4_triton.py):
tiles, warps and persistent programs. Writes DIR/nvfp4_tiles.json and prints each shape's row.
The kernels' defaults are their modules' constants; this script is how they were chosen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: refquant, scripts/
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: ptq_gpu, gpu_report
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other probes

import refquant  # noqa: E402
import refquant.numerics.formats  # noqa: E402
from refquant.compiled import functions  # noqa: E402
from refquant.testing import bits_of  # noqa: E402
from probe_output import write_json  # noqa: E402

SHAPES = {
    "main": (8192, 16384),
    "6.7B activation": (4096, 4096),
    "6.7B mlp activation": (4096, 11008),
    "6.7B mlp weight": (11008, 4096),
    "0.6B activation": (4096, 2048),
}
TILES = [(128, 4), (256, 4), (256, 8), (512, 4), (512, 8), (1024, 8)]


def differing(actual: torch.Tensor, expected: torch.Tensor) -> int:
    return int((bits_of(actual) != bits_of(expected)).sum())


def main() -> None:
    from gpu_report import device_ms

    import refquant.compiled.nvfp4_fake_triton as kernels

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--real", action="store_true", help="also sweep the real-quant kernel's tiles (nvfp4_triton.py)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of: {', '.join(SHAPES)}")
    args = parser.parse_args()
    try:
        import modelopt.torch.kernels.quantization.gemm as modelopt_kernels

        modelopt_fake = getattr(modelopt_kernels, "fp4_fake_quant_block", None)
    except Exception:  # noqa: BLE001 - modelopt is optional here
        modelopt_fake = None

    constants = kernels.kernel_constants()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        x = (torch.randn(*shape, device="cuda") * 3).to(torch.bfloat16)
        amax = x.abs().amax().float()
        y = torch.empty_like(x)
        n_blocks = x.numel() // 16
        copy_ms = device_ms(lambda: y.copy_(x))
        inductor = lambda: functions._run(functions._compiled_nvfp4_fake_quant, refquant.nvfp4_fake_quant, x, amax)  # noqa: E731
        expected = inductor()
        row = {"copy_ms": copy_ms, "inductor_ratio": copy_ms / device_ms(inductor)}
        if name == "main":
            row["inductor_vs_eager_differing"] = differing(expected, refquant.nvfp4_fake_quant(x, amax))
        if modelopt_fake is not None:
            row["modelopt_ratio"] = copy_ms / device_ms(lambda: modelopt_fake(x, amax))
            row["modelopt_vs_ours_differing"] = differing(modelopt_fake(x, amax), expected)
        for blocks, warps in TILES:
            def launch(blocks=blocks, warps=warps):
                kernels._nvfp4_fake_kernel[(triton.cdiv(n_blocks, blocks),)](
                    x, amax, y, n_blocks, **{**constants, "BLOCKS": blocks}, num_warps=warps
                )

            launch()
            row[f"{blocks}x{warps}"] = {"ratio": copy_ms / device_ms(launch), "differing": differing(y, expected)}
        if args.real:
            row["real"] = real_quant_tiles(x, amax, copy_ms, device_ms)
        results["shapes"][name] = row
        print(name, json.dumps(row))
    write_json(args.out, "nvfp4_tiles.json", results)


# Real quant (nvfp4_triton.py, persistent): (blocks a tile, warps, programs an SM; 0 = one program a tile).
# A tile's programs must all fit an SM at once (registers: scripts/triton_sass.py), else the last
# ones run as a second wave.
REAL_TILES = [(128, 4, 6), (128, 4, 7), (128, 4, 8), (128, 4, 9), (256, 8, 4), (256, 8, 5), (512, 8, 2), (128, 4, 0)]


def real_quant_tiles(x: torch.Tensor, amax: torch.Tensor, copy_ms: float, device_ms) -> dict:
    """The real-quant kernel's device time under each of REAL_TILES, as a bandwidth ratio to the
    copy (the bytes it must move over its time), and whether its bytes equal the module default's.
    Launched as refquant.compiled.nvfp4_quantize(x, amax, flavor="modelopt-cuda") launches it."""
    import refquant.compiled.nvfp4_triton as real
    from gpu_report import COPY_BYTES_PER_ELEMENT, REAL_QUANT_BYTES_PER_ELEMENT

    packed_expected, scales_expected, global_scale = real.nvfp4_quantize_from_amax(x, amax, False)
    n_blocks = x.numel() // 16
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    constants = real.kernel_constants(bf16_pairs=True, scale_from=real.FROM_AMAX_TIMES_RCP_2688)
    rows = {}
    for blocks, warps, per_sm in REAL_TILES:
        packed = torch.empty_like(packed_expected)
        scales = torch.empty_like(scales_expected)
        programs = per_sm * sms if per_sm else triton.cdiv(n_blocks, blocks)

        def launch(blocks=blocks, warps=warps, programs=programs):
            real._nvfp4_blocks_kernel[(programs,)](
                x, amax, global_scale, packed, scales, n_blocks, **{**constants, "BLOCKS": blocks}, num_warps=warps
            )

        launch()
        same = torch.equal(packed, packed_expected) and torch.equal(scales.view(torch.uint8), scales_expected.view(torch.uint8))
        ratio = REAL_QUANT_BYTES_PER_ELEMENT / COPY_BYTES_PER_ELEMENT * copy_ms / device_ms(launch)
        rows[f"{blocks}x{warps}x{per_sm or 'tiles'}"] = {"ratio": ratio, "same_bytes": same}
    return rows


if __name__ == "__main__":
    main()
