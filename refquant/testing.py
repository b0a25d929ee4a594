"""Bit-exact comparison for kernel engineers: refquant.testing.assert_bitexact(actual, expected).

Compares bit patterns (NaN equals NaN whatever its payload, since CUDA and CPU write different
NaN bits, docs/modelopt_behaviour.md P9). On a mismatch it raises AssertionError with the count,
the first mismatching indices, both values and their bits decoded: sign/exponent/mantissa for
floats and E4M3, code and value for E2M1 nibbles, and the block and its scale for NVFP4Tensor
pairs.

which_dialect(output, x) ranks refquant.dialects (modelopt, torchao, compressed-tensors,
TransformerEngine, TensorRT-LLM, vLLM's emulation; for the MX formats microxcaling, torchao's
scaling modes and modelopt) by how much of a kernel's output each reproduces, and says where the
best one parts from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .dialects import FP8_DIALECTS, MX_DIALECTS, NVFP4_DIALECTS
from .dialects.compare import (
    FP8_STEPS,
    MX_STEPS,
    STEPS,
    ObservedMX,
    ObservedNVFP4,
    bits_differ,
    bits_of,
    fp8_step_of_difference,
    observed_mx_differ,
    observed_mx_steps,
    observed_nvfp4_differ,
    observed_nvfp4_steps,
)
from .dialects.mx import MX_FORMATS, mx_element
from .numerics.fp8 import FP8Tensor
from .numerics.formats import E2M1_MAGNITUDES, MX_BLOCK_SIZE, NVFP4_BLOCK_SIZE
from .numerics.nvfp4 import NVFP4Tensor, to_blocks, unpack_e2m1

_MAX_REPORTED = 8

# (exponent bits, mantissa bits) of the float formats we decode.
_FLOAT_LAYOUT = {
    torch.float32: (8, 23),
    torch.bfloat16: (8, 7),
    torch.float16: (5, 10),
    torch.float8_e4m3fn: (4, 3),
    torch.float8_e5m2: (5, 2),
}


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
    mask = bits_differ(actual, expected)
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


# ---------------------------------------------------------------------------------------------
# Which stack's dialect a kernel speaks (refquant.dialects)
# ---------------------------------------------------------------------------------------------


@dataclass
class DialectAgreement:
    """How many of an output's elements a dialect reproduces bit for bit."""

    dialect: str
    differing: int
    total: int
    note: str = ""  # why the dialect could not be computed for this x (its stack refuses it)

    @property
    def agreeing(self) -> int:
        return self.total - self.differing


@dataclass
class WhichDialect:
    """which_dialect's answer: the dialects ranked by agreement (best first), and for the best one
    the differing elements with the step where they part (refquant.dialects.compare.STEPS)."""

    format: str
    ranking: list
    differing_by_step: dict = field(default_factory=dict)
    differences: list = field(default_factory=list)  # the first few, described

    @property
    def best(self) -> str:
        """The dialect that reproduces the most elements (the first of those tied)."""
        return self.ranking[0].dialect

    @property
    def tied(self) -> list:
        """Every dialect that reproduces as many elements as the best (the best first)."""
        best = self.ranking[0].differing
        return [row.dialect for row in self.ranking if not row.note and row.differing == best]

    def __str__(self) -> str:
        lines = [f"{self.format} output: dialects by agreement (elements reproduced bit for bit, NaN == NaN):"]
        for row in self.ranking:
            if row.note:
                lines.append(f"  {row.dialect:20s} not computed: {row.note}")
            else:
                lines.append(f"  {row.dialect:20s} {row.agreeing} of {row.total} ({row.differing} differ)")
        best = self.ranking[0]
        ties = f" (as good: {', '.join(self.tied[1:])})" if len(self.tied) > 1 else ""
        if best.differing == 0:
            lines.append(f"best: {self.best}{ties}, every element.")
            return "\n".join(lines)
        steps = ", ".join(f"{step}: {count}" for step, count in self.differing_by_step.items())
        lines.append(f"best: {self.best}{ties}; its {best.differing} differing elements part at: {steps}")
        lines += self.differences
        if best.differing > len(self.differences):
            lines.append(f"  ... and {best.differing - len(self.differences)} more.")
        return "\n".join(lines)


