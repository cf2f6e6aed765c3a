"""Arrays named "CONTAINER/DATASET": open inputs, create or check outputs, block I/O.

Reads and writes go straight to the zarr array (no dask graph per block):
funlib.persistence supplies the metadata (offset, voxel size, axes), the
slicing here is the few lines of arithmetic that turn a ROI into slices.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from funlib.geometry import Coordinate, Roi
from funlib.persistence import Array, open_ds, prepare_ds

from voxblock.errors import VoxblockError

CONTAINER_SUFFIXES = (".zarr", ".n5", ".zr")
PROVENANCE_KEY = "voxblock"


@dataclass(frozen=True)
class ArrayName:
    """A dataset inside a container: `volume.zarr/predictions/fg`."""

    container: Path
    dataset: str

    @classmethod
    def parse(cls, name: str | ArrayName) -> ArrayName:
        if isinstance(name, ArrayName):
            return name
        text = str(name).rstrip("/")
        match = re.search(r"^(.*?\.(?:zarr|n5|zr))(?:/(.*))?$", text)
        if match is None or not match.group(2):
            raise VoxblockError(
                f"array name {text!r} must be CONTAINER/DATASET with a container ending in "
                f"{', '.join(CONTAINER_SUFFIXES)}, e.g. volume.zarr/predictions/fg"
            )
        return cls(Path(match.group(1)), match.group(2).strip("/"))

    @property
    def path(self) -> Path:
        return self.container / self.dataset

    def __str__(self) -> str:
        return f"{self.container}/{self.dataset}"


def open_input(name: str | ArrayName, role: str = "input") -> Array:
    """Open an existing array read-only, or say exactly what is missing."""
    array_name = ArrayName.parse(name)
    if not array_name.container.exists():
        raise VoxblockError(f"{role} {array_name}: container {array_name.container} does not exist")
    if not array_name.path.exists():
        present = _datasets_in(array_name.container)
        hint = f"; it holds: {', '.join(present)}" if present else "; it holds no datasets"
        raise VoxblockError(
            f"{role} {array_name}: no dataset {array_name.dataset!r} in {array_name.container}{hint}"
        )
    try:
        return open_ds(str(array_name.path), mode="r")
    except Exception as error:  # zarr raises several types for unreadable metadata
        raise VoxblockError(f"{role} {array_name} cannot be opened: {error}") from error


def open_output(name: str | ArrayName) -> Array:
    """Open an output for writing (in a worker process, once)."""
    return open_ds(str(ArrayName.parse(name).path), mode="r+")


def _datasets_in(container: Path) -> list[str]:
    found = []
    for meta in sorted(container.rglob("zarr.json")) + sorted(container.rglob(".zarray")):
        try:
            node = zarr.open(str(meta.parent), mode="r")
        except Exception:
            continue
        if isinstance(node, zarr.Array):
            found.append(str(meta.parent.relative_to(container)))
    return found[:20]


def spatial_shape(array: Array) -> Coordinate:
    return Coordinate(array.shape[array.channel_dims :])


def spatial_chunk_shape(array: Array) -> Coordinate:
    """The zarr chunk shape of the spatial axes, in voxels (not dask's chunks)."""
    return Coordinate(array._source_data.chunks[array.channel_dims :])


def channel_shape(array: Array) -> tuple[int, ...]:
    return tuple(array.shape[: array.channel_dims])


def _slices(array: Array, roi: Roi) -> tuple[slice, ...]:
    begin = (roi.begin - array.roi.begin) / array.voxel_size
    end = (roi.end - array.roi.begin) / array.voxel_size
    spatial = tuple(slice(b, e) for b, e in zip(begin, end))
    return (slice(None),) * array.channel_dims + spatial


class BlockIOError(OSError):
    """A block could not be read or written: names the array, the ROI and its chunks."""


def _where(array: Array, roi: Roi) -> str:
    source = array._source_data
    path = getattr(source, "store_path", None)
    name = str(path) if path is not None else type(source).__name__
    begin = (roi.begin - array.roi.begin) / array.voxel_size
    end = (roi.end - array.roi.begin) / array.voxel_size
    chunks = source.chunks[array.channel_dims :]
    spans = ", ".join(f"{max(b, 0) // c}-{max(e - 1, 0) // c}" for b, e, c in zip(begin, end, chunks))
    return f"{name} ROI {roi} (chunks {spans})"


def read(array: Array, roi: Roi, fill_value: float = 0) -> np.ndarray:
    """The data in `roi`, filled with `fill_value` where the ROI leaves the array."""
    try:
        return _read(array, roi, fill_value)
    except Exception as error:
        raise BlockIOError(f"cannot read {_where(array, roi)}: {error!r}") from error


def _read(array: Array, roi: Roi, fill_value: float) -> np.ndarray:
    inside = array.roi.intersect(roi)
    if inside == roi:
        return np.asarray(array._source_data[_slices(array, roi)])
    shape = channel_shape(array) + tuple(roi.shape / array.voxel_size)
    data = np.full(shape, fill_value, dtype=array.dtype)
    if not inside.empty:
        begin = (inside.begin - roi.begin) / array.voxel_size
        end = (inside.end - roi.begin) / array.voxel_size
        target = (slice(None),) * array.channel_dims + tuple(slice(b, e) for b, e in zip(begin, end))
        data[target] = array._source_data[_slices(array, inside)]
    return data


def write(array: Array, roi: Roi, data: np.ndarray) -> None:
    """Write `data` (covering `roi`) where it falls inside the array."""
    try:
        _write(array, roi, data)
    except Exception as error:
        raise BlockIOError(f"cannot write {_where(array, roi)}: {error!r}") from error


def _write(array: Array, roi: Roi, data: np.ndarray) -> None:
    inside = array.roi.intersect(roi)
    if inside.empty:
        return
    if inside != roi:
        begin = (inside.begin - roi.begin) / array.voxel_size
        end = (inside.end - roi.begin) / array.voxel_size
        data = data[(slice(None),) * (data.ndim - roi.dims) + tuple(slice(b, e) for b, e in zip(begin, end))]
    array._source_data[_slices(array, inside)] = data


@dataclass(frozen=True)
class OutputSpec:
    """What a worker writes: one array's dtype, channels and region."""

    name: ArrayName
    dtype: np.dtype
    roi: Roi
    voxel_size: Coordinate
    channels: tuple[int, ...] = ()
    axis_names: tuple[str, ...] | None = None
    units: tuple[str, ...] | None = None
    chunk_shape: Coordinate | None = None  # spatial voxels; default: the write block


def check_output(spec: OutputSpec, provenance: Mapping[str, Any], overwrite: bool) -> str:
    """'create', 'resume' or 'overwrite' for an output, or a VoxblockError.

    An existing array is reused only if its geometry and dtype match and it
    was written by the same task (the provenance recorded in its attributes).
    Anything else is data voxblock did not make for this task: refused unless
    `overwrite`.
    """
    path = spec.name.path
    if not path.exists():
        return "create"
    try:
        existing = open_ds(str(path), mode="r")
    except Exception as error:
        raise VoxblockError(
            f"output {spec.name} exists but is not a readable array ({error}); choose another output name"
        ) from error
    problems = []
    if existing.voxel_size != spec.voxel_size:
        problems.append(f"voxel size {tuple(existing.voxel_size)} (the input has {tuple(spec.voxel_size)})")
    if np.dtype(existing.dtype) != np.dtype(spec.dtype):
        problems.append(f"dtype {existing.dtype} (this worker writes {np.dtype(spec.dtype)})")
    if channel_shape(existing) != tuple(spec.channels):
        problems.append(
            f"channel shape {channel_shape(existing)} (this worker writes {tuple(spec.channels)})"
        )
    if not problems and not existing.roi.contains(spec.roi):
        problems.append(f"ROI {existing.roi}, which does not contain the written ROI {spec.roi}")
    if problems:
        raise VoxblockError(
            f"output {spec.name} already exists with a different "
            + " and ".join(problems)
            + "; remove it or choose another output name"
        )
    recorded = dict(existing.attrs).get(PROVENANCE_KEY)
    if recorded is not None and recorded.get("task") == provenance.get("task"):
        return "resume"
    if overwrite:
        return "overwrite"
    who = (
        f"by another voxblock task ({recorded.get('worker')}, {recorded.get('task', '')[:12]})"
        if recorded
        else "by something other than voxblock"
    )
    raise VoxblockError(
        f"output {spec.name} already holds data written {who}; refusing to overwrite it "
        "(pass overwrite=True / --overwrite to replace it)"
    )


def create_output(spec: OutputSpec, provenance: Mapping[str, Any], chunk_shape: Coordinate) -> Array:
    """Create the output array, chunked to `chunk_shape` voxels, and record who made it."""
    spatial = spec.roi.shape / spec.voxel_size
    channel_names = [f"c{i}^" for i in range(len(spec.channels))]
    axis_names = list(spec.axis_names) if spec.axis_names else None
    if axis_names is not None and len(axis_names) == len(spatial):
        axis_names = channel_names + axis_names
    try:
        return _create(spec, provenance, chunk_shape, spatial, axis_names)
    except OSError as error:
        raise VoxblockError(f"output {spec.name} cannot be created: {error}") from error


def _create(
    spec: OutputSpec,
    provenance: Mapping[str, Any],
    chunk_shape: Coordinate,
    spatial: Coordinate,
    axis_names: list[str] | None,
) -> Array:
    array = prepare_ds(
        str(spec.name.path),
        shape=tuple(spec.channels) + tuple(spatial),
        offset=spec.roi.offset,
        voxel_size=spec.voxel_size,
        axis_names=axis_names,
        units=list(spec.units) if spec.units else None,
        types=["channel"] * len(spec.channels) + ["space"] * len(spatial),
        chunk_shape=tuple(spec.channels) + tuple(chunk_shape),
        dtype=spec.dtype,
        mode="a",
    )
    record_provenance(spec.name, provenance)
    return array


def record_provenance(name: ArrayName, provenance: Mapping[str, Any]) -> None:
    node = zarr.open(str(name.path), mode="r+")
    node.attrs[PROVENANCE_KEY] = dict(provenance)
