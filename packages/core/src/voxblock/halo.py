"""Context without decoding whole neighbouring chunks: thin copies of every chunk's faces.

A block read with context touches the chunks around its own: 64^3 blocks on
64^3 chunks with one voxel of context decode 27 chunks to use 1 whole and
26 slivers, and decoding is most of what such a block costs. A halo keeps,
for every chunk of an array, its 2 x dims face slabs (as thick as the
context) in one small uncompressed file; a read takes the slivers from
there and decodes only the chunks it uses whole.

Slabs are made as a side effect of the run, so each chunk is decoded about
twice in all, not 27 times: a read that has to decode a neighbouring chunk
of an input keeps its slabs (`from_reads`), and a write of a whole chunk of
an output that blocks read back with context (segment fragments) keeps its
slabs. A slab is an optimisation only: where none exists the chunk is read
from zarr, so a missing halo costs time, never correctness.

A chunk's slabs are one record of a pack (`voxblock.packfile`), keyed by the chunk's grid
index: every worker process appends the slabs it keeps to its own pack, so a halo is two
files per worker process, not one per chunk. Before a chunk is rewritten its writer
appends a tombstone for it (if any record of it is known), and its new slabs after the
write, each stamped past the newest record of the chunk it knows of: the newest record wins,
so a tombstone hides the slabs of the chunk's old data and the slabs kept after it hide the
tombstone. A reader refreshes its index of every pack (only the entries added since)
once per read that wants a slab, so it sees what a block that ran before it kept, as it
saw the files that block left; a record that fails its checksum is read as no slab.
"""

from __future__ import annotations

import functools
import math
import operator
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from funlib.geometry import Coordinate, Roi

from voxblock.blockio import write_direct
from voxblock.chunks import Box, box_slices, chunk_io, chunks_in, intersect, unit_of
from voxblock.metadata import ZarrArray
from voxblock.names import ArrayName
from voxblock.packfile import CorruptRecord, Entry, PackIndex, PackWriter

KIND = "slabs"
# chunk payloads a process keeps in memory: a block's next neighbour reads most of the same slabs
CACHE_BYTES = 64 << 20

# a halo is worth it when the read ROI touches this many times the chunks the
# write ROI does, and its slabs stay below this fraction of the array's bytes
MIN_AMPLIFICATION = 2.0
MAX_SLAB_FRACTION = 0.5


@dataclass(frozen=True)
class Halo:
    """Where one array's face slabs are kept, and how thick they are (voxels per spatial axis)."""

    directory: str
    thickness: tuple[int, ...]
    # keep the slabs of chunks that reads decode (inputs: never rewritten during the run)
    from_reads: bool = False

    def store(self) -> _SlabStore:
        """This process's view of the halo's packs (one per directory and process)."""
        key = (self.directory, os.getpid())
        found = _STORES.get(key)
        if found is None:
            found = _STORES[key] = _SlabStore(self.directory)
        return found

    # a read strategy (voxblock.blockio.BlockIO): an array whose `block_io` is this halo reads
    # and writes its blocks here

    def read(self, array: Any, roi: Roi, fill_value: float) -> np.ndarray:
        return read(array, roi, fill_value, self)

    def write(self, array: Any, roi: Roi, data: np.ndarray) -> None:
        forget(array, self, roi)
        write_direct(array, roi, data)
        keep(array, self, roi, data)


def use_halos(arrays: Iterable[Any], halos: Mapping[str, Halo]) -> None:
    """Give each of `arrays` (those a worker opened) that `halos` (by array name) keeps a halo
    for that halo as its way to read and write blocks; the others read straight from their chunks."""
    if not halos:
        return
    by_path = {str(ArrayName.parse(name).path.resolve()): kept for name, kept in halos.items()}
    for array in arrays:
        if isinstance(array, ZarrArray) and array._path in by_path:
            array.block_io = by_path[array._path]


# -- geometry (pure; boxes are (begin, end) voxel tuples relative to the array's first voxel) --


def _shifted(box: Box, by: tuple[int, ...]) -> Box:
    return tuple(map(operator.add, box[0], by)), tuple(map(operator.add, box[1], by))


def contains(outer: Box, inner: Box) -> bool:
    return all(o <= i for o, i in zip(outer[0], inner[0])) and all(i <= o for i, o in zip(inner[1], outer[1]))


@functools.lru_cache(maxsize=256)
def _relative_slabs(extent: tuple[int, ...], thickness: tuple[int, ...]) -> tuple[Box, ...]:
    """The face slabs of a chunk of this extent, relative to its first voxel (the same for most chunks)."""
    slabs = []
    for axis, t in enumerate(thickness):
        depth = min(t, extent[axis])
        for low in (0, extent[axis] - depth):
            begin = (0,) * len(extent)
            slabs.append(
                ((*begin[:axis], low, *begin[axis + 1 :]), (*extent[:axis], low + depth, *extent[axis + 1 :]))
            )
    return tuple(slabs)


