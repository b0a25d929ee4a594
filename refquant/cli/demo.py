"""`refquant demo`: quantizes one small tensor to FP8 and NVFP4 and prints every step."""

from __future__ import annotations

import torch

from ..numerics.fp8 import fp8_fake_quant
from ..numerics.nvfp4 import nvfp4_quantize


def run(args) -> int:
    generator = torch.Generator().manual_seed(args.seed)
    x = (torch.randn(2, 16, generator=generator) * 2).to(torch.bfloat16)
    print("x (bf16):", x.tolist())
    amax = x.abs().amax().float()
    print(f"\nFP8 E4M3 fake quant, amax {float(amax):g}:\n", fp8_fake_quant(x, amax).tolist())
    q = nvfp4_quantize(x)
    print(f"\nNVFP4: global scale {float(q.global_scale):.9g} (= amax / 2688)")
    print("block scales (E4M3):", q.block_scale.float().tolist())
    print("codes:", q.codes().tolist())
    print("packed bytes:", [[f"0x{b:02X}" for b in row] for row in q.packed.tolist()])
    print("dequantized:", q.dequantize().tolist())
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="quantize one small tensor and print every step")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)
