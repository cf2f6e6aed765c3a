"""How an output lies on disk: its chunks, its shards, and the unit one write replaces.

Two blocks that run at once must never write into the same file: zarr
rewrites a whole chunk, or a whole shard of a sharded array, on every
write, so the second writer silently drops the first one's voxels. The
*write unit* (the shard where the array is sharded, else the chunk) is what
a block must own whole. These are pure functions of shapes, in voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from funlib.geometry import Coordinate

from voxblock.errors import VoxblockError

# the inner chunk of a shard, per axis, when only a shard size is given: large enough to
# compress well, small enough that a viewer reading one chunk reads little
DEFAULT_INNER_CHUNK = 64
MIN_INNER_CHUNK = 16


@dataclass(frozen=True)
class Layout:
    """Spatial chunk and shard shape (voxels) of an output; `shard` None: unsharded."""

    chunk: Coordinate
    shard: Coordinate | None = None

    @property
    def write_unit(self) -> Coordinate:
        return self.shard if self.shard is not None else self.chunk


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def plan_layout(
    write_shape: Sequence[int],
    chunk_shape: Sequence[int] | None = None,
    shard_shape: Sequence[int] | None = None,
) -> Layout:
    """The layout of a new output written in blocks of `write_shape` voxels.

    By default one chunk is one block. With `shard_shape`, each block owns
    whole shards (the shard must divide the block) and the inner chunk,
    unless given, is the largest divisor of the shard up to 64 voxels (at
    least 16, or the whole shard where it is smaller).
    """
    write = Coordinate(write_shape)
    if shard_shape is None:
        chunk = Coordinate(chunk_shape) if chunk_shape is not None else write
        _check_positive("chunk shape", chunk, write.dims)
        return Layout(chunk)
    shard = Coordinate(shard_shape)
    _check_positive("shard shape", shard, write.dims)
    if any(w % s for w, s in zip(write, shard)):
        raise VoxblockError(
            f"shard shape {tuple(shard)} voxels must divide the write block {tuple(write)} voxels, "
            "so that every block owns whole shards; use a shard size that divides the block size"
        )
    if chunk_shape is None:
        chunk = Coordinate(_largest_divisor_at_most(s, DEFAULT_INNER_CHUNK) for s in shard)
        if any(c < min(MIN_INNER_CHUNK, s) for c, s in zip(chunk, shard)):
            # e.g. a shard of 97: only 1-voxel chunks divide it, a 14 MB index per shard
            raise VoxblockError(
                f"no chunk of {MIN_INNER_CHUNK}-{DEFAULT_INNER_CHUNK} voxels divides the shard shape "
                f"{tuple(shard)}; choose a shard size with such a divisor, or give the chunk shape "
                "(chunk_shape=, --chunk-size)"
            )
    else:
        chunk = Coordinate(chunk_shape)
        _check_positive("chunk shape", chunk, write.dims)
        if any(s % c for s, c in zip(shard, chunk)):
            raise VoxblockError(
                f"chunk shape {tuple(chunk)} voxels must divide the shard shape {tuple(shard)} voxels"
            )
    return Layout(chunk, shard)


def _check_positive(what: str, shape: Coordinate, dims: int) -> None:
    if shape.dims != dims or any(s < 1 for s in shape):
        raise VoxblockError(f"{what} {tuple(shape)} must be {dims} positive voxel counts")