def slab_boxes(chunk: Box, thickness: tuple[int, ...]) -> list[Box]:
    """The face slabs of a chunk: axis 0 low, axis 0 high, axis 1 low, ..."""
    begin, end = chunk
    extent = tuple(e - b for b, e in zip(begin, end))
    return [
        (tuple(map(operator.add, low, begin)), tuple(map(operator.add, high, begin)))
        for low, high in _relative_slabs(extent, thickness)
    ]


def slab_holding(piece: Box, chunk: Box, thickness: tuple[int, ...]) -> int | None:
    """Which face slab of `chunk` contains `piece` (a part of the chunk), if any."""
    begin, end = chunk
    extent = tuple(e - b for b, e in zip(begin, end))
    relative = (tuple(map(operator.sub, piece[0], begin)), tuple(map(operator.sub, piece[1], begin)))
    for k, slab in enumerate(_relative_slabs(extent, thickness)):
        if contains(slab, relative):
            return k
    return None


def context_thickness(read_roi: Roi, write_roi: Roi, voxel_size: Coordinate) -> Coordinate:
    """The context of a block on each spatial axis (voxels; the larger of the two sides)."""
    low = (write_roi.begin - read_roi.begin) / voxel_size
    high = (read_roi.end - write_roi.end) / voxel_size
    return Coordinate(max(a, b, 0) for a, b in zip(low, high))


def chunks_touched(roi: Roi, origin: Coordinate, chunk_world: Coordinate) -> int:
    """How many chunks of the grid (origin + k * chunk) `roi` touches."""
    first = (roi.begin - origin) // chunk_world
    last = (roi.end - origin - Coordinate((1,) * roi.dims)) // chunk_world
    return int(np.prod([e - f + 1 for f, e in zip(first, last)]))


def plan_thickness(
    read_roi: Roi,
    write_roi: Roi,
    voxel_size: Coordinate,
    chunk_shape: Coordinate,
    origin: Coordinate,
    force: bool = False,
) -> Coordinate | None:
    """The slab thickness (voxels) that pays for a halo of an array read with this context, or None.

    A halo pays when a block (the first one: they repeat on the grid) decodes
    many more chunks than it writes (`MIN_AMPLIFICATION`) and the slabs
    stay thin next to the chunks. `force`: wherever the context is thinner
    than a chunk.
    """
    thickness = context_thickness(read_roi, write_roi, voxel_size)
    if not any(thickness) or any(t >= c for t, c in zip(thickness, chunk_shape)):
        return None
    if force:
        return thickness
    chunk_world = chunk_shape * voxel_size
    amplification = chunks_touched(read_roi, origin, chunk_world) / chunks_touched(
        write_roi, origin, chunk_world
    )
    slab_fraction = sum(2 * t / c for t, c in zip(thickness, chunk_shape))
    if amplification < MIN_AMPLIFICATION or slab_fraction > MAX_SLAB_FRACTION:
        return None
    return thickness


# -- the packs ---------------------------------------------------------------------------------


def chunk_key(index: tuple[int, ...]) -> int:
    """A chunk's grid index as one pack key: its coordinates in equal bit fields."""
    bits = 62 // max(1, len(index))
    key = 0
    for i in index:
        if not 0 <= i < 1 << bits:
            raise ValueError(f"chunk index {index} is past what a halo can key")
        key = (key << bits) | i
    return key


class _SlabStore:
    """A halo's packs as one process sees them: its writer, an index of every pack, a cache."""

    def __init__(self, directory: str) -> None:
        self.writer = PackWriter(directory, KIND)
        self.index = PackIndex(directory, KIND)
        self.stamps: dict[int, int] = {}  # the stamp of this process's last record of a chunk
        self.cache: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self.cached_bytes = 0
        self.fresh = False  # refreshed during the current read

    def newest(self, key: int) -> Entry | None:
        return self.index.newest(key)

    def append(self, key: int, payload: bytes = b"", tombstone: bool = False) -> None:
        known = self.index.newest(key)
        after = max(self.stamps.get(key, -1), -1 if known is None else known.stamp)
        self.stamps[key] = self.writer.append(key, payload, after=after, tombstone=tombstone)

    def payload(self, key: int) -> bytes | None:
        entry = self.index.newest(key)
        if entry is None or entry.tombstone or self.stamps.get(key, -1) > entry.stamp:
            return None  # none, forgotten, or this process has written the chunk since the refresh
        where = (entry.pack, entry.offset, entry.stamp)
        found = self.cache.get(where)
        if found is not None:
            self.cache.move_to_end(where)
            return found
        try:
            found = self.index.load(entry)
        except (CorruptRecord, OSError):
            return None
        self.cache[where] = found
        self.cached_bytes += len(found)
        while self.cached_bytes > CACHE_BYTES and len(self.cache) > 1:
            _, dropped = self.cache.popitem(last=False)
            self.cached_bytes -= len(dropped)
        return found


