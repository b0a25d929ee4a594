"""The MX pieces refquant.dialects builds its MX dialects from (element grids, codes, E8M0 bytes),
and the errors an MX dialect gives for input its stack refuses. The dialects' bits themselves are
held to the stacks' own outputs in tests/test_dialect_vectors.py."""

from __future__ import annotations

import pytest
import torch

from refquant.dialects import MX_DIALECTS, microxcaling, modelopt, mx_dialect, mx_steps, torchao
from refquant.dialects.mx import MX_ELEMENTS, e8m0_values
from refquant.numerics.formats import E2M1_DECISION_POINTS, E2M1_MAGNITUDES


@pytest.mark.parametrize("element", list(MX_ELEMENTS))
def test_every_element_code_decodes_and_encodes_back_to_itself(element):
    fmt = MX_ELEMENTS[element]
    codes = torch.arange(16 if fmt.dtype is None else 256, dtype=torch.int32).to(torch.uint8)
    values = fmt.decode(codes)
    finite = torch.isfinite(values)
    assert torch.equal(fmt.encode(values[finite]), codes[finite])
    assert fmt.magnitudes().max().item() == fmt.max
    assert 2.0**fmt.emax <= fmt.max < 2.0 ** (fmt.emax + 1)


def test_e2m1_grid_and_ties_are_the_nvfp4_ones():
    e2m1 = MX_ELEMENTS["e2m1"]
    assert e2m1.magnitudes().tolist() == list(E2M1_MAGNITUDES)
    assert e2m1.decision_points().tolist() == list(E2M1_DECISION_POINTS)


def test_e8m0_bytes_decode_to_powers_of_two_and_0xff_to_nan():
    values = e8m0_values(torch.arange(256, dtype=torch.int32).to(torch.uint8))
    assert values[:255].tolist() == [2.0 ** (b - 127) for b in range(255)]
    assert torch.isnan(values[255])


def test_every_mx_dialect_records_its_scales_codes_and_fake_quant_consistently():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 96, generator=gen)
    for mx_format, dialects in MX_DIALECTS.items():
        for name in dialects:
            steps = mx_steps(x, name, mx_format)
            assert steps.scale.shape == (4, 3) and steps.codes.shape == (4, 3, 32) and steps.dequantized.shape == x.shape
            decoded = MX_ELEMENTS[steps.element].decode(steps.codes) * e8m0_values(steps.scale).unsqueeze(-1)
            # Every stack here dequantizes as code value times 2**(byte - 127) (fp32 in, fp32 out).
            assert torch.equal(decoded.flatten(-2), steps.dequantized), (mx_format, name)


@pytest.mark.parametrize("call, match", [
    (lambda: torchao.mx_steps(torch.zeros(2, 48), "e4m3"), "multiple of 32"),
    (lambda: torchao.mx_steps(torch.zeros(2, 32, dtype=torch.float16), "e4m3"), "float16"),
    (lambda: torchao.mx_steps(torch.zeros(2, 32), "e4m3", "nearest"), "scaling_mode='nearest'"),
    (lambda: microxcaling.mx_steps(torch.zeros(2, 32), "e3m4"), "'e3m4' is not an MX element"),
    (lambda: microxcaling.mx_steps(torch.zeros(2, 32), "e4m3", rounding="dither"), "rounding='dither'"),
    (lambda: modelopt.mxfp4_qtensor_steps(torch.zeros(2, 16)), "multiple of 32"),
    (lambda: modelopt.mxfp4_qtensor_steps(torch.full((1, 32), float("nan"))), "NaN or inf"),
    (lambda: mx_dialect("modelopt-qtensor", "mxfp8_e5m2"), "not an mxfp8_e5m2 dialect"),
    (lambda: mx_dialect("torchao-floor", "mxfp6"), "'mxfp6' is not an MX format"),
])
def test_mx_dialects_refuse_what_their_stack_refuses_and_say_why(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_padding_stacks_take_a_row_that_is_not_whole_blocks_and_store_only_its_elements():
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    for steps in (microxcaling.mx_steps(x, "e5m2"), modelopt.mxfp8_qtensor_steps(x)):
        assert steps.stored.shape == x.shape and steps.codes.shape == (3, 2, 32)
