"""Exact stitching of connected components at block faces, with nothing stored per voxel.

When a segment function's labels are the connected components of a
per-voxel foreground (threshold-label), two blocks hold the same object
exactly where a labelled voxel of one touches a labelled voxel of the other
across their common face, edge or corner, under the function's
connectivity. A block then needs only its neighbours' outermost layers of
labels to find every merge, and its labels can be computed again in the last
pass instead of being stored: the volume is read twice and written once, as
segments. Blockwise connected components at scale are done this way (e.g.
igneous); the context method remains for functions that need context.

Geometry here is pure; a block's faces travel between workers as one record of a pack
(`voxblock.packfile`, `BlockFaces`): each worker appends the faces of its blocks to its own
pack, so the face directory holds two files per worker process, not one per block.

Pass 1 runs with read_write_conflict: while a block runs, no neighbour does, so each neighbour
has either saved its faces (its record is whole and in its pack's index: it was appended
before the neighbour's process returned) or has not run (or was killed before its record was
whole: no record, as if it had not run; it records the edges when it runs again). A block
looks its neighbours up in an index of every pack's newest record per block, read
incrementally, refreshed once per block and only when a neighbour is missing from it. A
block's faces are a function of its input alone, so where a retried block left two records
either is right; the newest is read. A record that its index calls whole but whose checksum
fails is an error, never "not done": treating a done neighbour as absent would lose its edges.
"""

from __future__ import annotations

import itertools
import os

import numpy as np

from voxblock.packfile import PackIndex, PackWriter

KIND = "faces"


def offsets(ndim: int, rank: int) -> list[tuple[int, ...]]:
    """The neighbour offsets of a connectivity: steps of at most one voxel on at most `rank` axes.

    rank 1 is face connectivity (6 in 3-D, 4 in 2-D), rank ndim full connectivity (26, 8).
    The same set names the neighbouring blocks that can touch a block.
    """
    return [d for d in itertools.product((-1, 0, 1), repeat=ndim) if 0 < sum(map(abs, d)) <= rank]


def faces(labels: np.ndarray) -> list[np.ndarray]:
    """The outermost layer of labels on each side: axis 0 low, axis 0 high, axis 1 low, ..."""
    result = []
    for axis in range(labels.ndim):
        for end in (0, -1):
            result.append(np.ascontiguousarray(np.take(labels, end, axis=axis)))
    return result


def facing_layer(neighbour_faces: list[np.ndarray], direction: tuple[int, ...]) -> np.ndarray:
    """The neighbour's labels that touch a block lying at `-direction` from it.

    The neighbour sits at `direction` from the block: on each axis where
    `direction` is +1 its low layer faces the block, -1 its high layer, 0 all
    of it. The result has one axis per zero of `direction`.
    """
    moved = [axis for axis, step in enumerate(direction) if step]
    first = moved[0]
    face = neighbour_faces[2 * first + (0 if direction[first] > 0 else 1)]
    index = []
    for axis, step in enumerate(direction):
        if axis == first:
            continue
        index.append(slice(None) if step == 0 else (0 if step > 0 else -1))
    return face[tuple(index)]


def padded_boundary(
    shape: tuple[int, ...],
    own_faces: list[np.ndarray],
    neighbours: dict[tuple[int, ...], np.ndarray],
    dtype: np.dtype,
) -> np.ndarray:
    """The block's outer layer inside a one-voxel shell of its neighbours' facing labels.

    Shape `shape + 2` on every axis; the block's inner voxels are left 0: no
    pair between a block and its neighbours reaches them.
    """
    ndim = len(shape)
    padded = np.zeros(tuple(s + 2 for s in shape), dtype)
    inner = padded[(slice(1, -1),) * ndim]
    for axis in range(ndim):
        for side, end in enumerate((0, -1)):
            inner[(slice(None),) * axis + (end,)] = own_faces[2 * axis + side]
    for direction, layer in neighbours.items():
        region = tuple(slice(1, -1) if step == 0 else (-1 if step > 0 else 0) for step in direction)
        padded[region] = layer
    return padded


def touching_pairs(padded: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(own, neighbour) labels of every pair of voxels, one in the block and one in its shell,
    that touch under the connectivity and are both labelled. Pairs may repeat."""
    ndim = padded.ndim
    own_parts, their_parts = [], []
    for d in offsets(ndim, rank):
        for axis in (a for a, step in enumerate(d) if step):
            # the block's voxels on its face toward d on `axis`: their d-neighbours are in the shell
            here, there = [], []
            for j, step in enumerate(d):
                if j == axis:
                    inside = padded.shape[j] - 2 if step > 0 else 1
                    here.append(inside)
                    there.append(inside + step)
                else:
                    here.append(slice(1, padded.shape[j] - 1))
                    there.append(slice(1 + step, padded.shape[j] - 1 + step))
            own = padded[tuple(here)]
            theirs = padded[tuple(there)]
            both = (own > 0) & (theirs > 0)
            own_parts.append(own[both])
            their_parts.append(theirs[both])
    if not own_parts:
        empty = np.zeros(0, padded.dtype)
        return empty, empty
    return np.concatenate(own_parts), np.concatenate(their_parts)


def encode_faces(block_faces: list[np.ndarray], shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """One block's faces as one record: [ndim, *shape, faces...] of `dtype`."""
    flat = np.concatenate([np.array([len(shape), *shape], dtype), *(f.ravel() for f in block_faces)])
    return flat.astype(dtype, copy=False).tobytes()


def decode_faces(payload: bytes, dtype: np.dtype, where: str = "a face record") -> list[np.ndarray]:
    flat = np.frombuffer(payload, dtype=dtype)
    ndim = int(flat[0]) if flat.size else 0
    shape = tuple(int(s) for s in flat[1 : 1 + ndim])
    face_shapes = [shape[:axis] + shape[axis + 1 :] for axis in range(ndim) for _ in range(2)]
    sizes = [int(np.prod(face_shape)) for face_shape in face_shapes]
    if not ndim or len(shape) != ndim or flat.size != 1 + ndim + sum(sizes):
        raise ValueError(
            f"{where} holds {flat.size} values, not the faces of one block: rerun with fresh=True"
        )
    result, at = [], 1 + ndim
    for face_shape, size in zip(face_shapes, sizes):
        result.append(flat[at : at + size].reshape(face_shape))
        at += size
    return result


class BlockFaces:
    """The faces of pass 1's blocks in one directory: this process appends, every process reads."""

    def __init__(self, directory: str | os.PathLike[str], dtype: np.dtype) -> None:
        self.directory = directory
        self.dtype = np.dtype(dtype)
        self._writer = PackWriter(directory, KIND)
        self._index = PackIndex(directory, KIND)

    def save(self, block: int, block_faces: list[np.ndarray], shape: tuple[int, ...]) -> None:
        self._writer.append(block, encode_faces(block_faces, shape, self.dtype))

    def look_up(self, blocks: list[int]) -> dict[int, list[np.ndarray]]:
        """The faces of those of `blocks` that saved theirs (at most one refresh of the index)."""
        if any(self._index.newest(b) is None for b in blocks):
            self._index.refresh()
        found = {}
        for block in blocks:
            payload = self._index.get(block)
            if payload is not None:
                found[block] = decode_faces(
                    payload, self.dtype, f"the face record of block {block} in {self.directory}"
                )
        return found
