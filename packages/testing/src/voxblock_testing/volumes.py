"""Synthetic zarr volumes for tests: seeded, any number of spatial axes.

Every writer takes the array name "CONTAINER/DATASET" (e.g.
"/tmp/x/volume.zarr/raw"), the spatial shape in voxels, and optionally
`voxel_size`, `offset` (world units) and `chunk_shape` (spatial voxels),
writes the array with funlib.persistence's `prepare_ds` and returns the
array name, ready to pass to a worker. `read_array(name)` gives the data
back as numpy; `open_array(name)` the funlib `Array`.

The pure-numpy generators (`labels_data`, `blobs_data`,
`affinities_from_labels`, `predictions_data`) are exposed too, for tests
that compute an expected result.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from funlib.geometry import Coordinate
from funlib.persistence import Array, open_ds, prepare_ds
from scipy import ndimage

from voxblock.arrays import ArrayName

__all__ = [
    "affinities",
    "affinities_from_labels",
    "blobs",
    "blobs_data",
    "labels_data",
    "open_array",
    "predictions",
    "predictions_data",
    "random_labels",
    "random_raw",
    "read_array",
    "write_array",
]


def write_array(
    name: str,
    data: np.ndarray,
    *,
    voxel_size: Sequence[int] | None = None,
    offset: Sequence[int] | None = None,
    chunk_shape: Sequence[int] | None = None,
    channel_dims: int = 0,
    attrs: dict | None = None,
) -> str:
    """Write `data` as the array `name` (replacing it); the first `channel_dims` axes are channels.

    `voxel_size` and `offset` (world units) and `chunk_shape` (voxels) are
    given for the spatial axes only; the chunks span all channels.
    """
    data = np.asarray(data)
    spatial = data.shape[channel_dims:]
    ndim = len(spatial)
    if ndim < 1:
        raise ValueError(f"data of shape {data.shape} has no spatial axes after {channel_dims} channel axes")
    voxel_size = Coordinate(voxel_size if voxel_size is not None else (1,) * ndim)
    offset = Coordinate(offset if offset is not None else (0,) * ndim)
    if len(voxel_size) != ndim or len(offset) != ndim:
        raise ValueError(f"voxel_size {voxel_size} and offset {offset} must have {ndim} values")
    if any(o % v for o, v in zip(offset, voxel_size)):
        raise ValueError(f"offset {offset} is not a multiple of the voxel size {voxel_size}")
    chunks = tuple(chunk_shape) if chunk_shape is not None else tuple(min(s, 64) for s in spatial)
    if len(chunks) != ndim:
        raise ValueError(f"chunk_shape {chunks} must have {ndim} values")
    array = prepare_ds(
        str(ArrayName.parse(name).path),
        shape=data.shape,
        offset=offset,
        voxel_size=voxel_size,
        axis_names=[f"c{i}^" for i in range(channel_dims)] + [f"d{i}" for i in range(ndim)],
        types=["channel"] * channel_dims + ["space"] * ndim,
        chunk_shape=tuple(data.shape[:channel_dims]) + chunks,
        dtype=data.dtype,
        mode="w",
    )
    array._source_data[...] = data
    if attrs:
        array._source_data.attrs.update(attrs)
    return str(ArrayName.parse(name))


def open_array(name: str, mode: str = "r") -> Array:
    """The funlib `Array` named "CONTAINER/DATASET"."""
    return open_ds(str(ArrayName.parse(name).path), mode=mode)


def read_array(name: str) -> np.ndarray:
    """All the data of the array named "CONTAINER/DATASET", as numpy."""
    return np.asarray(open_array(name)._source_data[...])


def _full_shape(shape: Sequence[int], channels: int | None) -> tuple[int, ...]:
    return ((channels,) if channels is not None else ()) + tuple(int(s) for s in shape)


# -- raw ------------------------------------------------------------------------------------------


def random_raw(
    name: str,
    shape: Sequence[int],
    *,
    seed: int = 0,
    dtype: str = "float32",
    channels: int | None = None,
    voxel_size: Sequence[int] | None = None,
    offset: Sequence[int] | None = None,
    chunk_shape: Sequence[int] | None = None,
) -> str:
    """Uniform noise in [0, 1) (floats) or over the dtype's range (integers)."""
    rng = np.random.default_rng(seed)
    full = _full_shape(shape, channels)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        data = rng.random(full).astype(dt)
    else:
        info = np.iinfo(dt)
        data = rng.integers(info.min, info.max, size=full, dtype=dt, endpoint=True)
    return write_array(
        name,
        data,
        voxel_size=voxel_size,
        offset=offset,
        chunk_shape=chunk_shape,
        channel_dims=int(channels is not None),
    )


# -- labels ---------------------------------------------------------------------------------------


