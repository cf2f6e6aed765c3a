"""Outputs: what a worker writes (OutputSpec), checking an existing one, creating a new one,
and who made it (the provenance recorded in its attributes)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from funlib.geometry import Coordinate, Roi

from voxblock.errors import VoxblockError
from voxblock.metadata import ZarrArray, _custom_metadata_format, channel_shape, open_array
from voxblock.names import ArrayName
from voxblock.nodes import container_format, make_groups

if TYPE_CHECKING:
    from voxblock.layout import Layout
    from voxblock.metadata import Array

PROVENANCE_KEY = "voxblock"


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
    # the output may be a new level of an existing OME-NGFF image (a pyramid level: downsample)
    new_level: bool = False

    @classmethod
    def like(
        cls,
        source: Array,
        name: str | ArrayName,
        dtype: Any,
        roi: Roi,
        channels: tuple[int, ...] = (),
        voxel_size: Coordinate | None = None,
        new_level: bool = False,
    ) -> OutputSpec:
        """An output on `source`'s voxel grid (or one of `voxel_size` from the same origin: a coarser
        pyramid level), with its spatial axis names and units."""
        return cls(
            name=ArrayName.parse(name),
            dtype=np.dtype(dtype),
            roi=roi,
            voxel_size=Coordinate(voxel_size) if voxel_size is not None else source.voxel_size,
            channels=tuple(channels),
            axis_names=tuple(source.axis_names[source.channel_dims :]),
            units=tuple(source.units),
            ome_units=getattr(source, "ome_units", None),
            new_level=new_level,
        )


def check_output(
    spec: OutputSpec | ArrayName,
    provenance: Mapping[str, Any],
    overwrite: bool,
    ours: Callable[[Mapping[str, Any]], bool | None] | None = None,
    holds: Callable[[Mapping[str, Any]], str] | None = None,
) -> str:
    """'create', 'resume' or 'overwrite' for an output, or a VoxblockError: the one check of
    whether an existing array belongs to us.

    An existing array must match the spec's geometry and dtype, even with `overwrite` (a
    name alone, for a table or a scratch array, has no geometry: only who wrote it is asked).
    Then `ours(attrs)` says from the array's attributes who wrote it: True, this run (resume);
    False, someone else; None, no record at all. The default rule is run_blockwise's: the
    provenance recorded by the same task is ours. Anything not ours is refused unless
    `overwrite`, or unless it has no record and no chunk written: no data to lose (e.g. a run
    killed between creating the array and recording who made it, or an array made with
    prepare_ds). `holds(attrs)` names what it holds in the refusal.
    """
    ours = ours or _same_task(provenance)
    holds = holds or _written_by
    name = spec.name if isinstance(spec, OutputSpec) else spec
    if not name.path.exists():
        return "create"
    existing = _check_geometry(spec) if isinstance(spec, OutputSpec) else None
    if existing is not None:
        attrs = dict(existing.attrs)
    else:
        import zarr

        try:
            attrs = dict(zarr.open(str(name.path), mode="r").attrs)
        except Exception:
            attrs = {}  # unreadable: not known to be ours
    owner = ours(attrs)
    if owner:
        return "resume"
    if overwrite:
        return "overwrite"
    if owner is None and existing is not None and no_chunk_written(existing):
        return "overwrite"
    raise VoxblockError(
        f"output {name} already holds {holds(attrs)}; refusing to overwrite it "
        "(pass overwrite=True / --overwrite to replace it)"
    )


def _same_task(provenance: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], bool | None]:
    """run_blockwise's rule: ours if the same task recorded its provenance; None if none is recorded."""

    def ours(attrs: Mapping[str, Any]) -> bool | None:
        recorded = attrs.get(PROVENANCE_KEY)
        return None if recorded is None else recorded.get("task") == provenance.get("task")

    return ours


def _written_by(attrs: Mapping[str, Any]) -> str:
    recorded = attrs.get(PROVENANCE_KEY)
    if recorded:
        worker, task = recorded.get("worker"), recorded.get("task", "")[:12]
        return f"data written by another voxblock task ({worker}, {task})"
    return "data written by something other than voxblock"


def _check_geometry(spec: OutputSpec) -> Array:
    """The existing output, opened; a VoxblockError if it is unreadable or its geometry or dtype differ."""
    try:
        existing = open_array(spec.name.path, mode="r")
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
    return existing


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

    # N5; a level of another image (unless the output is meant as one: a pyramid level)
    formats.check_output_name(spec.name.container, spec.name.dataset, new_level=spec.new_level)
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
