"""Pure block arithmetic: context, fit modes, grid alignment.

Everything here is side-effect free so that it can be property-tested
against the real scheduler. ROIs are `funlib.geometry.Roi` in world units.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast

from funlib.geometry import Coordinate, Roi

from voxblock.errors import VoxblockError

Fit = Literal["valid", "overhang", "shrink"]
FITS: tuple[Fit, ...] = ("valid", "overhang", "shrink")


def check_fit(fit: str) -> Fit:
    if fit not in FITS:
        raise VoxblockError(f"fit must be one of {', '.join(FITS)}; got {fit!r}")
    return cast(Fit, fit)


def parse_coordinate(text: str, ndim: int | None = None) -> Coordinate:
    """'64,64,64' -> Coordinate; a single number is repeated to `ndim` axes."""
    try:
        values = [int(v) for v in str(text).replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise VoxblockError(f"expected integers like 64,64,64; got {text!r}") from None
    if not values:
        raise VoxblockError(f"expected integers like 64,64,64; got {text!r}")
    if len(values) == 1 and ndim is not None:
        values = values * ndim
    if ndim is not None and len(values) != ndim:
        raise VoxblockError(f"{text!r} has {len(values)} values; the data has {ndim} spatial axes")
    return Coordinate(values)


def parse_roi(text: str, ndim: int | None = None) -> tuple[Coordinate, Coordinate]:
    """'OFFSET:SHAPE' (e.g. '0,0,0:128,128,128') -> (offset, shape)."""
    if ":" not in text:
        raise VoxblockError(f"a ROI is OFFSET:SHAPE, e.g. 0,0,0:128,128,128; got {text!r}")
    offset, shape = text.split(":", 1)
    return parse_coordinate(offset, ndim), parse_coordinate(shape, ndim)


def _origin(origin: Sequence[int] | None, voxel_size: Coordinate) -> Coordinate:
    return Coordinate(origin) if origin is not None else Coordinate((0,) * len(voxel_size))


def is_on_grid(roi: Roi, voxel_size: Coordinate, origin: Sequence[int] | None = None) -> bool:
    """Whether `roi` starts at `origin` plus whole voxels and spans whole voxels.

    `origin` is where the grid starts: the input array's offset (which need not be a
    multiple of the voxel size: OME-NGFF pyramids put a level at a half-voxel translation);
    world 0 by default.
    """
    begin = _origin(origin, voxel_size)
    return all(
        (o - g) % v == 0 and s % v == 0 for o, s, g, v in zip(roi.offset, roi.shape, begin, voxel_size)
    )


def nearest_on_grid(roi: Roi, voxel_size: Coordinate, origin: Sequence[int] | None = None) -> tuple[Roi, Roi]:
    """(inside, around): the largest ROI on the grid inside `roi` and the smallest one around it."""
    begin = _origin(origin, voxel_size)
    up = [g + -(-(b - g) // v) * v for b, g, v in zip(roi.begin, begin, voxel_size)]
    down = [g + (b - g) // v * v for b, g, v in zip(roi.begin, begin, voxel_size)]
    end_down = [g + (e - g) // v * v for e, g, v in zip(roi.end, begin, voxel_size)]
    end_up = [g + -(-(e - g) // v) * v for e, g, v in zip(roi.end, begin, voxel_size)]
    inside = Roi(up, [max(e - b, 0) for b, e in zip(up, end_down)])
    return inside, Roi(down, [e - b for b, e in zip(down, end_up)])


def check_on_grid(what: str, roi: Roi, voxel_size: Coordinate, origin: Sequence[int] | None = None) -> None:
    """Refuse a ROI (as the user gave it) that is not on the grid of `voxel_size` from `origin`."""
    if roi.dims != len(voxel_size):
        raise VoxblockError(f"{what} {roi} has {roi.dims} axes; the data has {len(voxel_size)} spatial axes")
    if is_on_grid(roi, voxel_size, origin):
        return
    begin = _origin(origin, voxel_size)
    start = (
        f"the input's offset {tuple(begin)} plus multiples of the voxel size {tuple(voxel_size)}"
        if origin is not None
        else f"multiples of the voxel size {tuple(voxel_size)}"
    )
    inside, around = nearest_on_grid(roi, voxel_size, origin)
    nearest = f"{around}" if inside.empty else f"{inside} (inside it) or {around} (around it)"
    raise VoxblockError(
        f"{what} {roi} (world units) is off the voxel grid: ROIs must start at {start} "
        f"and their shape must be a multiple of the voxel size; the nearest on the grid: {nearest}"
    )


def check_block_on_grid(what: str, roi: Roi, write_roi: Roi, voxel_size: Coordinate) -> None:
    """Refuse a block ROI whose shape, or offset relative to the write ROI, is off the voxel grid.

    Blocks start at the total ROI: a read or write ROI's own offset matters only relative to
    the other's (the context), so it need not be on any grid of its own.
    """
    if roi.dims != len(voxel_size):
        raise VoxblockError(f"{what} {roi} has {roi.dims} axes; the data has {len(voxel_size)} spatial axes")
    shift = roi.begin - write_roi.begin
    if all(s % v == 0 and d % v == 0 for s, d, v in zip(roi.shape, shift, voxel_size)):
        return
    raise VoxblockError(
        f"{what} {roi} is off the voxel grid: its shape, and its offset relative to the write ROI "
        f"{write_roi} (the context), must be multiples of the voxel size {tuple(voxel_size)}"
    )


def check_blocking_on_grid(
    blocking: Blocking, voxel_size: Coordinate, origin: Sequence[int] | None = None
) -> None:
    """Refuse a blocking off the voxel grid that starts at `origin` (the input's offset; default world 0).

    The total ROI must be on that grid; the read and write ROIs only by their shapes and the
    context between them (blocks are placed from the total ROI).
    """
    check_on_grid("total ROI", blocking.total_roi, voxel_size, origin)
    check_block_on_grid("read ROI", blocking.read_roi, blocking.write_roi, voxel_size)
    check_block_on_grid("write ROI", blocking.write_roi, blocking.write_roi, voxel_size)


def context_of(read_roi: Roi, write_roi: Roi) -> tuple[Coordinate, Coordinate]:
    """The context (below, above) that the read ROI adds around the write ROI."""
    if read_roi.dims != write_roi.dims:
        raise VoxblockError(f"read ROI {read_roi} and write ROI {write_roi} have different dimensions")
    if not read_roi.contains(write_roi):
        raise VoxblockError(
            f"the read ROI {read_roi} must contain the write ROI {write_roi} "
            "(the read ROI is the write ROI plus its context)"
        )
    return write_roi.begin - read_roi.begin, read_roi.end - write_roi.end


@dataclass(frozen=True)
class Blocking:
    """How a task tiles its total ROI: the documented semantics of daisy's fit modes.

    Blocks start at `total_roi.begin` and step by the write shape. With
    `valid`, a block is kept only if its read ROI lies in the total ROI; with
    `overhang`, every block whose write ROI meets the written region is kept
    unchanged (it may read and write past the border); with `shrink`, those
    same blocks are clipped: the read ROI to the total ROI, the write ROI to
    the written region (the total ROI less the context).
    """

    total_roi: Roi
    read_roi: Roi
    write_roi: Roi
    fit: Fit = "valid"

    def __post_init__(self) -> None:
        check_fit(self.fit)
        if self.total_roi.dims != self.read_roi.dims:
            raise VoxblockError(
                f"total ROI {self.total_roi} and read ROI {self.read_roi} have different dimensions"
            )
        context_of(self.read_roi, self.write_roi)
        if self.write_roi.empty:
            raise VoxblockError(f"the write ROI {self.write_roi} is empty")

    @property
    def context(self) -> tuple[Coordinate, Coordinate]:
        return context_of(self.read_roi, self.write_roi)

    @property
    def target_roi(self) -> Roi:
        """The region a task is meant to write: the total ROI less the context."""
        below, above = self.context
        return self.total_roi.grow(-below, -above)

    def _axis_blocks(self, axis: int) -> list[tuple[int, int, int, int]]:
        """(read begin, read end, write begin, write end) of the blocks along one axis.

        The fit modes decide per axis (a block is kept, or clipped, on each
        axis alone), so the blocks are the product of these lists.
        """
        return [block for _, block in self._axis_span(axis, 0, sys.maxsize)]

    @functools.cached_property
    def _axes(self) -> tuple[tuple[int, ...], ...]:
        """Per axis, as plain integers: (blocks in the grid, total begin, total end, target begin,
        target end, read shape, write shape, context below). A batch's worker asks `_axis_span`
        for every batch: funlib's Roi arithmetic would cost more than daisy hands out a block."""
        target = self.target_roi
        axes = []
        for d in range(self.total_roi.dims):
            stride = self.write_roi.shape[d]
            grid = -(-target.shape[d] // stride) if not target.empty else 0
            below = self.write_roi.begin[d] - self.read_roi.begin[d]
            axes.append(
                (
                    grid,
                    self.total_roi.begin[d],
                    self.total_roi.end[d],
                    target.begin[d],
                    target.end[d],
                    self.read_roi.shape[d],
                    stride,
                    below,
                )
            )
        return tuple(axes)

    def _axis_span(self, axis: int, start: int, stop: int) -> list[tuple[int, tuple[int, int, int, int]]]:
        """(i, block) for blocks start..stop-1 of the grid along one axis that the fit keeps (see
        `_axis_blocks`). The kept blocks are always the first ones of the grid: i is also the
        block's index among them."""
        grid, total_b, total_e, target_b, target_e, read_shape, stride, below = self._axes[axis]
        kept = []
        for i in range(max(start, 0), min(stop, grid)):
            read_b = total_b + i * stride
            read_e, write_b = read_b + read_shape, read_b + below
            write_e = write_b + stride
            if self.fit == "valid":
                if total_b <= read_b and read_e <= total_e:
                    kept.append((i, (read_b, read_e, write_b, write_e)))
            elif write_b < target_e and target_b < write_e:
                if self.fit == "overhang":
                    kept.append((i, (read_b, read_e, write_b, write_e)))
                else:
                    clipped = (
                        max(read_b, total_b),
                        min(read_e, total_e),
                        max(write_b, target_b),
                        min(write_e, target_e),
                    )
                    kept.append((i, clipped))
        return kept

    def block_id(self, write_roi: Roi) -> int:
        """The id daisy gives the block of this tiling whose write ROI is `write_roi` (clipped or
        not: clipping keeps its start): `grid_block_id` of where it starts, in write blocks from
        the total ROI's start."""
        begin, stride = write_roi.begin - self.total_roi.begin, self.write_roi.shape
        return grid_block_id([b // s for b, s in zip(begin, stride)])

    @property
    def tracking_shift(self) -> tuple[int, ...]:
        """Per axis, where grid block 0 lies in daisy's done-marker and failure-count arrays:
        daisy indexes them like `block_id`, in write blocks from the total ROI's start, so block
        i of an axis is cell i + context below // write shape."""
        below, _ = self.context
        return tuple(int(b) // int(w) for b, w in zip(below, self.write_roi.shape))

    def axis_count(self, axis: int) -> int:
        """Blocks kept along one axis (`num_blocks` is their product)."""
        t, r, s = self.total_roi.shape[axis], self.read_roi.shape[axis], self.write_roi.shape[axis]
        if self.target_roi.empty:
            return 0
        if self.fit == "valid":
            return (t - r) // s + 1 if t >= r else 0
        return -(-self.target_roi.shape[axis] // s)

    def blocks(self) -> list[tuple[Roi, Roi]]:
        """(read ROI, write ROI) of every block the task runs, in grid order."""
        axes = [self._axis_blocks(d) for d in range(self.total_roi.dims)]
        return [_block(combination) for combination in itertools.product(*axes)]

    def first_block(self) -> tuple[Roi, Roi] | None:
        """The first block of `blocks()`, without listing them all."""
        axes = [self._axis_blocks(d) for d in range(self.total_roi.dims)]
        return _block([axis[0] for axis in axes]) if all(axes) else None

    @property
    def num_blocks(self) -> int:
        """len(self.blocks()), by arithmetic (per axis), so millions of blocks cost nothing."""
        return math.prod(self.axis_count(d) for d in range(self.total_roi.dims))

    @property
    def written_roi(self) -> Roi:
        """The bounding box of what the task writes, clipped to the target region."""
        axes = [self._axis_blocks(d) for d in range(self.total_roi.dims)]
        if not all(axes):
            return Roi(self.total_roi.begin, (0,) * self.total_roi.dims)
        begin = Coordinate(min(b[2] for b in axis) for axis in axes)
        end = Coordinate(max(b[3] for b in axis) for axis in axes)
        return Roi(begin, end - begin).intersect(self.target_roi)

    def clip(self, read_roi: Roi, write_roi: Roi) -> tuple[Roi, Roi]:
        """A block of this tiling as `fit="shrink"` hands it out: the read ROI clipped to the
        total ROI, the write ROI to the target region (what daisy's shrink does)."""
        return read_roi.intersect(self.total_roi), write_roi.intersect(self.target_roi)

    def chunk_misalignment(self, array_roi: Roi, unit_world: Coordinate) -> str | None:
        """Why two blocks could write into one write unit (chunk or shard) of an array, or None.

        Blocks that run concurrently must each own whole write units: two
        writers of one chunk, or of one shard, overwrite each other's part.
        """
        for d in range(self.total_roi.dims):
            if self.write_roi.shape[d] % unit_world[d] != 0:
                return (
                    f"the write block {tuple(self.write_roi.shape)} is not a multiple of "
                    f"{tuple(unit_world)} (world units)"
                )
        first = self.first_block()
        for _, write in [first] if first is not None else []:
            for d in range(self.total_roi.dims):
                if (write.begin[d] - array_roi.begin[d]) % unit_world[d] != 0:
                    return (
                        f"write blocks start at {tuple(write.begin)}, which is not on the "
                        f"grid of {tuple(unit_world)} world units from the output's origin "
                        f"{tuple(array_roi.begin)}"
                    )
        return None


def check_batch(batch: int | Sequence[int], dims: int) -> Coordinate:
    """The `batch` option as blocks per side on each of `dims` axes (an int is every axis's)."""
    values = [batch] * dims if isinstance(batch, numbers.Integral) else batch
    if (
        isinstance(values, (str, bytes))
        or not isinstance(values, Sequence)
        or len(values) != dims
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in values)
    ):
        raise VoxblockError(f"batch must be an integer >= 1 or {dims} of them (blocks per side): {batch!r}")
    return Coordinate(int(v) for v in values)


def grid_block_id(index: Sequence[int]) -> int:
    """The id daisy gives the block at `index` of its block grid: the Cantor number of the index
    (daisy 1's `cantor_number`, which daisy 2 keeps: done markers and failures are keyed by it)."""
    if len(index) == 1:
        return int(index[0])
    return math.comb(sum(index) + len(index) - 1, len(index)) + grid_block_id(index[:-1])


class Box(NamedTuple):
    """A ROI as plain integers, which daisy.Block takes too: a funlib Roi costs more to make
    than daisy takes to hand out a block, and a batch's worker makes two per block."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Batch:
    """One block of `Batching.blocking` inside a batch: its ROIs as that blocking's fit hands it
    out, its id (the unbatched run's), and its index among that blocking's blocks per axis."""

    read: Box
    write: Box
    block_id: int
    index: tuple[int, ...]

    @property
    def read_roi(self) -> Roi:
        return Roi(*self.read)

    @property
    def write_roi(self) -> Roi:
        return Roi(*self.write)


@dataclass(frozen=True)
class Batching:
    """`blocking` scheduled `batch` blocks per side at a time: the scheduler hands out fewer,
    bigger blocks (`scheduled`), each run as the blocks of `blocking` inside it (`blocks_in`).

    A scheduled block writes k write blocks per side and reads them grown by the same context;
    big block i starts where block i·k does, so it holds blocks [i·k, i·k + k) on each axis. It
    is scheduled with fit="overhang", so that every block is in one; `blocks_in` then drops the
    blocks `blocking`'s fit does not keep and clips those it clips. With fit="valid" the total
    ROI is cut to the blocks that fit, so that no scheduled block holds none.
    """

    blocking: Blocking
    batch: Coordinate

    @property
    def scheduled(self) -> Blocking:
        """The blocking the scheduler runs: one block per batch."""
        small = self.blocking
        grow = small.write_roi.shape * (self.batch - Coordinate((1,) * len(self.batch)))
        write = Roi(small.write_roi.begin, small.write_roi.shape + grow)
        read = Roi(small.read_roi.begin, small.read_roi.shape + grow)
        total = small.total_roi
        if small.fit == "valid":
            below, above = small.context
            counts = Coordinate(small.axis_count(d) for d in range(total.dims))
            total = Roi(total.begin, below + above + counts * small.write_roi.shape)
        return Blocking(total, read, write, "overhang")

    def axis_sizes(self, axis: int) -> list[int]:
        """Blocks of `blocking` in each batch along one axis (the scheduled grid's order)."""
        count, k = self.blocking.axis_count(axis), self.batch[axis]
        return [min(k, count - j) for j in range(0, count, k)]

    @property
    def max_blocks(self) -> int:
        """The most blocks one batch holds."""
        dims = range(self.blocking.total_roi.dims)
        return max(1, math.prod(min(self.batch[d], self.blocking.axis_count(d)) for d in dims))

    @property
    def num_batches(self) -> int:
        return math.prod(len(self.axis_sizes(d)) for d in range(self.blocking.total_roi.dims))

    def done_blocks(self, done: Any) -> int:
        """Blocks of `blocking` in the batches that daisy's done-marker array `done` marks done.

        Batch i of an axis is its cell i + the scheduled blocking's `tracking_shift`."""
        import numpy as np

        shift = self.scheduled.tracking_shift
        count = (np.asarray(done) > 0).astype(np.int64)
        for axis in range(count.ndim):
            sizes = self.axis_sizes(axis)
            first = shift[axis]
            weights = np.zeros(count.shape[axis], np.int64)
            kept = max(0, min(len(sizes), count.shape[axis] - first))
            weights[first : first + kept] = sizes[:kept]
            count = count * weights.reshape([-1 if d == axis else 1 for d in range(count.ndim)])
        return int(count.sum())

    def blocks_in(self, write_roi: Roi) -> list[Batch]:
        """The blocks of `blocking` (as its fit hands them out) in the scheduled block whose write
        ROI is `write_roi` (the unbatched run's blocks: see tests/test_batching.py), grid order.
        Run for every batch by its worker: plain integers per axis, Rois only at the end."""
        small = self.blocking
        axes = []
        for d, begin in enumerate(write_roi.begin):
            _, total, _, first, _, _, stride, _ = small._axes[d]
            start = (begin - first) // stride
            spans = small._axis_span(d, start, start + self.batch[d])
            # (its daisy grid index: where its write ROI starts, as in Blocking.block_id)
            axes.append([(i, (block[2] - total) // stride, block) for i, block in spans])
        found = []
        for combination in itertools.product(*axes):
            read_b, read_e, write_b, write_e = zip(*(block for _, _, block in combination))
            read = Box(read_b, tuple(e - b for b, e in zip(read_b, read_e)))
            write = Box(write_b, tuple(e - b for b, e in zip(write_b, write_e)))
            block_id = grid_block_id([cell for _, cell, _ in combination])
            found.append(Batch(read, write, block_id, tuple(i for i, _, _ in combination)))
        return found


def daisy_links_unread_blocks(down: Blocking, up: Blocking) -> bool:
    """Whether daisy 2 would link blocks of `up` to shrunk blocks of `down` that do not read them.

    daisy 2.0's `DependencyGraph.downstream(up_block)` asks the downstream task's graph for the
    blocks whose read ROIs meet the upstream block's write ROI (`get_subgraph_blocks(write_roi,
    read_roi=True)`): it grows that write ROI by the downstream context, intersects it with the
    downstream's total write ROI, and rounds the result out to whole write blocks. Where the
    intersection is empty because the upstream block lies past the end of that total write ROI,
    but starts inside the last (partial) write block of it, the rounding still yields that
    block: a shrunk downstream block that reads nothing of the upstream block is listed as its
    downstream, while `upstream()` (from the shrunk read ROI) leaves the upstream block out. The
    scheduler then readies such a block once more when the extra upstream block completes: it is
    handed out twice (the second time "already done" by its done marker), the task's count of
    completed blocks reaches its total early, and as many other blocks are never handed out. A
    run ends "done" with holes.

    That happens only with `down.fit == "shrink"` (an overhanging block really reads there; a
    valid fit keeps no partial block), on an axis where the downstream's target region is not a
    whole number of write blocks and an upstream block's write ROI, less the downstream's
    context below, starts in [target end, end of the last whole write block). True is
    conservative: daisy also needs the upstream block to meet that block on the other axes.
    """
    if down.fit != "shrink":
        return False
    target = down.target_roi
    if target.empty or up.total_roi.dims != target.dims:
        return False
    below, _ = down.context
    for axis in range(target.dims):
        stride = down.write_roi.shape[axis]
        begin, end = target.begin[axis], target.end[axis]
        rounded = begin + -(-(end - begin) // stride) * stride
        if rounded == end:
            continue
        if any(end <= write_b - below[axis] < rounded for _, _, write_b, _ in up._axis_blocks(axis)):
            return True
    return False


def _block(per_axis: Sequence[tuple[int, int, int, int]]) -> tuple[Roi, Roi]:
    """(read ROI, write ROI) from (read begin, read end, write begin, write end) on each axis."""
    read_b, read_e, write_b, write_e = zip(*per_axis)
    return (
        Roi(read_b, tuple(e - b for b, e in zip(read_b, read_e))),
        Roi(write_b, tuple(e - b for b, e in zip(write_b, write_e))),
    )


def roi_slices(roi: Roi, origin: Sequence[int], voxel_size: Sequence[int]) -> tuple[slice, ...]:
    """The voxels of `roi` (world units, on the grid) as slices of the spatial axes of an array
    whose first voxel is at world `origin`: e.g. a block's write ROI inside data read over its
    read ROI, `roi_slices(write_roi, read_roi.begin, voxel_size)`."""
    origin, voxel_size = Coordinate(origin), Coordinate(voxel_size)
    begin = (roi.begin - origin) / voxel_size
    end = (roi.end - origin) / voxel_size
    return tuple(slice(b, e) for b, e in zip(begin, end))


def affinity_offsets(offsets: Any, affinities: Any, who: str, name: str) -> list[list[int]]:
    """The voxel offsets of `affinities`' channels (channels first): those given, else its
    'offsets' attribute, one integer vector of its spatial dimensions per channel (refused
    otherwise, naming `who`)."""
    if not offsets:
        offsets = dict(affinities.attrs).get("offsets")
        if not offsets:
            raise VoxblockError(
                f"{who}: no offsets given and affinities {name} have no 'offsets' attribute; "
                "pass offsets=[[1, 0, 0], [0, 1, 0], [0, 0, 1]] (one per affinity channel)"
            )
    ndim = affinities.spatial_dims

    def whole(value: Any) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if not isinstance(offsets, (list, tuple)) or not all(
        isinstance(o, (list, tuple)) and len(o) == ndim and all(whole(v) for v in o) for o in offsets
    ):
        raise VoxblockError(f"{who}: offsets must be a list of {ndim}-D integer offsets; got {offsets!r}")
    if len(offsets) != affinities.shape[0]:
        raise VoxblockError(
            f"{who}: {len(offsets)} offsets for {affinities.shape[0]} affinity channels in {name}"
        )
    return [[int(v) for v in o] for o in offsets]


def check_affinities(affinities: Any, name: str, who: str = "") -> None:
    """Affinities are channels first, one per offset, float in 0..1 or uint8 in 0..255: the one
    check of the watershed worker, the region graph pass and agglomerate_blockwise."""
    import numpy as np

    if affinities.channel_dims != 1:
        raise VoxblockError(
            f"{who}affinities {name} must have one channel axis (channels first, one channel per "
            f"offset); it has {affinities.channel_dims}"
        )
    dtype = np.dtype(affinities.dtype)
    if dtype != np.uint8 and dtype.kind != "f":
        raise VoxblockError(
            f"{who}affinities {name} have dtype {dtype}; affinities must be float (0..1) or uint8 (0..255)"
        )


def context_shell(read_roi: Roi, write_roi: Roi) -> list[Roi]:
    """The read ROI less the write ROI, as disjoint boxes (two per axis at most).

    Box `2d` / `2d + 1` lies below / above the write ROI on axis d, spans the
    write ROI on the axes before d and the read ROI on the axes after.
    """
    boxes = []
    for axis in range(read_roi.dims):
        for low, high in (
            (read_roi.begin[axis], write_roi.begin[axis]),
            (write_roi.end[axis], read_roi.end[axis]),
        ):
            if high <= low:
                continue
            begin = [*write_roi.begin[:axis], low, *read_roi.begin[axis + 1 :]]
            end = [*write_roi.end[:axis], high, *read_roi.end[axis + 1 :]]
            boxes.append(Roi(begin, [e - b for b, e in zip(begin, end)]))
    return boxes