_STORES: dict[tuple[str, int], _SlabStore] = {}


# -- I/O --------------------------------------------------------------------------------------


def _slices(box: Box, within: tuple[int, ...], channel_dims: int) -> tuple[slice, ...]:
    return (slice(None),) * channel_dims + box_slices(box, within)


@dataclass(frozen=True)
class _Grid:
    """An array's voxel grid as plain tuples: funlib's Coordinate arithmetic costs more than the I/O."""

    origin: Coordinate
    voxel_size: Coordinate
    shape: tuple[int, ...]
    chunk: tuple[int, ...]
    channels: tuple[int, ...]

    @classmethod
    def of(cls, array: Any) -> _Grid:
        channel_dims = array.channel_dims
        return cls(
            array.roi.begin,
            array.voxel_size,
            tuple(array.shape[channel_dims:]),
            tuple(array._source_data.chunks[channel_dims:]),
            tuple(array.shape[:channel_dims]),
        )

    def box(self, roi: Roi) -> Box:
        begin = (roi.begin - self.origin) / self.voxel_size
        return tuple(begin), tuple(b + s for b, s in zip(begin, roi.shape / self.voxel_size))


@functools.lru_cache(maxsize=256)
def _file_layout(
    extent: tuple[int, ...], thickness: tuple[int, ...], channels: tuple[int, ...]
) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """Shapes of a chunk's slabs in its file, and where each starts (elements; last: the total)."""
    shapes = tuple(
        channels + tuple(e - b for b, e in zip(*slab)) for slab in _relative_slabs(extent, thickness)
    )
    starts = [0]
    for shape in shapes:
        starts.append(starts[-1] + math.prod(shape))
    return shapes, tuple(starts)


def load_slab(array: Any, halo: Halo, index: tuple[int, ...], chunk: Box, k: int) -> np.ndarray | None:
    """Face slab `k` of one chunk, or None where none is kept (or its record is not whole)."""
    extent = tuple(e - b for b, e in zip(*chunk))
    shapes, starts = _file_layout(extent, halo.thickness, tuple(array.shape[: array.channel_dims]))
    dtype = array.dtype
    store = halo.store()
    key = chunk_key(index)
    if not store.fresh:  # once per read: what blocks that ran before this one kept
        store.index.refresh()
        store.fresh = True
    payload = store.payload(key)
    if payload is None or len(payload) != starts[-1] * dtype.itemsize:
        return None
    flat = np.frombuffer(
        payload, dtype=dtype, count=starts[k + 1] - starts[k], offset=starts[k] * dtype.itemsize
    )
    return flat.reshape(shapes[k])


def save_slabs(
    array: Any, halo: Halo, index: tuple[int, ...], chunk: Box, data: np.ndarray, data_begin: tuple[int, ...]
) -> None:
    """Keep the face slabs of one chunk, cut from `data` (whose first voxel is `data_begin`)."""
    parts = [
        np.ascontiguousarray(data[_slices(slab, data_begin, array.channel_dims)]).ravel()
        for slab in slab_boxes(chunk, halo.thickness)
    ]
    halo.store().append(chunk_key(index), np.concatenate(parts).astype(array.dtype, copy=False).tobytes())


@dataclass(frozen=True)
class _Piece:
    """Part of a read that one chunk supplies, from a slab (k) or not; boxes relative to the read."""

    index: tuple[int, ...]  # the chunk's grid index, relative to the read's first chunk
    chunk: Box  # the chunk (clipped to the array)
    piece: Box  # the part of it the read needs
    k: int | None  # the face slab holding the piece, if one does
    slab_begin: tuple[int, ...]  # where that slab starts


@functools.lru_cache(maxsize=4096)
def _read_plan(
    box: Box, shape: tuple[int, ...], chunk: tuple[int, ...], thickness: tuple[int, ...]
) -> tuple[Box | None, tuple[_Piece, ...]]:
    """Which chunks a read uses whole (one box, or None) and where every other piece comes from.

    Everything is relative to the first voxel of the first chunk the read
    touches, and `shape` (the array's end) is capped past the last one, so
    blocks in the same place on the chunk grid share one plan: per block,
    what is left is copying, not geometry.
    """
    whole: list[Box] = []
    rest: list[_Piece] = []
    for index, piece_chunk in chunks_in(shape, chunk, box):
        piece = intersect(piece_chunk, box)
        if piece == piece_chunk:
            whole.append(piece)
            continue
        k = slab_holding(piece, piece_chunk, thickness)
        slab_begin = piece_chunk[0]
        if k is not None:
            extent = tuple(e - b for b, e in zip(*piece_chunk))
            slab_begin = tuple(map(operator.add, _relative_slabs(extent, thickness)[k][0], piece_chunk[0]))
        rest.append(_Piece(index, piece_chunk, piece, k, slab_begin))
    if not whole:
        return None, tuple(rest)
    # the chunks used whole form a box (those of a box inside another): one read
    core = whole[0]
    if len(whole) > 1:
        core = tuple(map(min, *(p[0] for p in whole))), tuple(map(max, *(p[1] for p in whole)))
    return core, tuple(p for p in rest if not contains(core, p.piece))


