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

Only zarr releases it was tested against take this path (`TESTED_ZARR`).
A sharded array's files are shards: voxblock reads the inner chunks it
needs from them and writes whole shards, in zarr's own layout (inner chunks
in zarr's order, then the checksummed index). Anything else (zarr v2,
array-to-array codecs, remote stores, codecs without a synchronous form) is
read and written through zarr.
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


def unit_of(index: tuple[int, ...], per_unit: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(write unit, place within it) of chunk `index`, where a unit (shard) holds `per_unit` chunks."""
    return tuple(i // p for i, p in zip(index, per_unit)), tuple(i % p for i, p in zip(index, per_unit))


def intersect(a: Box, b: Box) -> Box:
    return tuple(map(max, a[0], b[0])), tuple(map(min, a[1], b[1]))


def box_slices(box: Box, origin: tuple[int, ...]) -> tuple[slice, ...]:
    """`box` as slices of an array whose first voxel is at `origin`."""
    return tuple(slice(b - o, e - o) for b, e, o in zip(*box, origin))


# zarr releases (major.minor) whose private pieces direct I/O uses (codecs' _encode_sync and
# _decode_sync, the sharding codec's index helpers, the array's chunk spec) were tested against
# zarr itself, byte for byte (tests/test_chunks.py); any other release goes through zarr
TESTED_ZARR = ("3.1",)


def tested_zarr(version: str) -> bool:
    return ".".join(version.split(".")[:2]) in TESTED_ZARR


class _Pipeline:
    """One chain of zarr codecs run synchronously: array to bytes and back."""

    def __init__(self, codecs: Any, spec: Any) -> None:
        self.spec = spec
        self.steps: list[tuple[Any, Any]] = []
        for codec in codecs:
            self.steps.append((codec, spec))
            spec = codec.resolve_metadata(spec)

    def encode(self, data: Any) -> Any:
        for codec, spec in self.steps:
            data = codec._encode_sync(data, spec)
        return data

    def decode(self, data: Any) -> Any:
        for codec, spec in reversed(self.steps):
            data = codec._decode_sync(data, spec)
        return data

    @staticmethod
    def usable(codecs: Any) -> bool:
        from zarr.codecs import BytesCodec

        return (
            bool(codecs)
            and isinstance(codecs[0], BytesCodec)
            and all(hasattr(c, "_encode_sync") and hasattr(c, "_decode_sync") for c in codecs)
        )


class _ShardFormat:
    """The sharding codec's file layout: inner chunks one after another, then (or first) an
    index of (offset, length) per inner chunk, 2^64-1 where a chunk is not stored."""

    EMPTY = np.uint64(2**64 - 1)

    def __init__(self, codec: Any, shard_shape: tuple[int, ...], prototype: Any) -> None:
        from zarr.codecs.sharding import ShardingCodecIndexLocation
        from zarr.core.indexing import morton_order_iter

        self.per_shard = tuple(s // c for s, c in zip(shard_shape, codec.chunk_shape))
        self.order = list(morton_order_iter(self.per_shard))  # zarr's order of chunks in a shard
        self.index = _Pipeline(codec.index_codecs, codec._get_index_chunk_spec(self.per_shard))
        self.index_size = codec._shard_index_size(self.per_shard)
        self.index_first = codec.index_location == ShardingCodecIndexLocation.start
        self._prototype = prototype

    def _table(self, index: bytes) -> np.ndarray:
        table = self.index.decode(self._prototype.buffer.from_bytes(index))
        return np.asarray(table.as_ndarray_like()).reshape((*self.per_shard, 2))

    def read(self, file: Any, wanted: list[tuple[int, ...]] | None) -> dict[tuple[int, ...], bytes]:
        """The stored inner chunks among `wanted` (None: all) of an open shard file, by their
        index within the shard: the index first, then only the chunks asked for."""
        if wanted is None:  # the whole shard: one read
            raw = memoryview(file.read())
            where = raw[: self.index_size] if self.index_first else raw[len(raw) - self.index_size :]
            table = self._table(bytes(where))
            return {
                inner: raw[int(table[inner][0]) : int(table[inner][0] + table[inner][1])]
                for inner in self.order
                if table[inner][0] != self.EMPTY
            }
        file.seek(
            0 if self.index_first else -self.index_size, os.SEEK_SET if self.index_first else os.SEEK_END
        )
        table = self._table(file.read(self.index_size))
        stored = {}
        for inner in wanted:
            offset, length = table[inner]
            if offset != self.EMPTY:
                file.seek(int(offset))
                stored[inner] = file.read(int(length))
        return stored

    def join(self, chunks: dict[tuple[int, ...], Any]) -> bytes | None:
        """One shard file from encoded inner chunks (None: no chunk stored, no file)."""
        if not chunks:
            return None
        table = np.full((*self.per_shard, 2), self.EMPTY, dtype=np.uint64)
        parts, at = [], self.index_size if self.index_first else 0
        for inner in self.order:
            data = chunks.get(inner)
            if data is None:
                continue
            parts.append(data)
            table[inner] = (at, len(data))
            at += len(data)
        index = self.index.encode(self._prototype.nd_buffer.from_ndarray_like(table))
        index = bytes(index.as_buffer_like())
        return b"".join([index, *parts] if self.index_first else [*parts, index])


class DirectChunks:
    """`array[slices]` and `array[slices] = data` for one local zarr v3 array, chunk by chunk.

    A sharded array is read by inner chunk (the shard's index, then only
    the chunks a read needs), and written by whole shards (a block owns its
    shards): every inner chunk encoded here, the shard file replaced
    atomically.
    """

    def __init__(self, source: Any) -> None:
        from zarr.codecs import ShardingCodec
        from zarr.core.buffer import default_buffer_prototype

        metadata = source.metadata
        self.shape: tuple[int, ...] = tuple(source.shape)
        self.dtype = np.dtype(source.dtype)
        self._prototype = default_buffer_prototype()
        config = source._async_array.config
        unit_spec = metadata.get_chunk_spec((0,) * len(self.shape), config, self._prototype)
        # the write unit: a shard file, or a chunk file
        self.unit: tuple[int, ...] = tuple(unit_spec.shape)
        sharding = metadata.codecs[0] if isinstance(metadata.codecs[0], ShardingCodec) else None
        if sharding is not None:
            self._spec = sharding._get_chunk_spec(unit_spec)
            self._inner = _Pipeline(sharding.codecs, self._spec)
            self._shards: _ShardFormat | None = _ShardFormat(sharding, self.unit, self._prototype)
        else:
            self._spec = unit_spec
            self._inner = _Pipeline(metadata.codecs, self._spec)
            self._shards = None
        self.chunks: tuple[int, ...] = tuple(self._spec.shape)
        self._write_empty = bool(config.write_empty_chunks)
        self.fill_value = np.asarray(self._spec.fill_value, dtype=self.dtype)
        self._encode_key = metadata.encode_chunk_key
        store_path = source.store_path
        self._root = (
            Path(store_path.store.root) / store_path.path if store_path.path else Path(store_path.store.root)
        )
        self._made: set[str] = set()
        self._source = source

    def __reduce__(self) -> tuple[Any, ...]:
        # made again where unpickled: what it keeps (directories made) is this process's
        return (type(self), (self._source,))

    @classmethod
    def of(cls, source: Any) -> DirectChunks | None:
        """DirectChunks for `source`, or None where zarr must do the work itself."""
        try:
            import zarr
            from zarr.codecs import ShardingCodec
            from zarr.core.chunk_grids import RegularChunkGrid
            from zarr.storage import LocalStore

            if not tested_zarr(zarr.__version__):
                return None  # private codec methods may differ: zarr's public path, same bytes
            if not isinstance(source, zarr.Array) or source.metadata.zarr_format != 3:
                return None
            if not isinstance(source.store_path.store, LocalStore):
                return None
            if not isinstance(source.metadata.chunk_grid, RegularChunkGrid):
                return None
            codecs = source.metadata.codecs
            if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
                if not (_Pipeline.usable(codecs[0].codecs) and _Pipeline.usable(codecs[0].index_codecs)):
                    return None
            elif not _Pipeline.usable(codecs):
                return None  # transposes and the like: zarr's pipeline
            if np.dtype(source.dtype).kind not in "biuf":
                return None
            direct = cls(source)
            if direct._spec.config.order != "C":
                return None
            return direct
        except Exception:  # anything unexpected in zarr's internals: zarr does the work
            return None

    # -- one chunk, one write unit --------------------------------------------------------------

    def path(self, index: tuple[int, ...]) -> Path:
        """The file of write unit `index` (a shard, or a chunk)."""
        return self._root / self._encode_key(index)

    def _decode(self, raw: Any) -> np.ndarray:
        data = self._inner.decode(self._prototype.buffer.from_bytes(raw))
        return np.asarray(data.as_ndarray_like()).reshape(self.chunks)

    def _encode(self, chunk: np.ndarray) -> Any:
        """The chunk's bytes, or None where it holds only the fill value and is not stored."""
        if not self._write_empty and self._all_fill(chunk):
            return None
        data = self._prototype.nd_buffer.from_ndarray_like(np.ascontiguousarray(chunk, dtype=self.dtype))
        return self._inner.encode(data).as_buffer_like()

    def _stored_chunks(
        self, unit: tuple[int, ...], wanted: list[tuple[int, ...]] | None = None
    ) -> dict[tuple[int, ...], Any]:
        """The stored chunks of one write unit among `wanted` (None: all), by their index in it."""
        try:
            with open(self.path(unit), "rb") as file:
                if self._shards is None:
                    return {(0,) * len(unit): file.read()}
                return self._shards.read(file, wanted)
        except FileNotFoundError:
            return {}

    def read_unit(self, index: tuple[int, ...]) -> np.ndarray | None:
        """The decoded write unit (full shape), or None if none of it was ever written."""
        stored = self._stored_chunks(index)
        if not stored:
            return None
        if self._shards is None:
            return self._decode(next(iter(stored.values())))
        whole = np.full(self.unit, self.fill_value, dtype=self.dtype)
        for inner, raw in stored.items():
            low = tuple(i * c for i, c in zip(inner, self.chunks))
            whole[tuple(slice(lo, lo + c) for lo, c in zip(low, self.chunks))] = self._decode(raw)
        return whole

    def write_unit(self, index: tuple[int, ...], data: np.ndarray) -> None:
        """Replace one write unit (full shape) atomically; drop its file if nothing in it is stored."""
        path = self.path(index)
        if self._shards is None:
            encoded = self._encode(data)
        else:
            chunks = {}
            origin = tuple(i * u for i, u in zip(index, self.unit))
            for inner in self._shards.order:
                low = tuple(i * c for i, c in zip(inner, self.chunks))
                if any(o + lo >= s for o, lo, s in zip(origin, low, self.shape)):
                    continue  # wholly past the array's end: zarr stores no such chunk
                piece = self._encode(data[tuple(slice(lo, lo + c) for lo, c in zip(low, self.chunks))])
                if piece is not None:
                    chunks[inner] = piece
            encoded = self._shards.join(chunks)
        if encoded is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        folder = str(path.parent)
        if folder not in self._made:
            os.makedirs(folder, exist_ok=True)
            self._made.add(folder)
        replace_atomically(path, lambda file: file.write(encoded))

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
        per_unit = tuple(u // c for u, c in zip(self.unit, self.chunks))
        by_unit: dict[tuple[int, ...], list[tuple[tuple[int, ...], Box]]] = {}
        for index, chunk in chunks_in(self.shape, self.chunks, box):
            unit, inner = unit_of(index, per_unit)
            by_unit.setdefault(unit, []).append((inner, chunk))
        for unit, chunks in by_unit.items():  # each file opened once
            stored = self._stored_chunks(unit, [inner for inner, _ in chunks])
            for inner, chunk in chunks:
                raw = stored.get(inner)
                piece = intersect(chunk, box)
                target = box_slices(piece, box[0])
                out[target] = (
                    self.fill_value if raw is None else self._decode(raw)[box_slices(piece, chunk[0])]
                )
        return out

    def __setitem__(self, key: Any, value: Any) -> None:
        box = self._box(key)
        shape = tuple(e - b for b, e in zip(*box))
        value = np.broadcast_to(np.asarray(value), shape)
        if 0 in shape:
            return
        for index, unit in chunks_in(self.shape, self.unit, box):
            piece = intersect(unit, box)
            part = value[box_slices(piece, box[0])]
            if piece == unit and part.shape == self.unit:
                self.write_unit(index, part)
                continue
            if piece == unit:  # a unit past the array's end: the rest is fill, as zarr makes it
                whole = np.full(self.unit, self.fill_value)
            else:  # part of a unit: the rest is what is stored
                current = self.read_unit(index)
                whole = np.full(self.unit, self.fill_value) if current is None else np.array(current)
            whole[box_slices(piece, unit[0])] = part
            self.write_unit(index, whole)


def chunk_io(array: Any) -> Any:
    """What block reads and writes of `array` (a voxblock ZarrArray or a funlib Array) index:
    direct chunk I/O (`DirectChunks`) where it applies, else the zarr array itself.

    Made once per array and process and kept on the array (`_chunk_io`; a ZarrArray drops it
    when pickled, a DirectChunks is made again where unpickled).
    """
    cached = getattr(array, "_chunk_io", None)
    if cached is not None:
        return cached
    source = array._source_data
    cached = DirectChunks.of(source) or source
    try:
        array._chunk_io = cached
    except (AttributeError, TypeError):  # funlib's arrays are frozen against new attributes
        with contextlib.suppress(AttributeError, TypeError):
            object.__setattr__(array, "_chunk_io", cached)
    return cached