def which_dialect(output, x: torch.Tensor, *, global_amax=None, block_scale: torch.Tensor | None = None,
                  format: str | None = None, dialects=None) -> WhichDialect:
    """Rank the dialects (refquant.dialects) by how many elements of a kernel's `output` for input
    `x` each reproduces bit for bit, and explain where the best one parts from the output.

    output: fake-quant values (x's shape and dtype; `format` "nvfp4", the default, "fp8", or an MX
            format); NVFP4 codes, as packed bytes (uint8, (..., n / 2)) with `block_scale`
            (float8_e4m3fn, (..., n / 16)) or as a refquant NVFP4Tensor; FP8 data (float8_e4m3fn,
            x's shape); or MX elements with their E8M0 scales as `block_scale` (float8_e8m0fnu, or
            uint8 bytes with `format` given; (..., n / 32)): MXFP4 packed bytes (uint8, (..., n / 2)),
            MXFP8 data (float8_e4m3fn or float8_e5m2, x's shape).
    format: "nvfp4", "fp8", "mxfp8_e4m3", "mxfp8_e5m2" or "mxfp4". None: float8_e5m2 data or an
            E8M0 block_scale mean MX (the element format read from the output's dtype), E4M3 data of
            x's shape FP8, else NVFP4. MX fake-quant values need `format`.
    global_amax: the amax the kernel was given (float or 0-d); None: max|x|, as each stack takes it.
            MX scales come from the data alone: give none.
    dialects: names to try (default: every dialect of the format).
    """
    if isinstance(output, NVFP4Tensor):
        output, block_scale = output.packed, output.block_scale
    if not isinstance(output, torch.Tensor) or not isinstance(x, torch.Tensor):
        raise ValueError("which_dialect takes the kernel's output and its input x as tensors.")
    if format is None:
        format = _guess_format(output, x, block_scale)
    formats = ("nvfp4", "fp8", *MX_DIALECTS)
    if format not in formats:
        raise ValueError(f"format={format!r}: use one of {', '.join(map(repr, formats))}.")
    if format in MX_DIALECTS:
        return _which_mx(output, x, format, global_amax, block_scale, _chosen(MX_DIALECTS[format], dialects, format))
    chosen = _chosen(NVFP4_DIALECTS if format == "nvfp4" else FP8_DIALECTS, dialects, format)
    if format == "fp8":
        return _which_fp8(output, x, global_amax, chosen)
    if output.dtype == torch.uint8:
        if block_scale is None:
            raise ValueError("packed NVFP4 codes need their block_scale (float8_e4m3fn, one per 16 elements) too.")
        codes = _unpack_codes(output)
        blocks = codes.shape[:-1]
        if block_scale.numel() != blocks.numel():
            raise ValueError(
                f"block_scale has {block_scale.numel()} elements for {blocks.numel()} NVFP4 blocks of 16 (codes "
                f"{tuple(codes.shape)}): give one E4M3 scale per block, or format= for MX elements and their E8M0 scales."
            )
        observed = ObservedNVFP4(codes=codes, block_scale=block_scale.view(torch.float8_e4m3fn).reshape(blocks))
    else:
        if output.shape != x.shape or output.dtype != x.dtype:
            raise ValueError(f"fake-quant output must have x's shape and dtype: output {tuple(output.shape)} "
                             f"{output.dtype}, x {tuple(x.shape)} {x.dtype}.")
        observed = ObservedNVFP4(dequantized=output)
    return _which_nvfp4(observed, x, global_amax, chosen)


def _guess_format(output: torch.Tensor, x: torch.Tensor, block_scale) -> str:
    if output.dtype == torch.float8_e5m2:
        return "mxfp8_e5m2"
    if block_scale is not None and block_scale.dtype == torch.float8_e8m0fnu:
        return "mxfp8_e4m3" if output.dtype == torch.float8_e4m3fn else "mxfp4"
    return "fp8" if output.dtype == torch.float8_e4m3fn and output.shape == x.shape else "nvfp4"


def _chosen(table: dict, dialects, format: str) -> dict:
    names = list(table) if dialects is None else list(dialects)
    unknown = [name for name in names if name not in table]
    if unknown:
        raise ValueError(f"{unknown} are not {format} dialects; they are {', '.join(table)}.")
    return {name: table[name] for name in names}


