"""OME-NGFF and N5 metadata: where an array's voxels are in the world.

OME-NGFF (0.4 on zarr v2, 0.5 on zarr v3, as ome-zarr-py, iohub or
webknossos write it): the group above a level (`image.zarr/s0`) holds
`multiscales`. The level's voxel size is the scale of its
coordinateTransformations (times any multiscale-level scale), its offset the
translation (the dataset's, scaled, plus the multiscale-level one): the same
mapping funlib.persistence's `open_ome_ds` uses (offset = translation).

Which library: in the driver, the group is read and validated by
ome-zarr-models (the spec's pydantic models; 0.4 and 0.5; no dask, about
0.5 s to import). funlib.persistence's `open_ome_ds` (iohub) was evaluated
and is not used: it imports dask, xarray and pandas (about 1 s), truncates a
non-integer scale silently (0.004 micrometer becomes voxel size 0, an empty
ROI) and fails on a channel axis ("ChannelAxisMeta has no attribute unit").
Worker processes parse the same small JSON themselves (no pydantic); both
paths go through `geometry()`, and tests check the result against
ome-zarr-py's Reader, ome-zarr-models and funlib's `open_ome_ds`.

Units: every known length unit (micrometer, nanometer, angstrom, millimeter,
their short forms um, nm, ...) is converted to nanometers, whatever the
numbers, so that all levels of one image, and all arrays of one task, share
one unit (s0 at 1 micrometer and s1 at 2 micrometers read as 1000 and 2000
nanometer, not 1 micrometer and 2000 nanometer). An axis without a unit, or
with one that is no length voxblock knows ("pixel"), keeps its numbers and
its unit. funlib.geometry needs integer voxel sizes and offsets: values that
are not whole (in nanometers, or in the unknown unit) are refused, never
rounded. A time axis of size 1 is dropped; channel axes (and a longer time
axis) become non-spatial axes.

N5 (Janelia, CellMap) is read with tensorstore's n5 driver (zarr 3 reads no
N5; optional: `pip install 'voxblock[n5]'`). N5 lists dimensions x,y,z
(Fortran order); the array is presented z,y,x, and every attribute below is
reversed to match. Where a dataset's voxels are, by convention:

- `resolution`, `offset`, `units`, `axes` (funlib/daisy, also what
  tensorstore reads as its dimension units): the dataset's own voxel size and
  offset, at its level; used as they are, never multiplied by anything.
- `pixelResolution` (n5-viewer, n5-spark, n5-ij, BigDataViewer exports):
  `{"unit": "um", "dimensions": [x, y, z]}`, or a plain list `[x, y, z]`
  (n5-ij; no unit), on the level or inherited from a group above it (the
  channel group, then the root: n5-viewer's defaults). It is the resolution
  of s0: n5-spark writes the same one on every level. A level's voxel size is
  `pixelResolution` times its `downsamplingFactors` ([x, y, z], on the
  level), or times the entry for `sN` of a group's `scales` or
  `downsamplingFactors` list of lists (n5-viewer, bdv.n5, neuroglancer). This
  is n5-ij's N5SingleScaleMetadataParser and neuroglancer's n5 source.
  Their transform also shifts a level by half an s0 voxel per factor: that
  places voxel centres; the corner of voxel 0, which is funlib's offset,
  stays where s0's is, so the offset is not changed.
- `transform` (CellMap: `scale`, `translate`, `axes`, `units`, `ordering`):
  the level's own voxel size and offset.

A dataset that gives its voxel size twice (`resolution` and
`pixelResolution`, or `transform`) is read only where both agree; one with
its own `resolution` and `downsamplingFactors` but no `pixelResolution`
is refused (funlib and tensorstore read `resolution` as the level's own,
neuroglancer multiplies it by the factors: the two disagree by the factor).
A recognized attribute that is present but cannot be read (not one number
per axis, a `pixelResolution` without `dimensions`, ...) is refused, never
replaced by 1. N5 outputs are refused: write a .zarr.

Outputs named as a multiscale level (`out.zarr/mask/s0`, `.../labels/cells/0`)
get OME-NGFF metadata on their parent group (`write_ome_metadata`), in the
version of their zarr format, besides funlib's attributes on the array.
That metadata is in the length units of the input's axes (its Geometry's
`source_units`: 0.008 micrometer, not 8 nanometer, for an input in
micrometers), converted exactly from the nanometers voxblock works in and
checked to read back to them: napari's ome-zarr plugin places layers by the
scale and translation numbers alone (napari_ome_zarr's `transform_scale`
ignores units), so a label layer in nanometers on an image in micrometers
would be drawn 1000 times off. funlib's attributes on the array stay in
nanometers (funlib.geometry needs whole numbers: 0.004 micrometer is none),
so funlib's `open_ds`, and a rerun comparing voxel sizes, read the input's
nanometer grid. An output that is no level records the input's units in
its attribute `voxblock_ome_units`, for outputs made from it (the fragments
segment_blockwise relabels). A label image's `image-label` names its image
(`source.image` "../../"): ome-zarr-py's Reader warns "no parent found"
for a label without it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from voxblock.errors import VoxblockError

# a dataset name that is a level of a multiscale image: "0", "s0"
LEVEL = re.compile(r"^s?\d+$")

# length units to nanometers (OME-NGFF's UDUNITS names, and short ones N5 tools write)
_NANOMETERS = {
    "picometer": 1e-3,
    "pm": 1e-3,
    "angstrom": 0.1,
    "nanometer": 1.0,
    "nm": 1.0,
    "micrometer": 1e3,
    "micron": 1e3,
    "um": 1e3,
    "\u00b5m": 1e3,
    "\u03bcm": 1e3,
    "millimeter": 1e6,
    "mm": 1e6,
    "centimeter": 1e7,
    "cm": 1e7,
    "meter": 1e9,
    "m": 1e9,
}
_OME_UNITS = {
    "nm": "nanometer",
    "um": "micrometer",
    "\u00b5m": "micrometer",
    "\u03bcm": "micrometer",
    "micron": "micrometer",
    "pm": "picometer",
    "mm": "millimeter",
    "cm": "centimeter",
    "m": "meter",
}
# on an output that is no OME-NGFF level: the length units of its input's axes (see write_ome_metadata)
UNITS_KEY = "voxblock_ome_units"


@dataclass(frozen=True)
class Geometry:
    """funlib.persistence's metadata of an array, and the axes to drop (size-1 time axes)."""

    offset: list[int]
    voxel_size: list[int]
    axis_names: list[str]
    units: list[str]
    types: list[str]
    drop: tuple[int, ...] = ()
    # the space axes' units as the metadata names them (OME-NGFF names: "micrometer"; "" for none)
    source_units: tuple[str, ...] = ()

    def attrs(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "voxel_size": self.voxel_size,
            "axis_names": self.axis_names,
            "units": self.units,
            "types": self.types,
        }


