"""Hypothesis strategies for block geometry on a voxel grid.

`blockings()` draws a whole blockwise setup: `BlockingCase(total_roi,
read_roi, write_roi, fit, voxel_size)` of 1-3 spatial axes with small
sizes, everything on the voxel grid. The smaller strategies (voxel sizes,
block shapes, contexts, ROIs, fit modes) compose into it and can be used
on their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from funlib.geometry import Coordinate, Roi
from hypothesis import assume
from hypothesis import strategies as st

from voxblock.geometry import FITS, Blocking, Fit

__all__ = [
    "BlockingCase",
    "block_shapes",
    "blockings",
    "contexts",
    "dims",
    "fit_modes",
    "grid_rois",
    "voxel_sizes",
]


@dataclass(frozen=True)
class BlockingCase:
    """One drawn setup. ROIs are in world units, on the `voxel_size` grid."""

    total_roi: Roi
    read_roi: Roi
    write_roi: Roi
    fit: Fit
    voxel_size: Coordinate

    @property
    def blocking(self) -> Blocking:
        return Blocking(self.total_roi, self.read_roi, self.write_roi, self.fit)

    @property
    def context(self) -> tuple[Coordinate, Coordinate]:
        return self.blocking.context


def dims(min_dims: int = 1, max_dims: int = 3) -> st.SearchStrategy[int]:
    return st.integers(min_dims, max_dims)


def fit_modes() -> st.SearchStrategy[Fit]:
    return st.sampled_from(FITS)


def voxel_sizes(ndim: int, max_size: int = 3) -> st.SearchStrategy[Coordinate]:
    """A voxel size of `ndim` axes, each 1..max_size world units."""
    return st.tuples(*[st.integers(1, max_size)] * ndim).map(Coordinate)


def _on_grid(values: st.SearchStrategy[tuple[int, ...]], voxel_size: Coordinate):
    return values.map(lambda v: Coordinate(v) * voxel_size)


def block_shapes(voxel_size: Coordinate, max_voxels: int = 4) -> st.SearchStrategy[Coordinate]:
    """A write-block shape in world units: 1..max_voxels voxels per axis."""
    return _on_grid(st.tuples(*[st.integers(1, max_voxels)] * len(voxel_size)), voxel_size)


def contexts(
    voxel_size: Coordinate, max_voxels: int = 2, symmetric: bool | None = None
) -> st.SearchStrategy[tuple[Coordinate, Coordinate]]:
    """A context (below, above) in world units: 0..max_voxels voxels per side and axis.

    `symmetric`: True for equal sides, False for independent ones, None for either.
    """
    side = _on_grid(st.tuples(*[st.integers(0, max_voxels)] * len(voxel_size)), voxel_size)
    both = st.tuples(side, side)
    equal = side.map(lambda c: (c, c))
    if symmetric is True:
        return equal
    if symmetric is False:
        return both
    return st.one_of(equal, both)


def grid_rois(
    voxel_size: Coordinate, max_offset_voxels: int = 6, max_shape_voxels: int = 12, min_shape_voxels: int = 0
) -> st.SearchStrategy[Roi]:
    """A ROI on the voxel grid (world units), offset possibly negative."""
    n = len(voxel_size)
    offset = _on_grid(st.tuples(*[st.integers(-max_offset_voxels, max_offset_voxels)] * n), voxel_size)
    shape = _on_grid(st.tuples(*[st.integers(min_shape_voxels, max_shape_voxels)] * n), voxel_size)
    return st.builds(Roi, offset, shape)


@st.composite
def blockings(
    draw,
    ndims: st.SearchStrategy[int] | None = None,
    fits: st.SearchStrategy[Fit] | None = None,
    max_voxel_size: int = 3,
    max_write_voxels: int = 4,
    max_context_voxels: int = 2,
    max_blocks: int = 4,
    min_blocks: int = 0,
) -> BlockingCase:
    """A blockwise setup: total ROI, read ROI, write ROI, fit mode, voxel size.

    The total ROI spans the read ROI plus up to `max_blocks` write strides
    and a remainder that leaves a partial block at the end (where the fit
    modes differ); it may also be smaller than one read ROI. The read ROI
    has an arbitrary offset (daisy uses only the read and write ROIs'
    relative position). With `min_blocks`, setups with fewer blocks than
    that (by `Blocking.blocks()`) are filtered out.
    """
    ndim = draw(ndims if ndims is not None else dims())
    voxel_size = draw(voxel_sizes(ndim, max_voxel_size))
    fit = draw(fits if fits is not None else fit_modes())
    write_shape = draw(block_shapes(voxel_size, max_write_voxels))
    below, above = draw(contexts(voxel_size, max_context_voxels))
    read_offset = draw(
        _on_grid(st.tuples(*[st.integers(-3, 3)] * ndim), voxel_size),
        label="read offset",
    )
    read_roi = Roi(read_offset, below + write_shape + above)
    write_roi = Roi(read_offset + below, write_shape)
    total_offset = draw(_on_grid(st.tuples(*[st.integers(-6, 6)] * ndim), voxel_size), label="total offset")
    total_shape = []
    for d in range(ndim):
        steps = draw(st.integers(0, max_blocks - 1), label=f"steps {d}")
        remainder = draw(st.integers(-(write_shape[d] // voxel_size[d]), write_shape[d] // voxel_size[d] - 1))
        voxels = (read_roi.shape[d] + steps * write_shape[d]) // voxel_size[d] + remainder
        total_shape.append(max(voxels, 0) * voxel_size[d])
    case = BlockingCase(
        total_roi=Roi(total_offset, total_shape),
        read_roi=read_roi,
        write_roi=write_roi,
        fit=fit,
        voxel_size=voxel_size,
    )
    if min_blocks > 0:
        assume(len(case.blocking.blocks()) >= min_blocks)
    return case
