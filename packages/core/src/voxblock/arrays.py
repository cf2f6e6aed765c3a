"""Arrays named "CONTAINER/DATASET": open inputs, create or check outputs, block I/O.

Reads and writes go straight to the zarr array (no dask graph per block).
Arrays are opened as `ZarrArray`: the zarr array plus the metadata that
funlib.persistence writes (offset, voxel size, axes), parsed here the way
funlib.persistence parses it, so that a worker process never imports
funlib.persistence (and with it dask, xarray and pandas: most of a worker's
start-up time). funlib.persistence is imported only when its metadata keys are
configured to differ from its defaults.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from funlib.geometry import Coordinate, Roi

from voxblock.errors import VoxblockError
from voxblock.layout import Layout
from voxblock.nodes import container_format, make_groups  # also arrays.* for workers and segment

if TYPE_CHECKING:
    from typing import TypeAlias

    import funlib.persistence

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
        self._halo: Any = None  # a voxblock.halo.Halo, where one is kept for this array
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
    array._halo = _HALOS.get(_halo_key(path))
    array.ome_units = ome_units
    return array


# halos (voxblock.halo) in use in this process, by array path: a worker
# process registers those of its task before it opens any array
_HALOS: dict[str, Any] = {}


def _halo_key(path: str | Path) -> str:
    return str(Path(path).resolve())


@contextlib.contextmanager
def halos_in_use(halos: Mapping[str, Any]) -> Iterator[None]:
    """Arrays opened meanwhile read (and write) through these halos, by array name."""
    added = {_halo_key(ArrayName.parse(name).path): halo for name, halo in halos.items()}
    previous = dict(_HALOS)
    _HALOS.update(added)
    try:
        yield
    finally:
        _HALOS.clear()
        _HALOS.update(previous)


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


def spatial_shape(array: Array) -> Coordinate:
    return Coordinate(array.shape[array.channel_dims :])


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
        kept = getattr(array, "_halo", None)
        if kept is not None:
            from voxblock import halo

            return halo.read(array, roi, fill_value, kept)
        return _read(array, roi, fill_value)
    except Exception as error:
        raise BlockIOError(f"cannot read {_where(array, roi)}: {error!r}") from error


# chunk I/O of arrays that take no new attributes (funlib's are frozen): id(zarr array) -> (it, I/O)
_FROZEN_IO: dict[int, tuple[Any, Any]] = {}


def chunk_io(array: Array) -> Any:
    """What reads and writes index: direct chunk I/O (voxblock.chunks) where it applies, else zarr."""
    cached = getattr(array, "_chunk_io", None)
    if cached is not None:
        return cached
    source = array._source_data
    kept = _FROZEN_IO.get(id(source))
    if kept is not None and kept[0] is source:
        return kept[1]
    from voxblock.chunks import DirectChunks

    cached = DirectChunks.of(source) or source
    try:
        array._chunk_io = cached
    except (AttributeError, TypeError):
        if len(_FROZEN_IO) > 64:
            _FROZEN_IO.clear()
        _FROZEN_IO[id(source)] = (source, cached)
    return cached


def _read(array: Array, roi: Roi, fill_value: float) -> np.ndarray:
    inside = array.roi.intersect(roi)
    if inside == roi:
        return np.asarray(chunk_io(array)[_slices(array, roi)])
    shape = channel_shape(array) + tuple(roi.shape / array.voxel_size)
    data = np.full(shape, fill_value, dtype=array.dtype)
    if not inside.empty:
        begin = (inside.begin - roi.begin) / array.voxel_size
        end = (inside.end - roi.begin) / array.voxel_size
        target = (slice(None),) * array.channel_dims + tuple(slice(b, e) for b, e in zip(begin, end))
        data[target] = chunk_io(array)[_slices(array, inside)]
    return data


def write(array: Array, roi: Roi, data: np.ndarray) -> None:
    """Write `data` (covering `roi`) where it falls inside the array."""
    try:
        kept = getattr(array, "_halo", None)
        if kept is None:
            _write(array, roi, data)
            return
        from voxblock import halo

        halo.forget(array, kept, roi)
        _write(array, roi, data)
        halo.keep(array, kept, roi, data)
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
    chunk_io(array)[_slices(array, inside)] = data


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
    ome_units: tuple[str, ...] | None = None  # the input's units, for OME-NGFF metadata (voxblock.formats)

    @classmethod
    def like(
        cls, source: Array, name: str | ArrayName, dtype: Any, roi: Roi, channels: tuple[int, ...] = ()
    ) -> OutputSpec:
        """An output on `source`'s voxel grid, with its spatial axis names and units."""
        return cls(
            name=ArrayName.parse(name),
            dtype=np.dtype(dtype),
            roi=roi,
            voxel_size=source.voxel_size,
            channels=tuple(channels),
            axis_names=tuple(source.axis_names[source.channel_dims :]),
            units=tuple(source.units),
            ome_units=getattr(source, "ome_units", None),
        )


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
        existing = open_array(path, mode="r")
    except Exception as error:
        raise VoxblockError(
            f"output {spec.name} exists but is not a readable array ({error}); choose another output name"
        ) from error
    from voxblock import formats

    problems = []
    if existing.voxel_size != spec.voxel_size:
        problems.append(f"voxel size {tuple(existing.voxel_size)} (the input has {tuple(spec.voxel_size)})")
    if np.dtype(existing.dtype) != np.dtype(spec.dtype):
        problems.append(f"dtype {existing.dtype} (this worker writes {np.dtype(spec.dtype)})")
    if spec.units and not all(formats.same_unit(a, b) for a, b in zip(existing.units, spec.units)):
        # one world in two units: its offsets and ROIs would mean two places (no unit: as given)
        problems.append(f"units {list(existing.units)} (the input has {list(spec.units)})")
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
    if recorded is None and no_chunk_written(existing):
        # no data to lose: e.g. a run killed between creating this array and
        # recording who made it
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