# -- numbers ----------------------------------------------------------------------------------------


def _whole(value: float) -> bool:
    return math.isfinite(value) and abs(value - round(value)) <= 1e-9 * max(1.0, abs(value))


def length_factor(unit: str) -> float | None:
    """Nanometers per `unit`, or None where it is no length unit voxblock knows (or empty)."""
    return _NANOMETERS.get(str(unit).strip().lower()) if unit else None


def same_unit(a: str, b: str) -> bool:
    """Whether two unit names name one unit ("nm" and "nanometer"); no unit matches any (numbers as given)."""
    if not a or not b:
        return True
    fa, fb = length_factor(a), length_factor(b)
    if fa is not None or fb is not None:
        return fa == fb
    return str(a).strip().lower() == str(b).strip().lower()


def integer_geometry(
    where: str, scale: Sequence[float], translation: Sequence[float], units: Sequence[str]
) -> tuple[list[int], list[int], list[str]]:
    """Voxel size, offset and units as integers: known length units in nanometers, others as given.

    Values that are not whole (in nanometers, or in an unknown unit) are refused, never rounded.
    """
    factors = [length_factor(u) for u in units]
    size = [v * f if f is not None else v for v, f in zip(scale, factors)]
    begin = [v * f if f is not None else v for v, f in zip(translation, factors)]
    named = ["nanometer" if f is not None else str(u) for u, f in zip(units, factors)]
    if all(_whole(v) for v in [*size, *begin]):
        return [round(v) for v in size], [round(v) for v in begin], named
    shown = ", ".join(f"{v:g}" for v in scale)
    offset = ", ".join(f"{v:g}" for v in translation)
    unit = "/".join(sorted({str(u) for u in units if u})) or "no unit"
    known = all(f is not None for f in factors)
    raise VoxblockError(
        f"{where}: voxel size ({shown}) and offset ({offset}) in {unit} are not whole numbers"
        + (" of nanometers" if known else "")
        + "; voxblock (funlib.geometry) needs integer voxel sizes and offsets and does not round them. "
        + (
            "Rewrite the scale and translation on a whole-nanometer grid"
            if known
            else "Give the axes a length unit in which they are whole (e.g. nanometer), or rewrite the "
            "scale and translation"
        )
    )


# -- OME-NGFF: reading --------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path) as file:
            value = json.load(file)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise VoxblockError(f"{path} cannot be read as JSON: {error}") from error
    return value if isinstance(value, dict) else None


def group_attrs(group: Path) -> tuple[dict[str, Any], int] | None:
    """The attributes of the zarr group at `group` and its zarr format, or None if it is none."""
    from voxblock.nodes import group_format

    kind = group_format(group)
    if kind == 3:
        return dict((_read_json(group / "zarr.json") or {}).get("attributes") or {}), 3
    if kind == 2:
        return dict(_read_json(group / ".zattrs") or {}), 2
    return None