def _which_mx(output, x, format, global_amax, scale, dialects) -> WhichDialect:
    if global_amax is not None:
        raise ValueError(f"{format} takes its block scales from the data; drop global_amax={global_amax!r}.")
    element = mx_element(MX_FORMATS[format])
    if output.dtype == x.dtype and output.shape == x.shape:
        observed = ObservedMX(element.name, dequantized=output)
    else:
        if scale is None:
            raise ValueError(f"{format} elements need their E8M0 scales as block_scale (one per 32 elements).")
        stored_dtype = torch.uint8 if element.dtype is None else element.dtype
        if output.dtype != stored_dtype:
            raise ValueError(f"{format} elements are {stored_dtype} (or fake-quant values of x's shape and dtype); "
                             f"got {output.dtype}.")
        codes = element.unpack(output)
        if codes.shape[-1] != x.shape[-1]:
            raise ValueError(f"{format} elements hold {codes.shape[-1]} elements a row; x has {x.shape[-1]}.")
        codes = to_blocks(codes, MX_BLOCK_SIZE)
        observed = ObservedMX(element.name, codes=codes, scale=scale.view(torch.uint8).reshape(codes.shape[:-1]))
    # Elements past x's last dim pad the last block (stacks that pad fill it with zeros); they don't count.
    real = to_blocks(torch.ones(x.shape[-1], dtype=torch.bool, device=x.device), MX_BLOCK_SIZE)
    computed, skipped = _run_dialects(dialects, x, None, takes_amax=False)
    differ = {name: observed_mx_differ(observed, steps) & real for name, steps in computed.items()}
    ranking = _ranking(differ, skipped, total=x.numel())
    best = computed[ranking[0].dialect]
    step = observed_mx_steps(x, observed, best, differ[best.dialect])
    return _block_report(format, x, ranking, computed, differ, step, MX_STEPS, MX_BLOCK_SIZE,
                         lambda index, from_output: _mx_element(observed, best, index, from_output))


def _mx_element(observed, steps, index, from_output: bool) -> str:
    element = mx_element(steps.element)
    if observed.dequantized is not None:
        source = observed.dequantized if from_output else steps.dequantized
        value = to_blocks(source, MX_BLOCK_SIZE)[index].reshape(1)
        text = decode_float_bits(float(value.float()), int(bits_of(value)[0]), source.dtype)
    else:
        code = int((observed.codes if from_output else steps.codes)[index])
        text = decode_e2m1(code) if element.dtype is None else (
            f"{element.name} " + decode_float_bits(float(element.decode(torch.tensor([code], dtype=torch.uint8))),
                                                   code, element.dtype))
    scale = observed.scale if from_output and observed.scale is not None else steps.scale
    byte = int(scale[index[:-1]])
    exponent = "NaN" if byte == 0xFF else f"2^{byte - 127}"
    return f"{text}; E8M0 scale 0x{byte:02X} = {exponent}"


def _unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    codes = unpack_e2m1(packed)
    if codes.shape[-1] % NVFP4_BLOCK_SIZE:
        raise ValueError(f"packed NVFP4 holds 8 bytes a block of 16; the last dim {packed.shape[-1]} is not a multiple of 8.")
    return codes.unflatten(-1, (-1, NVFP4_BLOCK_SIZE))


def _run_dialects(dialects: dict, x, global_amax, takes_amax: bool = True) -> tuple[dict, list]:
    computed, skipped = {}, []
    for name, dialect in dialects.items():
        try:
            computed[name] = dialect.steps(x, global_amax) if takes_amax else dialect.steps(x)
        except ValueError as error:  # the stack refuses this x (dtype, shape): say so, rank the rest
            skipped.append(DialectAgreement(name, 0, 0, str(error)))
    if not computed:
        raise ValueError("no dialect could compute this x: " + "; ".join(f"{row.dialect}: {row.note}" for row in skipped))
    return computed, skipped


def _which_nvfp4(observed, x, global_amax, dialects) -> WhichDialect:
    computed, skipped = _run_dialects(dialects, x, global_amax)
    differ = {name: observed_nvfp4_differ(observed, steps) for name, steps in computed.items()}
    ranking = _ranking(differ, skipped)
    best = computed[ranking[0].dialect]
    step = observed_nvfp4_steps(x, observed, best, differ[best.dialect])
    return _block_report("nvfp4", x, ranking, computed, differ, step, STEPS, NVFP4_BLOCK_SIZE,
                         lambda index, from_output: _nvfp4_element(observed, best, index, from_output))