def no_chunk_written(array: Array) -> bool:
    """Whether the array certainly holds no data; False ("data may exist") where that cannot be told (N5)."""
    count = getattr(array._source_data, "nchunks_initialized", None)
    return count is not None and count == 0


def create_output(spec: OutputSpec, provenance: Mapping[str, Any], layout: Layout) -> Array:
    """Create the output array in `layout` (chunks, shards), in its container's zarr format.

    The container and the groups above the array are made zarr groups of
    that format too, so that zarr, napari and neuroglancer list the output.
    """
    spatial = spec.roi.shape / spec.voxel_size
    channel_names = [f"c{i}^" for i in range(len(spec.channels))]
    axis_names = list(spec.axis_names) if spec.axis_names else None
    if axis_names is not None and len(axis_names) == len(spatial):
        axis_names = channel_names + axis_names
    from voxblock import formats

    formats.check_output_name(spec.name.container, spec.name.dataset)  # N5; a level of another image
    zarr_format = container_format(spec.name)
    try:
        make_groups(spec.name, zarr_format)
        return _create(spec, provenance, layout, spatial, axis_names, zarr_format)
    except OSError as error:
        raise VoxblockError(f"output {spec.name} cannot be created: {error}") from error


def _create(
    spec: OutputSpec,
    provenance: Mapping[str, Any],
    layout: Layout,
    spatial: Coordinate,
    axis_names: list[str] | None,
    zarr_format: int,
) -> Array:
    import zarr

    shape = tuple(spec.channels) + tuple(spatial)
    chunks = tuple(spec.channels) + tuple(layout.chunk)
    shards = tuple(spec.channels) + tuple(layout.shard) if layout.shard is not None else None
    types = ["channel"] * len(spec.channels) + ["space"] * len(spatial)
    units = list(spec.units) if spec.units else None
    data = zarr.create_array(
        store=str(spec.name.path),
        shape=shape,
        chunks=chunks,
        shards=shards,
        dtype=spec.dtype,
        zarr_format=zarr_format,  # type: ignore[arg-type]
    )
    if _custom_metadata_format():
        from funlib.persistence import prepare_ds  # imports dask: only for custom metadata keys

        # writes the metadata under the configured keys on the array just made
        prepare_ds(
            str(spec.name.path),
            shape=shape,
            offset=spec.roi.offset,
            voxel_size=spec.voxel_size,
            axis_names=axis_names,
            units=units,
            types=types,
            chunk_shape=chunks,
            dtype=spec.dtype,
            mode="a",
        )
    else:
        # what funlib.persistence's prepare_ds writes for a new array, without importing dask
        described = ZarrArray(data, spec.roi.offset, spec.voxel_size, axis_names, units, types)
        data.attrs.put(
            {
                "axis_names": described.axis_names,
                "units": described.units,
                "voxel_size": list(described.voxel_size),
                "offset": list(described.offset),
                "types": described.types,
            }
        )
    record_provenance(spec.name, provenance)
    from voxblock import formats

    formats.write_ome_metadata(
        spec.name.container, spec.name.dataset, open_array(spec.name.path), spec.ome_units
    )
    return open_array(spec.name.path, mode="r+")


def record_provenance(name: ArrayName, provenance: Mapping[str, Any]) -> None:
    import zarr

    node = zarr.open(str(name.path), mode="r+")
    node.attrs[PROVENANCE_KEY] = dict(provenance)
