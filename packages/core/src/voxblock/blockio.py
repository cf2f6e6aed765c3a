"""Block I/O: read a block's ROI (filled where it leaves the array), write one (clipped to it).

Reads and writes go straight to the array's chunks (voxblock.chunks) or to zarr: no dask
graph per block. An array may carry its own way of reading and writing blocks (`block_io`,
a `BlockIO`): a worker process's job gives the arrays it keeps a voxblock.halo.Halo for that
halo, so their context comes from thin face slabs instead of whole neighbouring chunks.
Everything else is read and written directly, at no cost per block beyond one attribute lookup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from voxblock.chunks import chunk_io
from voxblock.geometry import roi_slices

if TYPE_CHECKING:
    from funlib.geometry import Roi


class BlockIO(Protocol):
    """A way to read and write an array's blocks (a read strategy): voxblock.halo.Halo is one."""

    def read(self, array: Any, roi: Roi, fill_value: float) -> np.ndarray: ...

    def write(self, array: Any, roi: Roi, data: np.ndarray) -> None: ...


class BlockIOError(OSError):
    """A block could not be read or written: names the array, the ROI and its chunks."""


def read(array: Any, roi: Roi, fill_value: float = 0) -> np.ndarray:
    """The data in `roi`, filled with `fill_value` where the ROI leaves the array."""
    try:
        strategy = getattr(array, "block_io", None)
        if strategy is not None:
            return strategy.read(array, roi, fill_value)
        return read_direct(array, roi, fill_value)
    except Exception as error:
        raise BlockIOError(f"cannot read {_where(array, roi)}: {error!r}") from error


def write(array: Any, roi: Roi, data: np.ndarray) -> None:
    """Write `data` (covering `roi`) where it falls inside the array."""
    try:
        strategy = getattr(array, "block_io", None)
        if strategy is not None:
            strategy.write(array, roi, data)
            return
        write_direct(array, roi, data)
    except Exception as error:
        raise BlockIOError(f"cannot write {_where(array, roi)}: {error!r}") from error


def read_direct(array: Any, roi: Roi, fill_value: float = 0) -> np.ndarray:
    """`read` straight from the array's chunks (or zarr), whatever its `block_io`."""
    inside = array.roi.intersect(roi)
    if inside == roi:
        return np.asarray(chunk_io(array)[_slices(array, roi)])
    shape = tuple(array.shape[: array.channel_dims]) + tuple(roi.shape / array.voxel_size)
    data = np.full(shape, fill_value, dtype=array.dtype)
    if not inside.empty:
        target = (slice(None),) * array.channel_dims + roi_slices(inside, roi.begin, array.voxel_size)
        data[target] = chunk_io(array)[_slices(array, inside)]
    return data


def write_direct(array: Any, roi: Roi, data: np.ndarray) -> None:
    """`write` straight to the array's chunks (or zarr), whatever its `block_io`."""
    inside = array.roi.intersect(roi)
    if inside.empty:
        return
    if inside != roi:
        data = data[(slice(None),) * (data.ndim - roi.dims) + roi_slices(inside, roi.begin, array.voxel_size)]
    chunk_io(array)[_slices(array, inside)] = data


def _slices(array: Any, roi: Roi) -> tuple[slice, ...]:
    return (slice(None),) * array.channel_dims + roi_slices(roi, array.roi.begin, array.voxel_size)


def _where(array: Any, roi: Roi) -> str:
    source = array._source_data
    path = getattr(source, "store_path", None)
    name = str(path) if path is not None else type(source).__name__
    begin = (roi.begin - array.roi.begin) / array.voxel_size
    end = (roi.end - array.roi.begin) / array.voxel_size
    chunks = source.chunks[array.channel_dims :]
    spans = ", ".join(f"{max(b, 0) // c}-{max(e - 1, 0) // c}" for b, e, c in zip(begin, end, chunks))
    return f"{name} ROI {roi} (chunks {spans})"
