"""The gradient of fake quantization: modelopt's straight-through estimator.

modelopt's fake-quant autograd Functions (ScaledE4M3Function for FP8, DynamicBlockQuantization-
Function for NVFP4, modelopt/torch/quantization/tensor_quant.py) run with `pass_through_bwd=True`,
the default of every quantizer config. Their backward returns the upstream gradient itself for the
input, not clipped to [-amax, amax], and None for the amax and every other argument
(docs/modelopt_behaviour.md §1.9). The forward is the fake quantization, nothing else.
"""

from __future__ import annotations

from typing import Callable

import torch


class _StraightThrough(torch.autograd.Function):
    """forward: fake_quant(x, *args), run by autograd without recording; backward: the upstream
    gradient for x, unchanged, and None for fake_quant and every other argument."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, fake_quant: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        return fake_quant(x, *args)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        ctx.argument_count = len(inputs)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return (grad_output,) + (None,) * (ctx.argument_count - 1)


def straight_through(fake_quant: Callable[..., torch.Tensor], x: torch.Tensor, *args) -> torch.Tensor:
    """fake_quant(x, *args) with modelopt's gradient: d/dx is the identity (the upstream gradient
    passes unchanged, whatever |x| is), and no other argument (the amax, scales taken from it)
    gets one. The forward is fake_quant's own call, so its bits are fake_quant's. When there is
    no gradient to record (grad mode off, or no tensor argument requires grad) it is that plain
    call. fake_quant must be a function of tensors that torch.compile can trace."""
    if torch.is_grad_enabled() and (x.requires_grad or any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
        return _StraightThrough.apply(x, fake_quant, *args)
    return fake_quant(x, *args)
