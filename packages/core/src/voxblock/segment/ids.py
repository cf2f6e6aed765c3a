"""Block-position ID ranges: every block owns a fixed slice of uint64.

A fragment's ID depends only on where its block sits on the grid, never on
which block a worker happened to see first, so IDs are collision-free
whatever order blocks run in, and a block that is redone gets the same IDs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from funlib.geometry import Coordinate, Roi

from voxblock.errors import VoxblockError
from voxblock.geometry import Blocking

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


def smallest_unsigned(max_value: int, at_least: np.dtype | type = np.uint8) -> np.dtype:
    """The smallest unsigned integer dtype, at least as wide as `at_least`, that holds 0..max_value."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if np.dtype(dtype).itemsize >= np.dtype(at_least).itemsize and max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise VoxblockError(f"{max_value} does not fit in any unsigned integer dtype")


def smallest_id_dtype(num_blocks: int, id_range: int) -> np.dtype:
    """uint32 where every block's IDs fit in it (half the bytes to move), else uint64."""
    return smallest_unsigned(num_blocks * id_range, at_least=np.uint32)


def to_global(local: np.ndarray, index: int, id_range: int, dtype: np.dtype | type = np.uint64) -> np.ndarray:
    """Local labels 1..id_range -> the block's global IDs (of `dtype`); 0 stays background."""
    local = np.asarray(local)
    largest = int(local.max(initial=0))
    if largest > id_range:
        raise ValueError(f"block {index} produced label {largest}, more than its ID range of {id_range}")
    dtype = np.dtype(dtype)
    if (index + 1) * id_range > np.iinfo(dtype).max:
        raise ValueError(f"the IDs of block {index} do not fit in {dtype}")
    result = local.astype(dtype)
    result += dtype.type(index * id_range)
    result[local == 0] = 0  # faster than a masked add
    return result


@dataclass(frozen=True)
class BlockGrid:
    """The grid of a task's write blocks and the ID range each block owns."""

    origin: tuple[int, ...]
    stride: tuple[int, ...]
    counts: tuple[int, ...]
    id_range: int

    @classmethod
    def of(cls, blocking: Blocking, id_range: int) -> BlockGrid:
        target = blocking.target_roi
        stride = tuple(blocking.write_roi.shape)
        counts = tuple(max(1, -(-t // s)) for t, s in zip(target.shape, stride))
        check_id_space(int(np.prod(counts)), id_range)
        return cls(tuple(target.begin), stride, counts, int(id_range))

    def to_dict(self) -> dict[str, object]:
        """Plain values, to travel as a worker option."""
        return {
            "origin": list(self.origin),
            "stride": list(self.stride),
            "counts": list(self.counts),
            "id_range": self.id_range,
        }

    @classmethod
    def from_dict(cls, values: dict) -> BlockGrid:
        return cls(
            tuple(values["origin"]), tuple(values["stride"]), tuple(values["counts"]), int(values["id_range"])
        )

    def index(self, write_roi: Roi) -> int:
        return block_index(write_roi, Coordinate(self.origin), Coordinate(self.stride), self.counts)

    def neighbour(self, write_roi: Roi, direction: tuple[int, ...]) -> int | None:
        """The index of the block at `direction` (steps of whole blocks) from this one; None off the grid."""
        position = [
            (b - o) // s + d for b, o, s, d in zip(write_roi.begin, self.origin, self.stride, direction)
        ]
        if any(p < 0 or p >= c for p, c in zip(position, self.counts)):
            return None
        return int(np.ravel_multi_index(position, self.counts))

    @property
    def id_dtype(self) -> np.dtype:
        """The smallest unsigned type that holds every ID of the grid."""
        return smallest_id_dtype(int(np.prod(self.counts)), self.id_range)

    def to_global(self, local: np.ndarray, write_roi: Roi, dtype: np.dtype | type = np.uint64) -> np.ndarray:
        """Local labels 1..id_range of the block at `write_roi` -> globally unique IDs."""
        return to_global(local, self.index(write_roi), self.id_range, dtype)
