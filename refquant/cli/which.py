"""`refquant which`: which stack's NVFP4 / FP8 / MX dialect a kernel's output speaks
(refquant.testing.which_dialect).

    python3 -m refquant which --x in.pt --output out.pt                       # NVFP4 fake-quant values
    python3 -m refquant which --x in.pt --output q.safetensors:weight_packed --block-scale q.safetensors:weight_scale
    python3 -m refquant which --x in.pt --output y.pt --format fp8 --global-amax 3.5
    python3 -m refquant which --x in.pt --output y.pt --format mxfp4         # MXFP4 fake-quant values
    python3 -m refquant which --x in.pt --output q.pt:data --block-scale q.pt:scale --format mxfp8_e4m3

A tensor is given as FILE (a .pt holding one tensor, or a .safetensors with one tensor) or FILE:KEY
(a key of the .pt's dict or of the .safetensors).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..dialects import FP8_DIALECTS, MX_DIALECTS, NVFP4_DIALECTS
from ..testing import which_dialect


def load_tensor(spec: str) -> torch.Tensor:
    """FILE or FILE:KEY -> the tensor (see the module docstring)."""
    path, _, key = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (from {spec!r}; write FILE or FILE:KEY).")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
    else:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        tensors = loaded if isinstance(loaded, dict) else {"": loaded}
    if key:
        if key not in tensors:
            raise ValueError(f"{path} has no tensor {key!r}; it has {', '.join(map(str, tensors)) or 'none'}.")
        tensor = tensors[key]
    else:
        if len(tensors) != 1:
            raise ValueError(f"{path} holds {len(tensors)} entries ({', '.join(map(str, tensors))}); name one as {path}:KEY.")
        tensor = next(iter(tensors.values()))
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{spec} is a {type(tensor).__name__}, not a tensor.")
    return tensor


def run_which(args) -> int:
    x = load_tensor(args.x)
    output = load_tensor(args.output)
    block_scale = load_tensor(args.block_scale) if args.block_scale else None
    report = which_dialect(output, x, global_amax=args.global_amax, block_scale=block_scale, format=args.format,
                           dialects=args.dialects)
    print(report)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("which", help="which stack's NVFP4 / FP8 / MX a kernel's output agrees with, and where not")
    parser.add_argument("--x", required=True, metavar="FILE[:KEY]", help="the kernel's input")
    parser.add_argument("--output", required=True, metavar="FILE[:KEY]",
                        help="fake-quant values (x's shape and dtype), NVFP4 / MXFP4 packed bytes (uint8), or FP8 / "
                             "MXFP8 data")
    parser.add_argument("--block-scale", metavar="FILE[:KEY]",
                        help="the block scales that go with codes: NVFP4's E4M3, or MX's E8M0 (float8_e8m0fnu, or uint8 "
                             "bytes with --format)")
    parser.add_argument("--global-amax", type=float, help="the global amax the kernel was given (default: max|x|)")
    parser.add_argument("--format", choices=("nvfp4", "fp8", *MX_DIALECTS),
                        help="default: MX for E5M2 data or E8M0 scales, fp8 for E4M3 data of x's shape, else nvfp4; "
                             "MX fake-quant values need it")
    mx_names = {name for table in MX_DIALECTS.values() for name in table}
    parser.add_argument("--dialects", nargs="+", metavar="NAME", choices=sorted({*NVFP4_DIALECTS, *FP8_DIALECTS, *mx_names}),
                        help="only these dialects (default: all of the format)")
    parser.set_defaults(func=run_which)
