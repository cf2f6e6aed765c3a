"""Block-position ID ranges: every block owns a fixed slice of uint64.

A fragment's ID depends only on where its block sits on the grid, never on
which block a worker happened to see first, so IDs are collision-free
whatever order blocks run in, and a block that is redone gets the same IDs.
"""

from __future__ import annotations

import numpy as np
from funlib.geometry import Coordinate, Roi

from voxblock.errors import VoxblockError

UINT64_MAX = np.iinfo(np.uint64).max


def block_index(write_roi: Roi, grid_origin: Coordinate, stride: Coordinate, counts: tuple[int, ...]) -> int:
    """The C-order index of a block on the grid, from its write ROI's offset."""
    position = [(b - o) // s for b, o, s in zip(write_roi.begin, grid_origin, stride)]
    if any(p < 0 or p >= c for p, c in zip(position, counts)):
        raise ValueError(f"block at {write_roi} is off the grid {counts} (origin {grid_origin})")
    return int(np.ravel_multi_index(position, counts))


def check_id_space(num_blocks: int, id_range: int) -> None:
    if num_blocks * id_range >= UINT64_MAX:
        raise VoxblockError(
            f"{num_blocks} blocks of up to {id_range} labels each do not fit in uint64 IDs; "
            "use fewer, smaller blocks"
        )


def to_global(local: np.ndarray, index: int, id_range: int) -> np.ndarray:
    """Local labels 1..id_range -> the block's global IDs; 0 stays background."""
    local = np.asarray(local)
    largest = int(local.max(initial=0))
    if largest > id_range:
        raise ValueError(f"block {index} produced label {largest}, more than its ID range of {id_range}")
    result = local.astype(np.uint64)
    offset = np.uint64(index) * np.uint64(id_range)
    np.add(result, offset, out=result, where=result > 0)
    return result
