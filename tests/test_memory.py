"""Memory of the eager reference: NVFP4 real quant stays within a few times its input.

Its per-block steps make about 35 bytes of temporaries per element (fp32 blocks, quotients, E2M1
rounding, int64 words for the packing); over a whole 4096 x 4096 bf16 tensor that peaked at 17x
the input. The reference works through large tensors in pieces, which changes no
bit (the blocks are independent): the pieces are checked here against the whole tensor on every
bf16 pattern, and the vector and exhaustive tests hold the result to modelopt.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from conftest import every_16_bit_pattern
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import refquant as rq
from refquant.numerics import nvfp4
from refquant.testing import assert_bitexact


class PeakTensorMemory(TorchDispatchMode):
    """The peak, over the ops run under it, of the bytes of tensor storage those ops allocated and
    that are still referenced (storage shared by views counted once; the inputs not at all)."""

    def __init__(self) -> None:
        super().__init__()
        self._storages: dict[int, list[int]] = {}  # data pointer -> [tensors holding it, bytes]
        self.live = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self._storages[key]
            self.live -= entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in inputs and key not in self._storages:
                continue  # a view of memory allocated before (the input's)
            if key in self._storages:
                self._storages[key][0] += 1
            else:
                self._storages[key] = [1, storage.nbytes()]
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._release, key)
        return out


def test_nvfp4_quantize_of_a_4096_square_bf16_tensor_allocates_at_most_twice_its_size():
    x = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with PeakTensorMemory() as memory:
        quantized = rq.nvfp4_quantize(x)
    ratio = memory.peak / x.nbytes
    assert ratio <= 2.0, f"peak {memory.peak / 2**20:.1f} MiB for a {x.nbytes / 2**20:.0f} MiB input ({ratio:.1f}x)"
    assert quantized.packed.shape == (4096, 2048)


@pytest.mark.parametrize(
    "shape",
    [(4096, 16), (256, 256), (16, 4096), (1, 65536), (5, 13107)],
    ids=["rows of one block", "square", "wide", "one row", "last dim not a multiple of 16"],
)
def test_nvfp4_quantize_in_pieces_gives_the_whole_tensors_bits(shape):
    """Every bf16 pattern (the last shape drops one), quantized whole and in pieces of 48 and 1000
    elements: pieces of whole rows, and a row cut at a block boundary into pieces of its own."""
    x = every_16_bit_pattern(torch.bfloat16)[: shape[0] * shape[1]].reshape(shape)
    global_scale = nvfp4.global_scale_from_amax(torch.tensor(3.0), "modelopt-cpu")
    whole = nvfp4.nvfp4_quantize_blocks(x, global_scale)
    for piece in (48, 1000):
        pieces = nvfp4.nvfp4_quantize_blocks_in_pieces(x, global_scale, piece_elements=piece)
        assert_bitexact(pieces[0], whole[0], f"packed bytes, pieces of {piece}")
        assert_bitexact(pieces[1].view(torch.uint8), whole[1].view(torch.uint8), f"block scales, pieces of {piece}")