def labels_data(
    shape: Sequence[int],
    *,
    num_labels: int = 10,
    cell: int | Sequence[int] = 1,
    background: float = 0.0,
    seed: int = 0,
    dtype: str = "uint64",
) -> np.ndarray:
    """Random labels 1..num_labels in cells of `cell` voxels; a `background` fraction of cells is 0."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    cells = (cell,) * len(shape) if isinstance(cell, int) else tuple(cell)
    coarse_shape = tuple(-(-s // c) for s, c in zip(shape, cells))
    coarse = rng.integers(1, num_labels + 1, size=coarse_shape).astype(dtype)
    if background > 0:
        coarse[rng.random(coarse_shape) < background] = 0
    for axis, c in enumerate(cells):
        coarse = np.repeat(coarse, c, axis=axis)
    return np.ascontiguousarray(coarse[tuple(slice(0, s) for s in shape)])


def random_labels(
    name: str,
    shape: Sequence[int],
    *,
    num_labels: int = 10,
    cell: int | Sequence[int] = 1,
    background: float = 0.0,
    seed: int = 0,
    dtype: str = "uint64",
    channels: int | None = None,
    voxel_size: Sequence[int] | None = None,
    offset: Sequence[int] | None = None,
    chunk_shape: Sequence[int] | None = None,
) -> str:
    """A label volume: see `labels_data`. With `channels`, one independent label image per channel."""
    if channels is None:
        data = labels_data(
            shape, num_labels=num_labels, cell=cell, background=background, seed=seed, dtype=dtype
        )
    else:
        data = np.stack(
            [
                labels_data(
                    shape, num_labels=num_labels, cell=cell, background=background, seed=seed + c, dtype=dtype
                )
                for c in range(channels)
            ]
        )
    return write_array(
        name,
        data,
        voxel_size=voxel_size,
        offset=offset,
        chunk_shape=chunk_shape,
        channel_dims=int(channels is not None),
    )


# -- blobs ----------------------------------------------------------------------------------------


def blobs_data(
    shape: Sequence[int],
    *,
    sigma: float = 2.0,
    fraction: float = 0.5,
    binary: bool = True,
    seed: int = 0,
) -> np.ndarray:
    """Smooth random blobs: gaussian-filtered noise.

    `binary`: uint8, 1 where the smoothed noise is above its (1 - fraction)
    quantile (so about `fraction` of the voxels are foreground). Otherwise
    float32 in [0, 1], the smoothed noise rescaled.
    """
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(tuple(int(s) for s in shape))
    smooth = ndimage.gaussian_filter(noise, sigma=sigma, mode="reflect")
    if binary:
        threshold = np.quantile(smooth, 1.0 - fraction)
        return (smooth > threshold).astype(np.uint8)
    low, high = smooth.min(), smooth.max()
    return ((smooth - low) / (high - low if high > low else 1.0)).astype(np.float32)


def blobs(
    name: str,
    shape: Sequence[int],
    *,
    sigma: float = 2.0,
    fraction: float = 0.5,
    binary: bool = True,
    seed: int = 0,
    channels: int | None = None,
    voxel_size: Sequence[int] | None = None,
    offset: Sequence[int] | None = None,
    chunk_shape: Sequence[int] | None = None,
) -> str:
    """A blob volume: see `blobs_data`. With `channels`, independent blobs per channel."""
    if channels is None:
        data = blobs_data(shape, sigma=sigma, fraction=fraction, binary=binary, seed=seed)
    else:
        data = np.stack(
            [
                blobs_data(shape, sigma=sigma, fraction=fraction, binary=binary, seed=seed + c)
                for c in range(channels)
            ]
        )
    return write_array(
        name,
        data,
        voxel_size=voxel_size,
        offset=offset,
        chunk_shape=chunk_shape,
        channel_dims=int(channels is not None),
    )


# -- affinities -----------------------------------------------------------------------------------


def affinities_from_labels(labels: np.ndarray, offsets: Sequence[Sequence[int]]) -> np.ndarray:
    """Channels-first float32 affinities: channel i at voxel x is 1 iff x and
    x + offsets[i] (in voxels) both lie in the volume and carry the same
    nonzero label; 0 otherwise."""
    labels = np.asarray(labels)
    result = np.zeros((len(offsets), *labels.shape), dtype=np.float32)
    for channel, offset in enumerate(offsets):
        offset = tuple(int(o) for o in offset)
        if len(offset) != labels.ndim:
            raise ValueError(f"offset {offset} has {len(offset)} values; labels have {labels.ndim} axes")
        if any(abs(o) >= s for o, s in zip(offset, labels.shape)):
            continue
        here = tuple(slice(max(0, -o), s - max(0, o)) for o, s in zip(offset, labels.shape))
        there = tuple(slice(max(0, o), s - max(0, -o)) for o, s in zip(offset, labels.shape))
        a, b = labels[here], labels[there]
        result[(channel, *here)] = ((a == b) & (a != 0)).astype(np.float32)
    return result


def affinities(
    name: str,
    labels: str,
    offsets: Sequence[Sequence[int]],
    *,
    chunk_shape: Sequence[int] | None = None,
) -> str:
    """Write the affinities of the label array `labels` (same voxel size and offset)."""
    source = open_array(labels)
    if source.channel_dims:
        raise ValueError(f"labels {labels} have channel axes; affinities need a single label image")
    data = affinities_from_labels(np.asarray(source._source_data[...]), offsets)
    return write_array(
        name,
        data,
        voxel_size=source.voxel_size,
        offset=source.roi.offset,
        chunk_shape=chunk_shape,
        channel_dims=1,
    )


# -- predictions ----------------------------------------------------------------------------------


def predictions_data(
    shape: Sequence[int],
    *,
    channels: int = 3,
    sigma: float = 1.5,
    temperature: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """Channels-first float32 predictions: a softmax over `channels` smooth random fields,
    so every voxel's channels are positive and sum to 1."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    logits = np.stack(
        [ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma) for _ in range(channels)]
    )
    logits = logits / (logits.std() + 1e-12) / temperature
    logits -= logits.max(axis=0, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=0, keepdims=True)).astype(np.float32)


def predictions(
    name: str,
    shape: Sequence[int],
    *,
    channels: int = 3,
    sigma: float = 1.5,
    temperature: float = 0.5,
    seed: int = 0,
    voxel_size: Sequence[int] | None = None,
    offset: Sequence[int] | None = None,
    chunk_shape: Sequence[int] | None = None,
) -> str:
    """A multi-channel prediction volume: see `predictions_data`."""
    data = predictions_data(shape, channels=channels, sigma=sigma, temperature=temperature, seed=seed)
    return write_array(
        name, data, voxel_size=voxel_size, offset=offset, chunk_shape=chunk_shape, channel_dims=1
    )
