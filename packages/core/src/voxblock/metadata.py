"""Opening arrays: the zarr array plus the metadata funlib.persistence writes, without dask.

Arrays are opened as `ZarrArray`: the zarr array plus the metadata that
funlib.persistence writes (offset, voxel size, axes), parsed here the way
funlib.persistence parses it, so that a worker process never imports
funlib.persistence (and with it dask, xarray and pandas: most of a worker's
start-up time). funlib.persistence is imported only when its metadata keys are
configured to differ from its defaults. OME-NGFF and N5 metadata: voxblock.formats.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from funlib.geometry import Coordinate, Roi

from voxblock.chunks import chunk_io
from voxblock.errors import VoxblockError
from voxblock.names import ArrayName

if TYPE_CHECKING:
    from typing import TypeAlias

    import funlib.persistence

    from voxblock.blockio import BlockIO


_PHYSICAL = ("space", "time")


class ZarrArray:
    """A zarr array with the metadata funlib.persistence reads: world-unit indexing.

    Offers the part of funlib.persistence's `Array` that voxblock, its
    workers and segment functions use (`roi`, `voxel_size`, `to_ndarray`,
    `array[roi]`, ...) without dask: reads and writes go straight to zarr.
    Any other attribute of funlib's `Array` (`data`, `to_pixel_space`, ...)
    is answered by a funlib `Array` over the same zarr array, made (and
    funlib.persistence imported) the first time one is asked for.
    """

    # the units of the input's world (an OME-NGFF input's axes'): outputs' OME-NGFF metadata uses them
    ome_units: tuple[str, ...] | None = None
    # how blocks are read and written (voxblock.blockio): None, straight from the chunks; a
    # voxblock.halo.Halo given by the job of a worker process that keeps one for this array
    block_io: BlockIO | None = None
    # where it was opened (resolved), by open_array
    _path: str | None = None

    def __init__(
        self,
        data: Any,
        offset: Sequence[int] | None = None,
        voxel_size: Sequence[int] | None = None,
        axis_names: Sequence[str] | None = None,
        units: Sequence[str] | None = None,
        types: Sequence[str] | None = None,
    ):
        shape = tuple(data.shape)
        if types is not None:
            offset, voxel_size, units = _strip_channels(types, [offset, voxel_size, units])
        offset = Coordinate(offset) if offset is not None else None
        voxel_size = Coordinate(voxel_size) if voxel_size is not None else None
        _validate(offset, voxel_size, axis_names, units, types)
        physical = _physical_dims(len(shape), offset, voxel_size, axis_names, units, types)
        channels = len(shape) - physical
        if types is None:
            if axis_names is not None:
                types = ["channel" if name.endswith("^") else "space" for name in axis_names]
            else:
                types = ["channel"] * channels + ["space"] * physical
        if axis_names is None:
            channel_index = iter(range(channels))
            spatial_index = iter(range(physical))
            axis_names = [
                f"d{next(spatial_index)}" if t in _PHYSICAL else f"c{next(channel_index)}^" for t in types
            ]
        self._source_data = data
        self._chunk_io: Any = None  # see chunk_io()
        self._offset = offset if offset is not None else Coordinate((0,) * physical)
        self._voxel_size = voxel_size if voxel_size is not None else Coordinate((1,) * physical)
        self._axis_names = list(axis_names)
        self._units = list(units) if units is not None else [""] * physical
        self._types = list(types)
        self._physical = [t in _PHYSICAL for t in self._types]
        if len(self._axis_names) != len(shape):
            raise AssertionError(
                f"Axis names must be provided for every dimension. Got ({self._axis_names}) "
                f"but expected {len(shape)} to match the data shape: {shape}"
            )
        physical_shape = Coordinate(s for s, p in zip(shape, self._physical) if p)
        self._roi = Roi(self._offset, self._voxel_size * physical_shape)

    def __getstate__(self) -> dict[str, Any]:
        # direct chunk I/O is per process: made again where the array is unpickled
        return {**self.__dict__, "_chunk_io": None}

    @property
    def roi(self) -> Roi:
        return self._roi

    @property
    def offset(self) -> Coordinate:
        return self._offset

    @property
    def voxel_size(self) -> Coordinate:
        return self._voxel_size

    @property
    def axis_names(self) -> list[str]:
        return list(self._axis_names)

    @property
    def units(self) -> list[str]:
        return list(self._units)

    @property
    def types(self) -> list[str]:
        return list(self._types)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._source_data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self._source_data.dtype

    @property
    def dims(self) -> int:
        return len(self._source_data.shape)

    @property
    def spatial_dims(self) -> int:
        return self._voxel_size.dims

    @property
    def channel_dims(self) -> int:
        return self.dims - self.spatial_dims

    @property
    def physical_shape(self) -> tuple[int, ...]:
        return tuple(s for s, p in zip(self._source_data.shape, self._physical) if p)

    @property
    def chunk_shape(self) -> Coordinate:
        return Coordinate(self._source_data.chunks)

    @property
    def attrs(self) -> Any:
        return self._source_data.attrs

    def _slices(self, roi: Roi) -> tuple[Any, ...]:
        voxels = (roi - self._offset) / self._voxel_size
        spatial = iter(voxels.to_slices())
        return tuple(next(spatial) if p else slice(None) for p in self._physical)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, Roi):
            if not self._roi.contains(key):
                raise IndexError(f"Requested roi {key} is not contained in this array {self._roi}.")
            return np.asarray(chunk_io(self)[self._slices(key)])
        if isinstance(key, Coordinate):
            if not self._roi.contains(key):
                raise IndexError("Requested coordinate is not contained in this array.")
            index = tuple((key - self._offset) / self._voxel_size)
            if self.channel_dims > 0:
                index = (Ellipsis, *index)
            return np.asarray(self._source_data[index])
        return np.asarray(self._source_data[key])

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, Roi):
            if not self._roi.contains(key):
                raise IndexError(f"Requested roi {key} is not contained in this array {self._roi}.")
            chunk_io(self)[self._slices(key)] = value
            return
        self._source_data[key] = value

    def to_ndarray(self, roi: Roi, fill_value: Any = 0) -> np.ndarray:
        """The data in `roi`, `fill_value` where it leaves the array (as funlib's)."""
        spatial_shape = iter(roi.shape / self._voxel_size)
        shape = tuple(next(spatial_shape) if p else s for s, p in zip(self.shape, self._physical))
        data = np.zeros(shape, dtype=self.dtype)
        if fill_value != 0:
            data[:] = fill_value
        shared = self._roi.intersect(roi)
        if not shared.empty:
            voxels = (shared - roi.offset) / self._voxel_size
            spatial = iter(voxels.to_slices())
            target = tuple(next(spatial) if p else slice(None) for p in self._physical)
            data[target] = self[shared]
        return data

    def funlib_array(self) -> funlib.persistence.Array:
        """The same array as a funlib.persistence `Array` (imports dask)."""
        cached = self.__dict__.get("_funlib")
        if cached is None:
            from funlib.persistence import Array as FunlibArray

            cached = FunlibArray(
                self._source_data,
                self._offset,
                self._voxel_size,
                self._axis_names,
                self._units,
                self._types,
                chunks=self._source_data.chunks,
            )
            self.__dict__["_funlib"] = cached
        return cached

    def __getattr__(self, name: str) -> Any:
        # only reached for names not defined here: funlib's `Array` answers them
        if name.startswith("_") or name in ("lazy_op", "apply_lazy_ops"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.funlib_array(), name)

    def __repr__(self) -> str:
        return f"ZarrArray({self._source_data!r}, roi={self._roi}, voxel_size={self._voxel_size})"


def _strip_channels(types: Sequence[str], values: list[Sequence | None]) -> list[Sequence | None]:
    """funlib.persistence's `strip_channels`: drop the channel entries of per-axis values."""
    keep = [i for i, t in enumerate(types) if t in _PHYSICAL]
    stripped: list[Sequence | None] = []
    for value in values:
        if value is None or len(value) == len(keep):
            stripped.append(value)
        elif len(value) == len(types):
            stripped.append([value[i] for i in keep])
        else:
            raise ValueError(f"Types {types} and sequence {value} are not compatible.")
    return stripped


def _validate(
    offset: Coordinate | None,
    voxel_size: Coordinate | None,
    axis_names: Sequence[Any] | None,
    units: Sequence[Any] | None,
    types: Sequence[Any] | None,
) -> None:
    """funlib.persistence's checks on its metadata (`MetaData.validate`)."""
    if offset is not None and not all(isinstance(d, int) for d in offset):
        raise AssertionError(f"Offset must be a sequence of ints, got {offset}")
    if voxel_size is not None and not all(isinstance(d, int) for d in voxel_size):
        raise AssertionError(f"Voxel size must be a sequence of ints, got {voxel_size}")
    if axis_names is not None and not all(isinstance(d, str) for d in axis_names):
        raise AssertionError(f"Axis names must be a sequence of strings, got {list(axis_names)}")
    if units is not None and not all(isinstance(d, str) for d in units):
        raise AssertionError(f"Units must be a sequence of strings, got {list(units)}")
    if types is not None and not all(isinstance(d, str) for d in types):
        raise AssertionError(f"Types must be a sequence of strings, got {list(types)}")


def _physical_dims(
    dims: int,
    offset: Coordinate | None,
    voxel_size: Coordinate | None,
    axis_names: Sequence[str] | None,
    units: Sequence[str] | None,
    types: Sequence[str] | None,
) -> int:
    """funlib.persistence's `MetaData.physical_dims`: the one count all metadata agree on."""
    indicators = {
        len(units) if units is not None else None,
        voxel_size.dims if voxel_size is not None else None,
        offset.dims if offset is not None else None,
        len([t for t in types if t in _PHYSICAL]) if types is not None else None,
    }
    indicators.discard(None)
    if not indicators:
        return dims
    if len(indicators) == 1:
        return indicators.pop()
    raise ValueError(
        "Given physical dimensions are ambiguous:\n"
        f"Units: {units}\nVoxel size: {voxel_size}\nOffset: {offset}\n"
        f"Axis names: {axis_names}\nTypes: {types}"
    )


if TYPE_CHECKING:
    # what open_input / open_output / create_output return
    Array: TypeAlias = ZarrArray | funlib.persistence.Array


_METADATA_ATTRS = ("offset", "voxel_size", "axis_names", "units", "types")


@functools.cache
def _custom_metadata_format() -> bool:
    """Whether funlib.persistence is configured to read other attributes than its defaults.

    funlib.persistence reads a `[tool.funlib_persistence]` table in
    ./pyproject.toml, ./funlib_persistence.toml, a user and a global file.
    If one names other attributes, arrays are opened by funlib itself.
    """
    import tomllib

    paths = [
        Path("/etc/funlib_persistence/funlib_persistence.toml"),
        Path.home() / ".config" / "funlib_persistence" / "funlib_persistence.toml",
        Path("funlib_persistence.toml"),
        Path("pyproject.toml"),
    ]
    config: dict[str, Any] = {}
    for path in paths:
        try:
            if not path.exists():
                continue
            with path.open("rb") as file:
                table = tomllib.load(file)
        except (OSError, ValueError):
            return True  # let funlib.persistence read (or reject) it
        if path.name == "pyproject.toml":
            table = table.get("tool", {}).get("funlib_persistence", {})
        config.update(table)
    return any(config.get(f"{attr}_attr", attr) != attr for attr in _METADATA_ATTRS) or any(
        key not in {f"{attr}_attr" for attr in _METADATA_ATTRS} for key in config
    )


def _fetch(attrs: Mapping[str, Any], key: str) -> Sequence[Any] | None:
    value = attrs.get(key, None)
    if not ((isinstance(value, Sequence) and not isinstance(value, (str, int))) or value is None):
        raise AssertionError(value)
    return value


def open_array(path: str | Path, mode: str = "r") -> Array:
    """Open the zarr array at `path` with its funlib.persistence metadata, without dask.

    OME-NGFF metadata on the parent group, and N5 datasets: see voxblock.formats.
    """
    from voxblock import formats

    if formats.in_n5(path):
        data, geometry = formats.open_n5(path, mode)
        attrs = geometry.attrs()
        ome_units = formats.source_units(geometry, {})
    elif _custom_metadata_format():
        from funlib.persistence import open_ds

        return open_ds(str(path), mode=mode)
    else:
        import zarr  # on first use: a worker that opens no array never pays for it

        data = zarr.open(str(path), mode=mode)
        if not isinstance(data, zarr.Array):
            raise TypeError(f"Expected a zarr Array at {path}, got {type(data).__name__}")
        attrs = data.attrs.asdict()
        geometry = formats.ome_geometry(path, data.shape)
        ome_units = formats.source_units(geometry, attrs)
        if geometry is not None:
            funlib_agrees = formats.check_agrees(str(path), geometry, attrs)
            if geometry.drop or not funlib_agrees:
                data = formats.DropAxes(data, geometry.drop) if geometry.drop else data
                attrs = geometry.attrs()
    axis_names = _fetch(attrs, "axis_names")
    types = _fetch(attrs, "types")
    if types is None and axis_names is not None:
        types = ["channel" if str(name).endswith("^") else "space" for name in axis_names]
    array = ZarrArray(
        data,
        offset=_fetch(attrs, "offset"),
        voxel_size=_fetch(attrs, "voxel_size"),
        axis_names=axis_names,
        units=_fetch(attrs, "units"),
        types=types,
    )
    array._path = str(Path(path).resolve())
    array.ome_units = ome_units
    return array


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
        return open_array(array_name.path, mode="r")
    except Exception as error:  # zarr raises several types for unreadable metadata
        raise VoxblockError(f"{role} {array_name} cannot be opened: {error}") from error


def open_output(name: str | ArrayName) -> Array:
    """Open an output for writing (in a worker process, once)."""
    return open_array(ArrayName.parse(name).path, mode="r+")


def _datasets_in(container: Path) -> list[str]:
    import zarr

    from voxblock import formats

    if formats.in_n5(container):
        return formats.n5_datasets(container)

    found = []
    for meta in sorted(container.rglob("zarr.json")) + sorted(container.rglob(".zarray")):
        try:
            node = zarr.open(str(meta.parent), mode="r")
        except Exception:
            continue
        if isinstance(node, zarr.Array):
            found.append(str(meta.parent.relative_to(container)))
    return found[:20]


def spatial_chunk_shape(array: Array) -> Coordinate:
    """The zarr chunk shape of the spatial axes, in voxels (not dask's chunks)."""
    return Coordinate(array._source_data.chunks[array.channel_dims :])


def is_sharded(array: Array) -> bool:
    return getattr(array._source_data, "shards", None) is not None


def spatial_write_unit(array: Array) -> Coordinate:
    """What one write replaces, spatial voxels: the shard of a sharded array, else the chunk."""
    source = array._source_data
    unit = getattr(source, "shards", None) or source.chunks
    return Coordinate(unit[array.channel_dims :])


def channel_shape(array: Array) -> tuple[int, ...]:
    return tuple(array.shape[: array.channel_dims])
