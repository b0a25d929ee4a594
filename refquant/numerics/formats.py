"""Named limits and code tables of the element and scale formats: FP8 E4M3 (float8_e4m3fn), FP8 E5M2
(float8_e5m2), E2M1 (FP4) and E8M0 (the MX formats' power-of-two scale).

Everything numeric that more than one module needs lives here, once. docs/modelopt_behaviour.md §0
gives the fp32 bit patterns of the derived constants; the tests check them.
"""

from __future__ import annotations

import torch

# --- FP8 E4M3 (float8_e4m3fn): 1 sign, 4 exponent bits (bias 7), 3 mantissa bits, no inf. ---
E4M3_MAX = 448.0  # largest finite magnitude; also the constant KV-cache amax ("cast" modes)
E4M3_MIN_SUBNORMAL = 2.0**-9  # smallest positive value; NVFP4QTensor clamps block scales here
E4M3_DTYPE = torch.float8_e4m3fn
E4M3_EMAX = 8  # exponent of the largest power of two below E4M3_MAX (256)

# --- FP8 E5M2 (float8_e5m2): 1 sign, 5 exponent bits (bias 15), 2 mantissa bits, inf and NaN. ---
E5M2_MAX = 57344.0  # largest finite magnitude, 1.75 * 2**15
E5M2_DTYPE = torch.float8_e5m2
E5M2_EMAX = 15

# --- E2M1 (FP4): 1 sign bit, 2 exponent bits, 1 mantissa bit. ---
E2M1_MAX = 6.0
# Magnitude of each 3-bit magnitude index; bit 3 of a code is the sign
# (docs/modelopt_behaviour.md §4.4).
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Decision points between neighbouring magnitudes (docs/modelopt_behaviour.md §3.4). A tie goes to
# the even index: at 0.25, 1.25, 2.5 and 5 the value rounds down, at 0.75, 1.75 and 3.5 it rounds up.
E2M1_DECISION_POINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_TIE_ROUNDS_UP = (False, True, False, True, False, True, False)
E2M1_SIGN_BIT = 0b1000
E2M1_EMAX = 2  # 4, the largest power of two of E2M1

# --- E8M0 (float8_e8m0fnu): 8 exponent bits, bias 127, no sign, no mantissa: byte b is 2**(b - 127)
# for b in 0..254 (2**-127 .. 2**127) and 0xFF is NaN (OCP MX spec v1.0, section 5.4.1). ---
E8M0_BIAS = 127
E8M0_NAN = 0xFF
E8M0_DTYPE = torch.float8_e8m0fnu

# --- MX (OCP microscaling): E4M3, E5M2 or E2M1 elements in blocks of 32 along one dim, one E8M0
# scale per block. ---
MX_BLOCK_SIZE = 32

# --- NVFP4: E2M1 values in blocks of 16 along the last dim, an E4M3 scale per block, and an fp32
# per-tensor ("global") scale = global_amax / (6 * 448). ---
NVFP4_BLOCK_SIZE = 16
NVFP4_SCALE_DENOMINATOR = E2M1_MAX * E4M3_MAX  # 2688
# rcp(448) as torch's CUDA `tensor / 448.0` uses it (FP8QTensor's amax / 448): fp32 0x3B124925.
RCP_448 = float(torch.tensor(1.0 / E4M3_MAX, dtype=torch.float32))
# rcp(2688) as modelopt's Triton wrapper and CUDA tensors produce it: fp32 0x39C30C31.
# Held as that fp32 value exactly (not the double 1/2688), so `t * RCP_2688` gives the same bits
# whether a backend rounds the Python scalar to fp32 first or multiplies in double and rounds once.
RCP_2688 = float(torch.tensor(1.0 / NVFP4_SCALE_DENOMINATOR, dtype=torch.float32))
# The NVFP4 fake-quant kernel's guards (docs/modelopt_behaviour.md §3.3): a global scale that is
# not > 0 is replaced by 1e-12, and a final block scale below 1e-5 by 1.0. Both are fp32 literals
# there.
NVFP4_GLOBAL_SCALE_FLOOR = 1e-12
NVFP4_BLOCK_SCALE_FLOOR = 1e-5

# FP8 fake quant treats any amax at or below 2**-24 as 1.0 (tensor_quant.py:49-52).
FP8_AMAX_FLOOR = 2.0**-24

SUPPORTED_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The largest finite fp32: an amax or scale beyond it is inf where the numerics compute (fp32).
FP32_MAX = torch.finfo(torch.float32).max
# The smallest normal fp32 (torch.finfo(torch.float32).tiny): below it, the GPU's reciprocal
# instruction flushes a divisor to zero and refquant.numerics.gpu_division normalizes one first.
FP32_SMALLEST_NORMAL = 2.0**-126


def e2m1_code_table(device: torch.device | str | None = None) -> torch.Tensor:
    """fp32 value of each of the 16 E2M1 codes; code 8 ("negative zero") decodes to +0.0."""
    magnitudes = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=device)
    negatives = 0.0 - magnitudes  # 0 - 0 = +0.0, as modelopt's table has it
    return torch.cat([magnitudes, negatives])


def fp32_bits(value: float) -> int:
    """The IEEE binary32 bit pattern of `value` rounded to fp32, as an unsigned int (for docs, tests and
    error messages)."""
    return int(torch.tensor(value, dtype=torch.float32).view(torch.int32).item()) & 0xFFFFFFFF
