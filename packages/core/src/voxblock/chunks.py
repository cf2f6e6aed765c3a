"""Chunks encoded and decoded in the calling thread: zarr's own codecs, without its event loop.

zarr 3 sends every read and write through an asyncio loop in another
thread and compares each written chunk with the fill value; a 64^3 uint64
chunk whose zstd encoding takes 0.6 ms costs about 4 ms to write that way,
and a float32 chunk that decodes in 0.9 ms costs 1.6 ms to read. Blocks are
chunk-aligned, so for arrays on a local file system voxblock runs the
array's codecs itself (their synchronous methods, the ones zarr's pipeline
calls) and reads and writes the chunk files directly: a write goes to a
temporary file that is then renamed over the chunk, so a killed worker
never leaves half a chunk. The bytes on disk are exactly zarr's.

Anything else (zarr v2, sharding, array-to-array codecs, remote stores,
codecs without a synchronous form) is read and written through zarr.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from voxblock.files import replace_atomically

# -- chunk grid geometry (pure; boxes are (begin, end) voxel tuples from the array's first voxel) --

Box = tuple[tuple[int, ...], tuple[int, ...]]


def chunks_in(
    shape: tuple[int, ...], chunk: tuple[int, ...], box: Box
) -> Iterator[tuple[tuple[int, ...], Box]]:
    """(grid index, chunk box clipped to the array) of every chunk that `box` touches."""
    begin = tuple(max(b, 0) for b in box[0])
    end = tuple(min(e, s) for e, s in zip(box[1], shape))
    if any(b >= e for b, e in zip(begin, end)):
        return
    ranges = [range(b // c, (e - 1) // c + 1) for b, e, c in zip(begin, end, chunk)]
    for index in itertools.product(*ranges):
        low = tuple(i * c for i, c in zip(index, chunk))
        high = tuple(min(lo + c, s) for lo, c, s in zip(low, chunk, shape))
        yield index, (low, high)


def intersect(a: Box, b: Box) -> Box:
    return tuple(map(max, a[0], b[0])), tuple(map(min, a[1], b[1]))


def box_slices(box: Box, origin: tuple[int, ...]) -> tuple[slice, ...]:
    """`box` as slices of an array whose first voxel is at `origin`."""
    return tuple(slice(b - o, e - o) for b, e, o in zip(*box, origin))


class DirectChunks:
    """`array[slices]` and `array[slices] = data` for one local zarr v3 array, chunk by chunk."""

    def __init__(self, source: Any) -> None:
        from zarr.core.buffer import default_buffer_prototype

        metadata = source.metadata
        self.shape: tuple[int, ...] = tuple(source.shape)
        self.chunks: tuple[int, ...] = tuple(source.chunks)
        self.dtype = np.dtype(source.dtype)
        self._prototype = default_buffer_prototype()
        config = source._async_array.config
        self._spec = metadata.get_chunk_spec((0,) * len(self.shape), config, self._prototype)
        self._write_empty = bool(config.write_empty_chunks)
        self.fill_value = np.asarray(self._spec.fill_value, dtype=self.dtype)
        self._codecs: list[tuple[Any, Any]] = []
        spec = self._spec
        for codec in metadata.codecs:
            self._codecs.append((codec, spec))
            spec = codec.resolve_metadata(spec)
        self._encode_key = metadata.encode_chunk_key
        store_path = source.store_path
        self._root = (
            Path(store_path.store.root) / store_path.path if store_path.path else Path(store_path.store.root)
        )
        self._made: set[str] = set()

    @classmethod
    def of(cls, source: Any) -> DirectChunks | None:
        """DirectChunks for `source`, or None where zarr must do the work itself."""
        try:
            import zarr
            from zarr.codecs import BytesCodec
            from zarr.core.chunk_grids import RegularChunkGrid
            from zarr.storage import LocalStore

            if not isinstance(source, zarr.Array) or source.metadata.zarr_format != 3:
                return None
            if not isinstance(source.store_path.store, LocalStore):
                return None
            if not isinstance(source.metadata.chunk_grid, RegularChunkGrid):
                return None
            codecs = source.metadata.codecs
            if not codecs or not isinstance(codecs[0], BytesCodec):
                return None  # sharding, transposes and the like: zarr's pipeline
            if not all(hasattr(c, "_encode_sync") and hasattr(c, "_decode_sync") for c in codecs):
                return None
            if np.dtype(source.dtype).kind not in "biuf":
                return None
            direct = cls(source)
            if direct._spec.config.order != "C":
                return None
            return direct
        except Exception:  # anything unexpected in zarr's internals: zarr does the work
            return None

    # -- one chunk ------------------------------------------------------------------------------

    def path(self, index: tuple[int, ...]) -> Path:
        return self._root / self._encode_key(index)

    def read_chunk(self, index: tuple[int, ...]) -> np.ndarray | None:
        """The decoded chunk (full chunk shape, maybe read-only), or None if it was never written."""
        try:
            with open(self.path(index), "rb") as file:
                raw = file.read()
        except FileNotFoundError:
            return None
        data: Any = self._prototype.buffer.from_bytes(raw)
        for codec, spec in reversed(self._codecs):
            data = codec._decode_sync(data, spec)
        return np.asarray(data.as_ndarray_like()).reshape(self.chunks)

    def write_chunk(self, index: tuple[int, ...], chunk: np.ndarray) -> None:
        """Replace one chunk (full chunk shape) atomically; drop it if it holds only the fill value."""
        path = self.path(index)
        if not self._write_empty and self._all_fill(chunk):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        data: Any = self._prototype.nd_buffer.from_ndarray_like(np.ascontiguousarray(chunk, dtype=self.dtype))
        for codec, spec in self._codecs:
            data = codec._encode_sync(data, spec)
        folder = str(path.parent)
        if folder not in self._made:
            os.makedirs(folder, exist_ok=True)
            self._made.add(folder)
        replace_atomically(path, lambda file: file.write(data.as_buffer_like()))

    def _all_fill(self, chunk: np.ndarray) -> bool:
        fill = self.fill_value
        if fill.dtype.kind == "f" and np.isnan(fill):
            return bool(np.isnan(chunk).all())
        if not fill:
            return not chunk.any()
        return bool((chunk == fill).all())

    # -- boxes ----------------------------------------------------------------------------------

    def _box(self, key: Any) -> Box:
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) != len(self.shape) or not all(isinstance(k, slice) and k.step in (None, 1) for k in key):
            raise IndexError(f"direct chunk access takes one unit-step slice per axis; got {key!r}")
        begin, end = [], []
        for k, size in zip(key, self.shape):
            start, stop, _ = k.indices(size)
            begin.append(start)
            end.append(max(start, stop))
        return tuple(begin), tuple(end)

    def __getitem__(self, key: Any) -> np.ndarray:
        box = self._box(key)
        out = np.empty(tuple(e - b for b, e in zip(*box)), dtype=self.dtype)
        if out.size == 0:
            return out
        for index, chunk in chunks_in(self.shape, self.chunks, box):
            piece = intersect(chunk, box)
            decoded = self.read_chunk(index)
            target = box_slices(piece, box[0])
            out[target] = self.fill_value if decoded is None else decoded[box_slices(piece, chunk[0])]
        return out

    def __setitem__(self, key: Any, value: Any) -> None:
        box = self._box(key)
        shape = tuple(e - b for b, e in zip(*box))
        value = np.broadcast_to(np.asarray(value), shape)
        if 0 in shape:
            return
        for index, chunk in chunks_in(self.shape, self.chunks, box):
            piece = intersect(chunk, box)
            part = value[box_slices(piece, box[0])]
            if piece == chunk and part.shape == self.chunks:
                self.write_chunk(index, part)
                continue
            if piece == chunk:  # a chunk past the array's end: the rest is fill, as zarr makes it
                whole = np.full(self.chunks, self.fill_value)
            else:  # part of a chunk: the rest is what is stored
                current = self.read_chunk(index)
                whole = np.full(self.chunks, self.fill_value) if current is None else np.array(current)
            whole[box_slices(piece, chunk[0])] = part
            self.write_chunk(index, whole)