def _ranking(differ: dict, skipped: list, total: int | None = None) -> list:
    """DialectAgreement rows, fewest differing elements first, then the dialects that could not run."""
    rows = (DialectAgreement(name, int(mask.sum()), mask.numel() if total is None else total)
            for name, mask in differ.items())
    return sorted(rows, key=lambda row: row.differing) + skipped


def _block_report(format, x, ranking, computed, differ, step, step_names, block, describe) -> WhichDialect:
    """WhichDialect for a blocked format: the steps where the best dialect's differing elements part
    from the output (counted), and the first few described (`describe(index, from_output)`)."""
    best = ranking[0].dialect
    lines = []
    for index in differ[best].nonzero().tolist()[:_MAX_REPORTED]:
        *lead, block_index, k = index
        element = (*lead, block_index * block + k)
        also = [name for name in computed if name != best and not bool(differ[name][tuple(index)])]
        lines.append(f"  at {list(element)} ({step_names[int(step[tuple(index)])]}):")
        lines.append(f"    x        {_describe(x, element, False)}")
        lines.append(f"    output   {describe(tuple(index), True)}")
        lines.append(f"    {best:8s} {describe(tuple(index), False)}")
        if also:
            lines.append(f"    the output's bits here are also {', '.join(also)}'s")
    return WhichDialect(format, ranking, _count_by_step(step, step_names), lines)


def _count_by_step(step: torch.Tensor, step_names: tuple) -> dict:
    """{step name: how many elements part there} from an index tensor into step_names (-1: none),
    steps without elements left out."""
    counts = {name: int((step == i).sum()) for i, name in enumerate(step_names)}
    return {name: count for name, count in counts.items() if count}


def _nvfp4_element(observed, steps, index, from_output: bool) -> str:
    block_index = index[:-1]
    if observed.dequantized is not None:
        source = observed.dequantized if from_output else steps.dequantized
        element = to_blocks(source, NVFP4_BLOCK_SIZE)[index].reshape(1)
        text = decode_float_bits(float(element.float()), int(bits_of(element)[0]), source.dtype)
    else:
        codes = observed.codes if from_output else steps.codes
        text = decode_e2m1(int(codes[index]))
    scale = (observed.block_scale if from_output and observed.block_scale is not None else steps.block_scale)[block_index]
    scale = scale.reshape(1)
    return f"{text}; block scale {decode_float_bits(float(scale.float()), int(bits_of(scale)[0]), torch.float8_e4m3fn)}"


def _which_fp8(output, x, global_amax, dialects) -> WhichDialect:
    is_data = output.dtype == torch.float8_e4m3fn
    if output.shape != x.shape or not (is_data or output.dtype == x.dtype):
        raise ValueError(f"FP8 output must be E4M3 data of x's shape or fake-quant values of x's shape and dtype; got "
                         f"{tuple(output.shape)} {output.dtype}, x {tuple(x.shape)} {x.dtype}.")
    computed, skipped = _run_dialects(dialects, x, global_amax)
    differ = {name: bits_differ(output, steps.data if is_data else steps.dequantized) for name, steps in computed.items()}
    ranking = _ranking(differ, skipped)
    best = ranking[0].dialect
    runner_up = next((row.dialect for row in ranking[1:] if not row.note), None)
    counts, lines = {}, []
    if runner_up is not None:
        # Every differing element gets a step (fp8_step_of_difference's last one catches all).
        step = fp8_step_of_difference(x.float(), computed[best], computed[runner_up], differ[best])
        counts = _count_by_step(step, FP8_STEPS)
        for index in differ[best].nonzero().tolist()[:_MAX_REPORTED]:
            index = tuple(index)
            lines.append(f"  at {list(index)} ({FP8_STEPS[int(step[index])]}, against {runner_up}):")
            lines.append(f"    x        {_describe(x, index, False)}")
            lines.append(f"    output   {_describe(output, index, False)}")
            lines.append(f"    {best:8s} {_describe(computed[best].data if is_data else computed[best].dequantized, index, False)}")
    return WhichDialect("fp8", ranking, counts, lines)