def multiscales_of(attrs: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The `multiscales` list of a group's attributes: 0.5's `ome` namespace, or 0.4's top level."""
    ome = attrs.get("ome")
    if isinstance(ome, Mapping) and "multiscales" in ome:
        return list(ome["multiscales"])
    if "multiscales" in attrs:
        return list(attrs["multiscales"])
    return None


def _in_driver() -> bool:
    # daisy gives every worker process its context; the driver has none
    return "DAISY_CONTEXT" not in os.environ


def _validated_multiscales(group: Path) -> list[dict[str, Any]] | None:
    """The multiscales as ome-zarr-models reads and validates them (None if it is not installed)."""
    try:
        import zarr
        from ome_zarr_models import open_ome_zarr
    except ImportError:
        return None
    node = zarr.open_group(str(group), mode="r")
    try:
        model = open_ome_zarr(node)
    except Exception as error:
        detail = str(error)
        try:  # the image model of the group's version says what is wrong
            from ome_zarr_models.v04 import Image as Image04
            from ome_zarr_models.v05 import Image as Image05

            (Image05 if "ome" in node.attrs else Image04).from_zarr(node)
        except Exception as specific:
            detail = str(specific)
        lines = [line.strip() for line in detail.splitlines() if line.strip()][:3]
        raise VoxblockError(
            f"{group} has OME-NGFF multiscales metadata that does not validate "
            f"(ome-zarr-models): {' '.join(lines)}"
        ) from error
    attributes = model.attributes
    holder = getattr(attributes, "ome", attributes)
    found = getattr(holder, "multiscales", None)
    if found is None:
        return None
    return [m.model_dump(mode="json", exclude_none=True) for m in found]


def ome_geometry(path: str | Path, shape: Sequence[int]) -> Geometry | None:
    """The geometry of the array at `path` from its parent group's OME-NGFF multiscales, or None."""
    path = Path(path)
    found = group_attrs(path.parent)
    if found is None:
        return None
    multiscales = multiscales_of(found[0])
    if not multiscales:
        return None
    if _in_driver():
        multiscales = _validated_multiscales(path.parent) or multiscales
    for multiscale in multiscales:
        paths = [str(d.get("path", "")).strip("/") for d in multiscale.get("datasets", [])]
        if path.name in paths:
            return geometry(multiscale, path.name, shape, where=str(path))
    return None


def _transforms(transforms: Sequence[Mapping[str, Any]] | None, dims: int, where: str) -> tuple[list, list]:
    scale, translation = [1.0] * dims, [0.0] * dims
    for transform in transforms or []:
        kind = transform.get("type")
        if kind == "identity":
            continue
        if kind not in ("scale", "translation"):
            raise VoxblockError(f"{where}: coordinate transformation {kind!r} is not supported")
        if "path" in transform:
            raise VoxblockError(f"{where}: coordinate transformations stored in a file are not supported")
        values = [float(v) for v in transform[kind]]
        if len(values) != dims:
            raise VoxblockError(f"{where}: {kind} {values} has {len(values)} values for {dims} axes")
        if kind == "scale":
            scale = [s * v for s, v in zip(scale, values)]
            translation = [t * v for t, v in zip(translation, values)]
        else:
            translation = [t + v for t, v in zip(translation, values)]
    return scale, translation


def _axis_type(axis: Any) -> str:
    if isinstance(axis, str):  # 0.3: names only
        name, kind = axis, None
    else:
        name, kind = axis.get("name", ""), axis.get("type")
    if kind:
        return str(kind)
    return {"t": "time", "c": "channel"}.get(
        str(name).lower(), "space" if name in ("z", "y", "x") else "channel"
    )


def geometry(multiscale: Mapping[str, Any], dataset: str, shape: Sequence[int], where: str) -> Geometry:
    """The geometry of level `dataset` of one multiscale image (its parsed JSON)."""
    axes = list(multiscale.get("axes") or ["z", "y", "x"][-len(shape) :])
    if len(axes) != len(shape):
        raise VoxblockError(f"{where}: the OME-NGFF axes {axes} do not match the array's {len(shape)} axes")
    entry = next(d for d in multiscale["datasets"] if str(d.get("path", "")).strip("/") == dataset)
    dims = len(axes)
    scale, translation = _transforms(entry.get("coordinateTransformations"), dims, where)
    outer_scale, outer_translation = _transforms(multiscale.get("coordinateTransformations"), dims, where)
    scale = [s * o for s, o in zip(scale, outer_scale)]
    translation = [t * o + u for t, o, u in zip(translation, outer_scale, outer_translation)]
    names = [a if isinstance(a, str) else str(a.get("name", f"d{i}")) for i, a in enumerate(axes)]
    units = [None if isinstance(a, str) else a.get("unit") for a in axes]
    kinds = [_axis_type(a) for a in axes]
    drop = tuple(i for i, k in enumerate(kinds) if k == "time" and shape[i] == 1)
    spatial = [i for i, k in enumerate(kinds) if k == "space"]
    if not spatial:
        raise VoxblockError(f"{where}: the OME-NGFF axes {names} have no space axis")
    voxel_size, offset, spatial_units = integer_geometry(
        where,
        [scale[i] for i in spatial],
        [translation[i] for i in spatial],
        [str(units[i] or "") for i in spatial],
    )
    kept = [i for i in range(dims) if i not in drop]
    # time (longer than one) and channels become non-spatial axes, named as funlib names them
    axis_names = [names[i] if kinds[i] == "space" else f"{names[i]}^" for i in kept]
    types = ["space" if kinds[i] == "space" else "channel" for i in kept]
    if any(kinds[i] == "space" for i in kept[: len(kept) - len(spatial)]):
        raise VoxblockError(f"{where}: the OME-NGFF axes {names} do not end with the space axes")
    named = tuple(_ome_unit(str(units[i] or "")) or "" for i in spatial)
    return Geometry(offset, voxel_size, axis_names, spatial_units, types, drop, named)


def check_agrees(where: str, geometry: Geometry, attrs: Mapping[str, Any]) -> bool:
    """funlib's attributes on the array, where there are any, must place it where OME-NGFF does.

    True where they are complete (all five of funlib's keys, units included) and agree: the
    array is then read with them, as funlib reads it (an array voxblock wrote from an input in
    micrometers reads back in micrometers, as its input did).
    """
    units = attrs.get("units")
    factors = [1.0] * len(geometry.units)
    if units is not None:
        if len(units) != len(geometry.units):
            return False
        factors = [length_factor(u) or 0.0 for u in units]
        named = ["nanometer" if f else str(u) for u, f in zip(units, factors)]
        if named != geometry.units:
            return False  # a unit that is no length (or none) against one that is: nothing to compare
        factors = [f or 1.0 for f in factors]
    for key in ("voxel_size", "offset"):
        value = attrs.get(key)
        mine = getattr(geometry, key)
        if value is not None and (
            len(value) != len(mine)
            or any(abs(float(v) * f - m) > 1e-6 * max(1.0, abs(m)) for v, f, m in zip(value, factors, mine))
        ):
            raise VoxblockError(
                f"{where}: its attribute {key}={list(value)} disagrees with its OME-NGFF "
                f"multiscales metadata ({mine}); fix one of them"
            )
    return units is not None and all(attrs.get(key) is not None for key in geometry.attrs())


class DropAxes:
    """An array without some of its size-1 axes (an OME-NGFF time axis of one time point)."""

    def __init__(self, source: Any, drop: Sequence[int]) -> None:
        self._source = source
        self._drop = tuple(drop)
        keep = [i for i in range(len(source.shape)) if i not in self._drop]
        self.shape = tuple(source.shape[i] for i in keep)
        self._keep = tuple(keep)
        # zarr's `chunks` is the inner chunk of a sharded array, `shards` the shard (None: unsharded)
        self.chunks = tuple(source.chunks[i] for i in keep)
        self.dtype = source.dtype
        self.fill_value = None  # do not look for chunk files: indexing answers
        self.attrs = source.attrs

    @property
    def shards(self) -> tuple[int, ...] | None:
        """The shard shape without the dropped axes; None where the array is not sharded."""
        shards = getattr(self._source, "shards", None)
        return None if shards is None else tuple(shards[i] for i in self._keep)

    @property
    def nchunks_initialized(self) -> int:
        """The chunks (shards) written: dropping size-1 axes leaves their number as it is."""
        return self._source.nchunks_initialized

    def _key(self, key: Any) -> tuple[Any, ...]:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = key.index(Ellipsis)
            key = key[:at] + (slice(None),) * (len(self.shape) - len(key) + 1) + key[at + 1 :]
        key = key + (slice(None),) * (len(self.shape) - len(key))
        parts = iter(key)
        return tuple(0 if i in self._drop else next(parts) for i in range(len(self._source.shape)))

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self._source[self._key(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        self._source[self._key(key)] = value

    def __repr__(self) -> str:
        return f"DropAxes({self._source!r}, drop={self._drop})"


# -- OME-NGFF: writing -----------------------------------------------------------------------------


def _ome_unit(unit: str) -> str | None:
    return _OME_UNITS.get(unit, unit) or None


def source_units(geometry: Geometry | None, attrs: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The units of an array's input world: its OME-NGFF (or N5) axes', else those recorded on it."""
    if geometry is not None and any(geometry.source_units):
        return geometry.source_units
    recorded = attrs.get(UNITS_KEY)
    if isinstance(recorded, list) and all(isinstance(u, str) for u in recorded):
        return tuple(recorded)
    return None


def in_unit(value: float, unit: str, target: str) -> float | None:
    """`value` (in `unit`) as a number of `target`, one that reads back to `value` exactly.

    Reading back is what `integer_geometry` does (times nanometers per `target`, then whole).
    The number is the exact quotient, rounded to 12 significant digits (0.004, not
    0.0040000000000000001), or to 17 where 12 do not read back. None where either unit is no
    length voxblock knows, or no float reads back.
    """
    here, there = length_factor(unit), length_factor(target)
    if here is None or there is None:
        return None
    nanometers = Fraction(value) * Fraction(str(here))  # the factors are powers of ten: exact
    exact = nanometers / Fraction(str(there))
    for digits in (12, 17):
        converted = float(f"{float(exact):.{digits}g}")
        back = converted * there
        if _whole(back) and round(back) == nanometers:
            return converted
    return None


def _in_units(
    voxel_size: Sequence[int], offset: Sequence[int], units: Sequence[str], targets: Sequence[str] | None
) -> tuple[list[float], list[float], list[str]]:
    """Voxel size, offset and units per space axis in `targets` where each converts exactly, else as given."""
    sizes, begins, named = [float(v) for v in voxel_size], [float(v) for v in offset], list(units)
    for i, target in enumerate(targets or []):
        if i >= len(named) or not target or named[i] == target:
            continue
        size, begin = in_unit(sizes[i], named[i], target), in_unit(begins[i], named[i], target)
        if size is not None and begin is not None:
            sizes[i], begins[i], named[i] = size, begin, target
    return sizes, begins, named


def output_multiscale(
    level: str, axis_names: Sequence[str], types: Sequence[str], units: Sequence[str], voxel_size, offset
) -> dict[str, Any]:
    """One multiscale image of one level: axes, scale and translation (channels: 1 and 0)."""
    spatial = iter(zip(voxel_size, offset, units))
    axes, scale, translation = [], [], []
    for name, kind in zip(axis_names, types):
        if kind in ("space", "time"):
            size, begin, unit = next(spatial)
            axis = {"name": str(name), "type": kind}
            if _ome_unit(unit):
                axis["unit"] = _ome_unit(unit)
            scale.append(float(size))
            translation.append(float(begin))
        else:
            axis = {"name": str(name).rstrip("^"), "type": "channel"}
            scale.append(1.0)
            translation.append(0.0)
        axes.append(axis)
    transforms = [{"type": "scale", "scale": scale}, {"type": "translation", "translation": translation}]
    return {"axes": axes, "datasets": [{"path": level, "coordinateTransformations": transforms}]}


def _representable(types: Sequence[str]) -> bool:
    """OME-NGFF 0.4/0.5: 2 or 3 space axes last, at most one channel (or time) axis before them."""
    spatial = sum(t == "space" for t in types)
    return 2 <= spatial <= 3 and len(types) - spatial <= 1 and all(t == "space" for t in types[-spatial:])


def check_output_name(container: Path, dataset: str, new_level: bool = False) -> None:
    """Before an output is created: refuse N5, and a level whose image group holds another image
    (unless `new_level`: the output is meant as a new level of that image, a pyramid level)."""
    if container.suffix == ".n5":
        raise VoxblockError(
            f"output {container}/{dataset}: voxblock does not write N5; name an output in a .zarr "
            f"container instead (e.g. {container.with_suffix('.zarr')}/{dataset}), which funlib, "
            "neuroglancer and napari read"
        )
    parts = dataset.split("/")
    if len(parts) < 1 or not LEVEL.match(parts[-1]) or new_level:
        return
    found = group_attrs(container.joinpath(*parts[:-1]))
    multiscales = multiscales_of(found[0]) if found else None
    if multiscales:
        paths = [str(d.get("path")) for m in multiscales for d in m.get("datasets", [])]
        if parts[-1] not in paths:
            raise VoxblockError(
                f"output {container}/{dataset}: {'/'.join(parts[:-1]) or container} is an OME-NGFF image "
                f"with levels {', '.join(paths)}; a new level would change that image. Choose an output "
                "outside it (e.g. out.zarr/mask/s0 or IMAGE.zarr/labels/mask/s0)"
            )


def write_ome_metadata(container: Path, dataset: str, array: Any, units: Sequence[str] | None = None) -> bool:
    """Describe an output level (`.../s0`) as an OME-NGFF image on its parent group.

    The version follows the array's zarr format (0.4 on v2, 0.5 on v3);
    groups missing between the container and the image are created. An
    output under `IMAGE/labels/NAME/` is also listed as a label image of
    IMAGE, and names IMAGE as its source. `units`: the input's units of the
    space axes (`source_units`); scale and translation are written in them
    where they convert exactly (`in_unit`), else in the array's own; levels
    already in the image keep it in theirs. Returns False where the output
    is not named as a level or OME-NGFF cannot describe its axes: it then
    only records `units` on the array (`UNITS_KEY`), for outputs made from it.
    """
    import zarr

    from voxblock.names import ArrayName
    from voxblock.nodes import make_groups

    parts = dataset.split("/")
    if not LEVEL.match(parts[-1]) or not _representable(array.types):
        if units and any(units):
            zarr.open_array(str(container / dataset), mode="r+").attrs[UNITS_KEY] = list(units)
        return False
    zarr_format = array._source_data.metadata.zarr_format
    version = "0.4" if zarr_format == 2 else "0.5"
    make_groups(ArrayName(container, dataset), zarr_format)
    group = zarr.open_group(str(container.joinpath(*parts[:-1])), mode="r+", zarr_format=zarr_format)
    previous = multiscales_of(group.attrs.asdict()) or []
    axes = (
        [a if isinstance(a, Mapping) else {"name": a} for a in (previous[0].get("axes") or [])]
        if previous
        else []
    )
    same_axes = [a.get("name") for a in axes] == [str(n).rstrip("^") for n in array.axis_names]
    others = [d for d in previous[0].get("datasets", []) if str(d.get("path")) != parts[-1]] if axes else []
    if same_axes and others:  # one image, one unit per axis: the levels already there say which
        units = [str(a.get("unit") or "") for a in axes if _axis_type(a) == "space"]
    sizes, begins, shown = _in_units(array.voxel_size, array.offset, array.units, units)
    multiscale = output_multiscale(parts[-1], array.axis_names, array.types, shown, sizes, begins)
    multiscale["name"] = parts[-2] if len(parts) > 1 else container.stem
    if same_axes and [a.get("unit") for a in axes] == [a.get("unit") for a in multiscale["axes"]]:
        multiscale["datasets"] = others + multiscale["datasets"]
        if others:  # a level added to an image (a pyramid): the image keeps its name, type, metadata
            multiscale.update({k: previous[0][k] for k in ("name", "type", "metadata") if k in previous[0]})
    label = len(parts) >= 3 and parts[-3] == "labels"
    if zarr_format == 3:
        _name_dimensions(container.joinpath(*parts), [a["name"] for a in multiscale["axes"]])
    values: dict[str, Any] = {"multiscales": [multiscale]}
    if label:
        image = group_attrs(container.joinpath(*parts[:-3]))
        # ome-zarr-py's Reader finds a label's image only by `source` (else: "no parent found")
        values["image-label"] = {"source": {"image": "../../"}} if image and multiscales_of(image[0]) else {}
    _put_ome(group, version, values)
    if label:
        labels = zarr.open_group(str(container.joinpath(*parts[:-2])), mode="r+", zarr_format=zarr_format)
        attrs = labels.attrs.asdict()
        names = list((attrs.get("ome") or {}).get("labels") or attrs.get("labels") or [])
        if parts[-2] not in names:
            names.append(parts[-2])
        _put_ome(labels, version, {"labels": names})
    return True


def _name_dimensions(array: Path, names: list[str]) -> None:
    """OME-NGFF 0.5: a level's zarr.json names its dimensions as the axes (a new array: no data yet)."""
    from voxblock.files import replace_atomically

    meta = _read_json(array / "zarr.json") or {}
    if meta.get("dimension_names") != names:
        meta["dimension_names"] = names
        text = json.dumps(meta, indent=2).encode()
        replace_atomically(array / "zarr.json", lambda file: file.write(text))


def _put_ome(group: Any, version: str, values: dict[str, Any]) -> None:
    if version == "0.5":
        ome = dict(group.attrs.get("ome") or {})
        ome.update(values)
        ome["version"] = version
        group.attrs["ome"] = ome
        return
    for key, value in values.items():
        if key == "multiscales":
            value = [{**m, "version": version} for m in value]
        elif key == "image-label":
            value = {**value, "version": version}
        group.attrs[key] = value


# -- N5 -------------------------------------------------------------------------------------------------


def in_n5(path: str | Path) -> bool:
    return any(p.suffix == ".n5" for p in (Path(path), *Path(path).parents))


class N5Source:
    """An N5 dataset read with tensorstore, presented z,y,x: `.shape`, `.dtype`, `.chunks`, indexing.

    Pickles as its path: each process opens the store again.
    """

    fill_value = None  # do not look for chunk files: indexing answers

    def __init__(self, path: str | Path, attrs: Mapping[str, Any]) -> None:
        self.path = str(path)
        self.attrs = dict(attrs)
        self._store: Any = None
        store = self.store
        self.shape = tuple(store.shape)
        self.dtype = np.dtype(store.dtype.numpy_dtype)
        self.chunks = tuple(store.chunk_layout.read_chunk.shape)

    @property
    def store(self) -> Any:
        if self._store is None:
            import tensorstore as ts

            spec = {"driver": "n5", "kvstore": {"driver": "file", "path": self.path}}
            self._store = ts.open(spec, read=True).result().T  # N5 is x,y,z: present z,y,x
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.store[key].read().result())

    def __setitem__(self, key: Any, value: Any) -> None:
        raise VoxblockError(f"{self.path}: voxblock does not write N5; write a .zarr output")

    def __repr__(self) -> str:
        return f"N5Source({self.path!r})"


def _n5_refused(where: str, key: str, value: Any, expected: str) -> VoxblockError:
    return VoxblockError(
        f"{where}: N5 attribute {key}={value!r} cannot be read ({expected}); voxblock does not guess "
        "where voxels are. Fix or remove the attribute"
    )


def _n5_numbers(where: str, key: str, value: Any, dims: int, positive: bool = False) -> list[float]:
    """One finite number per axis, as listed (x, y, z), or refused."""
    expected = f"expected {dims} {'positive ' if positive else ''}numbers, one per axis, x first"
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != dims:
        raise _n5_refused(where, key, value, expected)
    numbers = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _n5_refused(where, key, value, expected)
        if positive and v <= 0:
            raise _n5_refused(where, key, value, expected)
        numbers.append(float(v))
    return numbers


def _n5_strings(where: str, key: str, value: Any, dims: int) -> list[str]:
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != dims
        or not all(isinstance(v, str) for v in value)
    ):
        raise _n5_refused(where, key, value, f"expected {dims} strings, one per axis, x first")
    return list(value)


def _pixel_resolution(where: str, value: Any, dims: int) -> tuple[list[float], str | None]:
    """n5-viewer's `{"unit", "dimensions"}`, or n5-ij's plain list: (resolution x,y,z, unit or None)."""
    if isinstance(value, Mapping):
        if "dimensions" not in value:
            raise _n5_refused(where, "pixelResolution", value, 'no "dimensions"')
        unit = value.get("unit")
        if unit is not None and not isinstance(unit, str):
            raise _n5_refused(where, "pixelResolution", value, '"unit" is not a string')
        return _n5_numbers(where, "pixelResolution", value["dimensions"], dims, positive=True), unit or None
    return _n5_numbers(where, "pixelResolution", value, dims, positive=True), None


def _level_factors(where: str, groups: Sequence[Mapping[str, Any]], level: str, dims: int) -> list[float]:
    """A level's downsampling factors from a group's `scales` / `downsamplingFactors` (one list per level)."""
    for attrs in groups:
        for key in ("scales", "downsamplingFactors"):
            table = attrs.get(key)
            if table is None:
                continue
            match = re.fullmatch(r"s(\d+)", level)
            if not isinstance(table, Sequence) or isinstance(table, str):
                raise _n5_refused(where, key, table, "expected one list of factors per level")
            if match is None:
                continue  # not a level of that pyramid
            index = int(match.group(1))
            if index >= len(table):
                raise _n5_refused(where, key, table, f"no entry for level {level}")
            return _n5_numbers(where, key, table[index], dims, positive=True)
    return [1.0] * dims


def n5_geometry(
    attrs: Mapping[str, Any],
    dims: int,
    where: str,
    groups: Sequence[Mapping[str, Any]] = (),
    level: str = "",
) -> Geometry:
    """funlib's metadata from an N5 dataset's attributes (x,y,z order), for the array as z,y,x.

    `groups`: the attributes of the groups above the dataset, nearest first
    (n5-viewer's defaults); `level`: the dataset's name (`s1`). The
    conventions are those of the module docstring.
    """
    get = attrs.get
    names = _n5_strings(where, "axes", get("axes"), dims) if "axes" in attrs else None
    units = _n5_strings(where, "units", get("units"), dims) if "units" in attrs else None
    offset = _n5_numbers(where, "offset", get("offset"), dims) if "offset" in attrs else None

    # each convention's (voxel size, offset, units), x first
    found: dict[str, tuple[list[float], list[float] | None, list[str] | None]] = {}
    if "resolution" in attrs:
        found["resolution"] = (_n5_numbers(where, "resolution", get("resolution"), dims, True), offset, units)
    pixel_source = attrs if "pixelResolution" in attrs else None
    if pixel_source is None and not ({"resolution", "transform"} & set(attrs)):
        pixel_source = next((g for g in groups if "pixelResolution" in g), None)  # n5-viewer's defaults
    factors = None
    if "downsamplingFactors" in attrs:
        factors = _n5_numbers(where, "downsamplingFactors", get("downsamplingFactors"), dims, positive=True)
    if pixel_source is not None:
        resolution, unit = _pixel_resolution(where, pixel_source["pixelResolution"], dims)
        if factors is None:
            factors = _level_factors(where, groups, level, dims)
        pixel_units = units if units is not None else [unit] * dims if unit else None
        found["pixelResolution"] = ([r * f for r, f in zip(resolution, factors)], offset, pixel_units)
    elif "resolution" in attrs and factors is not None and any(f != 1 for f in factors):
        raise VoxblockError(
            f"{where}: N5 attributes resolution={list(get('resolution'))} and downsamplingFactors="
            f"{list(get('downsamplingFactors'))} on one dataset are read two ways (funlib and tensorstore "
            "take resolution as this level's voxel size; neuroglancer and Paintera multiply it by the "
            "factors); voxblock does not guess. Remove downsamplingFactors if resolution is this level's "
            "voxel size, or write the level's voxel size as resolution"
        )
    if "transform" in attrs:
        transform = get("transform")
        if not isinstance(transform, Mapping) or "scale" not in transform:
            raise _n5_refused(where, "transform", transform, 'expected an object with "scale"')
        order = transform.get("ordering", "C")
        if order not in ("C", "F"):
            raise _n5_refused(where, "transform", transform, 'ordering is neither "C" nor "F"')
        flip = (lambda v: list(v)[::-1]) if order == "C" else list  # CellMap lists C order (z,y,x)
        scale = flip(_n5_numbers(where, "transform.scale", transform["scale"], dims, positive=True))
        translate = transform.get("translate")
        begin = flip(_n5_numbers(where, "transform.translate", translate, dims)) if translate else None
        t_units = transform.get("units")
        t_units = flip(_n5_strings(where, "transform.units", t_units, dims)) if t_units else units
        found["transform"] = (scale, begin if begin is not None else offset, t_units)
        if transform.get("axes"):
            names = flip(_n5_strings(where, "transform.axes", transform["axes"], dims))

    # every convention present must place the voxels alike
    placed = {
        key: integer_geometry(
            where,
            [float(v) for v in size[::-1]],
            [float(v) for v in (begin or [0.0] * dims)[::-1]],
            [str(u) for u in (axis_units or [""] * dims)[::-1]],
        )
        for key, (size, begin, axis_units) in found.items()
    }
    if len({json.dumps(value) for value in placed.values()}) > 1:
        shown = "; ".join(f"{key}: voxel size {v[0]}, offset {v[1]} {v[2]}" for key, v in placed.items())
        raise VoxblockError(
            f"{where}: its N5 attributes place the voxels differently ({shown}, z first); fix one of them"
        )
    named: tuple[str, ...] = ()
    if placed:
        voxel_size, begin, spatial_units = next(iter(placed.values()))
        given = next(iter(found.values()))[2] or [""] * dims
        named = tuple(_ome_unit(str(u)) or "" for u in given[::-1])
    else:
        voxel_size, begin, spatial_units = integer_geometry(
            where,
            [1.0] * dims,
            [float(v) for v in (offset or [0.0] * dims)[::-1]],
            [str(u) for u in (units or [""] * dims)[::-1]],
        )
    axis_names = [str(n) for n in names[::-1]] if names else None
    if axis_names is None:
        axis_names = ["z", "y", "x"][-dims:] if dims <= 3 else [f"d{i}" for i in range(dims)]
    return Geometry(begin, voxel_size, axis_names, spatial_units, ["space"] * dims, (), named)


def _n5_groups(path: Path) -> list[dict[str, Any]]:
    """The attributes of the groups above an N5 dataset, nearest first, up to the container."""
    groups = []
    for folder in path.parents:
        attrs = _read_json(folder / "attributes.json")
        if attrs is not None:
            groups.append(attrs)
        if folder.suffix == ".n5":
            break
    return groups


def open_n5(path: str | Path, mode: str = "r") -> tuple[N5Source, Geometry]:
    """An N5 dataset for reading, and where it is."""
    where = str(path)
    if mode != "r":
        raise VoxblockError(
            f"{where}: voxblock does not write N5; name an output in a .zarr container instead"
        )
    try:
        import tensorstore  # noqa: F401
    except ImportError:
        raise VoxblockError(
            f"{where}: reading N5 needs tensorstore: pip install 'voxblock[n5]' "
            "(or convert the dataset to zarr first)"
        ) from None
    attrs = _read_json(Path(path) / "attributes.json")
    if attrs is None or "dimensions" not in attrs:
        raise VoxblockError(f"{where}: no N5 dataset (no attributes.json with dimensions)")
    dims = attrs["dimensions"]
    if not isinstance(dims, list):
        raise _n5_refused(where, "dimensions", dims, "expected a list of sizes")
    # the attributes first: tensorstore refuses some (resolution, units) in words of its own
    geometry = n5_geometry(attrs, len(dims), where, _n5_groups(Path(path)), Path(path).name)
    return N5Source(path, attrs), geometry


def n5_datasets(container: Path) -> list[str]:
    """The N5 datasets in `container`, for a hint."""
    found = []
    for meta in sorted(container.rglob("attributes.json")):
        attrs = _read_json(meta)
        if attrs and "dimensions" in attrs:
            found.append(str(meta.parent.relative_to(container)))
    return found[:20]
