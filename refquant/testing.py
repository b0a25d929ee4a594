"""Bit-exact comparison for kernel engineers: refquant.testing.assert_bitexact(actual, expected).

Compares bit patterns (NaN equals NaN whatever its payload, since CUDA and CPU write different
NaN bits, docs/modelopt_behaviour.md P9). On a mismatch it raises AssertionError with the count,
the first mismatching indices, both values and their bits decoded: sign/exponent/mantissa for
floats and E4M3, code and value for E2M1 nibbles, and the block and its scale for NVFP4Tensor
pairs.
"""

from __future__ import annotations

import torch

from .numerics.fp8 import FP8Tensor
from .numerics.formats import E2M1_MAGNITUDES, NVFP4_BLOCK_SIZE
from .numerics.nvfp4 import NVFP4Tensor

_MAX_REPORTED = 8

# (exponent bits, mantissa bits) of the float formats we decode.
_FLOAT_LAYOUT = {
    torch.float32: (8, 23),
    torch.bfloat16: (8, 7),
    torch.float16: (5, 10),
    torch.float8_e4m3fn: (4, 3),
}
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of t as a signed/unsigned integer tensor of the same element size."""
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def decode_float_bits(value: float, bits: int, dtype: torch.dtype) -> str:
    """'0x3F80 (s=0 e=127 m=0) = 1.0' for a float of `dtype`; E4M3 shows its bias-7 exponent."""
    e_bits, m_bits = _FLOAT_LAYOUT[dtype]
    width = 1 + e_bits + m_bits
    bits &= (1 << width) - 1
    sign = bits >> (width - 1)
    exponent = (bits >> m_bits) & ((1 << e_bits) - 1)
    mantissa = bits & ((1 << m_bits) - 1)
    hex_digits = (width + 3) // 4
    return f"0x{bits:0{hex_digits}X} (s={sign} e={exponent} m={mantissa}) = {value!r}"


def decode_e2m1(code: int) -> str:
    sign = -1.0 if code & 0b1000 else 1.0
    value = sign * E2M1_MAGNITUDES[code & 0b111]
    return f"code {code:2d} (0b{code:04b}) = {value if value != 0 else 0.0}"


def _mismatch_mask(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    differ = bits_of(actual) != bits_of(expected)
    if actual.is_floating_point():
        both_nan = torch.isnan(actual.float()) & torch.isnan(expected.float())
        differ &= ~both_nan
    return differ


def _check_meta(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        raise TypeError(
            f"{what}: assert_bitexact compares tensors, FP8Tensor or NVFP4Tensor pairs; got "
            f"{type(actual).__name__} and {type(expected).__name__}."
        )
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{what}: dtype differs: actual {actual.dtype}, expected {expected.dtype}.")
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{what}: shape differs: actual {tuple(actual.shape)}, expected {tuple(expected.shape)}."
        )


def _describe(t: torch.Tensor, index: tuple[int, ...], nibbles: bool) -> str:
    element = t[index]
    if nibbles:
        byte = int(element)
        return f"byte 0x{byte:02X}: low {decode_e2m1(byte & 0xF)}, high {decode_e2m1(byte >> 4)}"
    if t.dtype in _FLOAT_LAYOUT:
        return decode_float_bits(float(element.float()), int(bits_of(element.reshape(1))[0]), t.dtype)
    return repr(element.item())


def _assert_tensors(
    actual: torch.Tensor, expected: torch.Tensor, what: str, nibbles: bool = False, context=None
) -> None:
    _check_meta(actual, expected, what)
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    mask = _mismatch_mask(actual, expected)
    count = int(mask.sum())
    if count == 0:
        return
    lines = [f"{what}: {count} of {mask.numel()} elements differ in their bits (NaN == NaN)."]
    for index in mask.nonzero().tolist()[:_MAX_REPORTED]:
        index = tuple(index)
        lines.append(f"  at {list(index)}:")
        lines.append(f"    actual   {_describe(actual, index, nibbles)}")
        lines.append(f"    expected {_describe(expected, index, nibbles)}")
        if context is not None:
            lines.append(f"    {context(index)}")
    if count > _MAX_REPORTED:
        lines.append(f"  ... and {count - _MAX_REPORTED} more.")
    raise AssertionError("\n".join(lines))


def _assert_nvfp4(actual: NVFP4Tensor, expected: NVFP4Tensor, what: str) -> None:
    if tuple(actual.shape) != tuple(expected.shape) or actual.dtype != expected.dtype:
        raise AssertionError(
            f"{what}: NVFP4Tensor metadata differs: actual shape {tuple(actual.shape)} {actual.dtype}, "
            f"expected {tuple(expected.shape)} {expected.dtype}."
        )
    _assert_tensors(actual.global_scale, expected.global_scale, f"{what}.global_scale")

    def block_context(index: tuple[int, ...]) -> str:
        lead, last = index[:-1], index[-1]
        block = (last * 2) // NVFP4_BLOCK_SIZE
        a_scale = actual.block_scale[lead + (block,)].reshape(1)
        e_scale = expected.block_scale[lead + (block,)].reshape(1)
        return (
            f"elements {2 * last},{2 * last + 1} lie in block {list(lead) + [block]}: block scale "
            f"actual {decode_float_bits(float(a_scale.float()), int(bits_of(a_scale)[0]), torch.float8_e4m3fn)}, "
            f"expected {decode_float_bits(float(e_scale.float()), int(bits_of(e_scale)[0]), torch.float8_e4m3fn)}"
        )

    _assert_tensors(actual.block_scale, expected.block_scale, f"{what}.block_scale")
    _assert_tensors(actual.packed, expected.packed, f"{what}.packed", nibbles=True, context=block_context)


def assert_bitexact(actual, expected, what: str = "tensor") -> None:
    """Raise AssertionError unless `actual` and `expected` have identical bits (NaN == NaN).

    Takes two tensors (same dtype and shape), two FP8Tensor or two NVFP4Tensor (each part compared
    on its own: global scale, block scales, packed bytes / data and scale).
    """
    if isinstance(actual, NVFP4Tensor) and isinstance(expected, NVFP4Tensor):
        return _assert_nvfp4(actual, expected, what)
    if isinstance(actual, FP8Tensor) and isinstance(expected, FP8Tensor):
        _assert_tensors(actual.scale, expected.scale, f"{what}.scale")
        return _assert_tensors(actual.data, expected.data, f"{what}.data")
    return _assert_tensors(actual, expected, what)
