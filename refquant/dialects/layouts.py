"""The swizzled 128x4 block-scale layout the Blackwell NVFP4 / MX GEMMs read (cuBLAS, CUTLASS,
TensorRT-LLM, FlashInfer, vLLM, torchao's `to_blocked`), to and from the linear (rows, blocks) one.

The scale matrix (M rows, K / 16 blocks) is zero-padded to (ceil(M / 128) * 128, ceil(K/16 / 4) * 4)
and cut into 128 x 4 tiles, laid out tile-row by tile-row. Inside a tile, row r = 32 * i + j and
column c sit at flat offset 16 * j + 4 * i + c: the linear (m_tile, i, j, k_tile, c) becomes the
swizzled (m_tile, k_tile, j, i, c).
"""

from __future__ import annotations

import torch

TILE_ROWS = 128
TILE_COLUMNS = 4


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def swizzled_shape(rows: int, columns: int) -> tuple[int, int]:
    """(padded rows, padded columns) of the swizzled layout of a (rows, columns) scale matrix."""
    return _ceil_to(rows, TILE_ROWS), _ceil_to(columns, TILE_COLUMNS)


def to_swizzled(scales: torch.Tensor) -> torch.Tensor:
    """(rows, columns) linear scales (any dtype) -> 1-D swizzled, zero-padded to whole tiles."""
    if scales.ndim != 2:
        raise ValueError(f"to_swizzled takes a 2-D (rows, blocks) scale matrix, got shape {tuple(scales.shape)}.")
    rows, columns = scales.shape
    padded_rows, padded_columns = swizzled_shape(rows, columns)
    padded = torch.zeros(padded_rows, padded_columns, dtype=torch.uint8, device=scales.device)
    padded[:rows, :columns] = _as_bytes(scales)
    tiles = padded.reshape(padded_rows // TILE_ROWS, 4, 32, padded_columns // TILE_COLUMNS, TILE_COLUMNS)
    return tiles.permute(0, 3, 2, 1, 4).reshape(-1).view(scales.dtype)


def from_swizzled(swizzled: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """1-D (or any shape holding the whole padded matrix) swizzled scales -> linear (rows, columns)."""
    padded_rows, padded_columns = swizzled_shape(rows, columns)
    if swizzled.numel() != padded_rows * padded_columns:
        raise ValueError(
            f"a swizzled ({rows}, {columns}) scale matrix holds {padded_rows} x {padded_columns} = "
            f"{padded_rows * padded_columns} entries (whole 128x4 tiles); got {swizzled.numel()}."
        )
    tiles = _as_bytes(swizzled.reshape(-1)).reshape(padded_rows // TILE_ROWS, padded_columns // TILE_COLUMNS, 32, 4,
                                                    TILE_COLUMNS)
    linear = tiles.permute(0, 3, 2, 1, 4).reshape(padded_rows, padded_columns)
    return linear[:rows, :columns].contiguous().view(swizzled.dtype)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    if t.element_size() != 1:
        raise ValueError(f"scale layouts move one-byte scales (E4M3, E8M0, uint8); got {t.dtype}.")
    return t.contiguous().view(torch.uint8)