def read(array: Any, roi: Roi, fill_value: float, halo: Halo) -> np.ndarray:
    """`roi` of the array (fill value outside it), taking chunk slivers from the halo."""
    grid = _Grid.of(array)
    box = grid.box(roi)
    channel_dims = len(grid.channels)
    data = np.full(grid.channels + tuple(e - b for b, e in zip(*box)), fill_value, dtype=array.dtype)
    # the plan is relative to `base`, the first voxel of the first chunk the read touches
    first = tuple(max(b, 0) // c for b, c in zip(box[0], grid.chunk))
    base = tuple(f * c for f, c in zip(first, grid.chunk))
    relative = _shifted(box, tuple(-b for b in base))
    window = tuple(-(-max(e, 0) // c) * c for e, c in zip(relative[1], grid.chunk))
    shape = tuple(min(s - b, w) for s, b, w in zip(grid.shape, base, window))
    core, rest = _read_plan(relative, shape, grid.chunk, halo.thickness)
    source = chunk_io(array)
    halo.store().fresh = False
    at, origin = relative[0], (0,) * len(base)
    if core is not None:
        data[_slices(core, at, channel_dims)] = source[_slices(_shifted(core, base), origin, channel_dims)]
    for part in rest:
        index = tuple(map(operator.add, part.index, first))
        target = _slices(part.piece, at, channel_dims)
        slab = load_slab(array, halo, index, part.chunk, part.k) if part.k is not None else None
        if slab is not None:
            data[target] = slab[_slices(part.piece, part.slab_begin, channel_dims)]
            continue
        chunk = _shifted(part.chunk, base)
        if source.fill_value is not None and _stored(array._source_data, index, channel_dims) is False:
            data[target] = source.fill_value  # what zarr reads for a chunk never written
        elif part.k is not None and halo.from_reads:
            # decode the whole chunk (zarr would anyway) and keep its slabs for the next blocks
            whole_chunk = source[_slices(chunk, origin, channel_dims)]
            data[target] = whole_chunk[_slices(part.piece, part.chunk[0], channel_dims)]
            save_slabs(array, halo, index, chunk, whole_chunk, chunk[0])
        else:
            data[target] = source[_slices(_shifted(part.piece, base), origin, channel_dims)]
    return data


def _stored(source: Any, index: tuple[int, ...], channel_dims: int) -> bool | None:
    """Whether a chunk (its shard, where the array is sharded) was ever written (None: this
    store cannot say cheaply).

    A neighbour that has not run yet has no chunk and no slabs: a stat
    instead of a zarr read.
    """
    root = getattr(getattr(source, "store", None), "root", None)
    if root is None or tuple(source.chunks[:channel_dims]) != tuple(source.shape[:channel_dims]):
        return None
    shards = getattr(source, "shards", None)
    if shards is not None:  # the file is the shard that holds this chunk
        per_shard = tuple(s // c for s, c in zip(shards[channel_dims:], source.chunks[channel_dims:]))
        index, _ = unit_of(tuple(index), per_shard)
    try:
        key = source.metadata.encode_chunk_key((0,) * channel_dims + tuple(index))
    except Exception:
        return None
    return os.path.exists(os.path.join(root, getattr(source, "path", ""), key))


def forget(array: Any, halo: Halo, roi: Roi) -> None:
    """Hide the slabs of every chunk `roi` touches (a tombstone each): they are about to be
    rewritten."""
    grid = _Grid.of(array)
    store = halo.store()
    store.index.refresh()
    for index, _ in chunks_in(grid.shape, grid.chunk, grid.box(roi)):
        key = chunk_key(index)
        known = store.newest(key)
        if (known is not None and not known.tombstone) or key in store.stamps:
            store.append(key, tombstone=True)


def keep(array: Any, halo: Halo, roi: Roi, data: np.ndarray) -> None:
    """After `data` was written to `roi`: keep the slabs of every chunk it covers whole."""
    grid = _Grid.of(array)
    box = grid.box(roi)
    for index, chunk in chunks_in(grid.shape, grid.chunk, box):
        if contains(box, chunk):
            save_slabs(array, halo, index, chunk, data, box[0])
