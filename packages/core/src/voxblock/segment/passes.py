"""The segmentation's passes, as workers: what runs in a worker process.

`SegmentBlocks` (pass 1 with context: fragments and merge edges), `StitchFaces` (pass 1 at
faces: outer layers and contact edges), `SolveLut` (pass 2: every edge -> one table) and
`LabelSegments` (pass 3 at faces: label again, write segment IDs). Pass 3 with context is the
relabel worker (voxblock-workers). `segment.pipeline` composes them.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from funlib.geometry import Coordinate

from voxblock import arrays
from voxblock.errors import VoxblockError
from voxblock.geometry import Blocking, check_blocking_on_grid, context_shell
from voxblock.segment import faces as face_stitching
from voxblock.segment import hierarchy
from voxblock.segment.edges import block_edges, contact_edges, select_edges
from voxblock.segment.functions import SegmentFunction
from voxblock.segment.ids import BlockGrid, to_global
from voxblock.segment.storage import EDGES, EdgeWriter, blocks_with_edges, read_edge_record
from voxblock.workers import ArrayWorker, Preparation, Worker, crop_to, option, prepare_output

# Each block's own labels and the largest, by block index, from pass 1 at faces to pass 3 while a
# small segmentation runs both in the driver (`segment.pipeline.fits_in_driver`, a built-in
# function, so the same labels either way): every block is read and labelled once, not twice.
# Taken out as pass 3 uses them; a block missing (pass 1 done by an earlier run) is labelled again.
OWN_LABELS: ContextVar[dict[int, tuple[np.ndarray, int]] | None] = ContextVar(
    "voxblock_own_labels", default=None
)


@dataclass
class Labelling(Worker):
    """What the passes that run the segment function share: the function, its input, the grid."""

    fit = "overhang"
    preload = ("cc3d", "fastremap")

    function: str = option("", help="segment function file, threshold-label, or a worker name")
    parameters: dict = option({}, help="parameters of the segment function")
    input: str = option("")
    grid: dict = option({}, help="the block grid and ID range (segment.ids.BlockGrid)")
    region: list = option([], help="[offset, shape] segmented: the function reads zeros outside it")

    def segment_function(self) -> SegmentFunction:
        return SegmentFunction(self.function, dict(self.parameters), self.region or None).load()


@dataclass
class SegmentBlocks(Labelling):
    """Pass 1: label each block with context; keep its write ROI; record edges."""

    name = "segment-fragments"
    read_write_conflict = True

    fragments: str = option("")
    edge_dir: str = option("")

    def outputs(self) -> list[str]:
        return [self.fragments]

    def context_inputs(self) -> list[str]:
        return [self.input]

    def context_outputs(self) -> list[str]:
        return [self.fragments]  # read back over each block's context: neighbours' fragments

    def prepare(self, preparation: Preparation) -> None:
        function = self.segment_function()
        source = arrays.open_input(self.input)
        blocking = preparation.blocking
        check_blocking_on_grid(blocking, source.voxel_size, source.offset)
        _preview(function, source, blocking)
        prepare_output(
            preparation,
            source,
            arrays.OutputSpec.like(
                source, self.fragments, BlockGrid.from_dict(self.grid).id_dtype, blocking.written_roi
            ),
        )
        Path(self.edge_dir).mkdir(parents=True, exist_ok=True)

    def setup(self) -> None:
        self._function = self.segment_function()
        self._source = arrays.open_input(self.input)
        self._fragments = arrays.open_output(self.fragments)
        self._grid = BlockGrid.from_dict(self.grid)
        self._edges = EdgeWriter(self.edge_dir)

    def process(self, block: Any) -> None:
        import fastremap

        voxel_size = self._fragments.voxel_size
        local = check_labels(self._function(self._source, block), block, voxel_size)
        if local.dtype == bool:
            local = local.view(np.uint8)
        if int(local.max(initial=0)) > self._grid.id_range:  # IDs past the block's range: compact them
            local, _ = fastremap.renumber(np.ascontiguousarray(local), preserve_zero=True)
        index = self._grid.index(block.write_roi)
        read_roi, write_roi = block.read_roi, block.write_roi
        inner = crop_to(local, read_roi, write_roi, voxel_size)
        ids_dtype = self._fragments.dtype
        arrays.write(self._fragments, write_roi, self._grid.to_global(inner, write_roi, ids_dtype))
        # the context: what this block's labels say about fragments neighbours wrote there
        own, theirs = [], []
        for box in context_shell(read_roi, write_roi):
            own.append(
                self._grid.to_global(crop_to(local, read_roi, box, voxel_size), write_roi, ids_dtype).ravel()
            )
            theirs.append(arrays.read(self._fragments, box).ravel())
        edges = block_edges(np.concatenate(own), np.concatenate(theirs))
        present = np.flatnonzero(np.bincount(inner.ravel()))
        ids = self._grid.to_global(present[present > 0], write_roi, ids_dtype)
        self._edges.save(index, edges, ids)


def check_labels(labels: Any, block: Any, voxel_size: Coordinate) -> np.ndarray:
    labels = np.asarray(labels)
    expected = tuple(block.read_roi.shape / voxel_size)
    if labels.shape != expected:
        raise VoxblockError(
            f"the segment function returned shape {labels.shape}; it must label the block's "
            f"whole read ROI, shape {expected}"
        )
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise VoxblockError(f"the segment function returned dtype {labels.dtype}; labels must be integers")
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.min(initial=0) < 0:
        raise VoxblockError("the segment function returned negative labels")
    return labels


def _preview(function: SegmentFunction, source: Any, blocking: Blocking, own: bool = False) -> None:
    """Run the function on the first block in the driver: a wrong shape or dtype fails now.

    `own`: the function sees the block's write ROI alone (stitching at faces).
    """
    import daisy.v2 as daisy

    first = blocking.first_block()
    if first is None:
        raise VoxblockError(f"no block fits in the total ROI {blocking.total_roi}")
    read, write = first
    block = daisy.Block(blocking.total_roi, write if own else read, write)
    try:
        labels = function(source, block)
    except VoxblockError:
        raise
    except Exception as error:
        raise VoxblockError(f"the segment function failed on the first block {write}: {error!r}") from error
    check_labels(labels, block, source.voxel_size)


def own_block(block: Any) -> Any:
    """The block as the segment function sees it when stitching at faces: its write ROI alone."""
    import daisy.v2 as daisy

    return daisy.Block(block.write_roi, block.write_roi, block.write_roi)


def own_labels(function: SegmentFunction, source: Any, block: Any, grid: BlockGrid) -> tuple[np.ndarray, int]:
    """The function's labels of the block's write ROI alone, checked, as integers; the largest."""
    own = own_block(block)
    labels = check_labels(function(source, own), own, source.voxel_size)
    if labels.dtype == bool:
        labels = labels.view(np.uint8)
    largest = int(labels.max(initial=0))
    if largest > grid.id_range:
        raise VoxblockError(
            f"the segment function returned label {largest}; a block holds at most {grid.id_range}"
        )
    return labels, largest


def block_segments(
    fragments: np.ndarray, segments: np.ndarray, first: int, count: int, id_range: int
) -> np.ndarray:
    """The lookup table of one block whose labels are 1..count and whose IDs start at `first`:
    index k holds label k's segment (0 for 0). `fragments` is sorted, as the solve writes it.

    A block labelled again must have exactly the fragments it had in pass 1: anything else is a
    function that is not deterministic or a stale table, and is refused, never mislabelled.
    """
    start = int(np.searchsorted(fragments, first))
    found = fragments[start : start + count]
    after = int(fragments[start + count]) if start + count < fragments.size else 0
    expected = found.size == count and (count == 0 or (found[0] == first and found[-1] == first + count - 1))
    if not expected or first + count <= after < first + id_range:
        raise VoxblockError(
            f"the block has {count} labels now but a different set in the first pass: the segment "
            "function is not deterministic, or the run directory is stale (fresh=True)"
        )
    table = np.zeros(count + 1, np.uint64)
    table[1:] = segments[start : start + count]
    return table


@dataclass
class StitchFaces(Labelling):
    """Pass 1 at faces: label each block alone; keep its outer layers; edges to done neighbours."""

    name = "segment-faces"
    # touching blocks (their read ROIs reach one voxel into each other) never run at once:
    # of two neighbours the later one finds the other's faces and records their edges
    read_write_conflict = True

    face_dir: str = option("")
    edge_dir: str = option("")
    rank: int = option(1, help="connectivity rank: 1 faces only ... ndim fully connected")

    def prepare(self, preparation: Preparation) -> None:
        source = arrays.open_input(self.input)
        check_blocking_on_grid(preparation.blocking, source.voxel_size, source.offset)
        _preview(self.segment_function(), source, preparation.blocking, own=True)
        Path(self.face_dir).mkdir(parents=True, exist_ok=True)
        Path(self.edge_dir).mkdir(parents=True, exist_ok=True)

    def setup(self) -> None:
        self._function = self.segment_function()
        self._source = arrays.open_input(self.input)
        self._grid = BlockGrid.from_dict(self.grid)
        self._dtype = self._grid.id_dtype
        self._directions = face_stitching.offsets(self._source.voxel_size.dims, self.rank)
        self._faces = face_stitching.BlockFaces(self.face_dir, self._dtype)
        self._edges = EdgeWriter(self.edge_dir)

    def process(self, block: Any) -> None:
        grid, dtype, write_roi = self._grid, self._dtype, block.write_roi
        labels, largest = own_labels(self._function, self._source, block, grid)
        index = grid.index(write_roi)
        kept = OWN_LABELS.get()
        if kept is not None:
            kept[index] = (labels, largest)
        # faces are kept with the block's own labels: a reader adds the block's ID offset
        own_faces = face_stitching.faces(labels)
        self._faces.save(index, own_faces, labels.shape)
        others = {d: grid.neighbour(write_roi, d) for d in self._directions}
        done = self._faces.look_up([other for other in others.values() if other is not None])
        neighbours = {}
        for direction, other in others.items():
            if other in done:
                layer = face_stitching.facing_layer(done[other], direction)
                neighbours[direction] = to_global(layer, other, grid.id_range, dtype)
        padded = face_stitching.padded_boundary(labels.shape, own_faces, neighbours, dtype)
        own, theirs = face_stitching.touching_pairs(padded, self.rank)
        edges = contact_edges(to_global(own, index, grid.id_range, dtype), theirs)
        # labels are consecutive from 1 (threshold-label): the block's fragments are 1..largest
        ids = to_global(np.arange(1, largest + 1, dtype=dtype), index, grid.id_range, dtype)
        self._edges.save(index, edges, ids)


@dataclass
class LabelSegments(Labelling):
    """Pass 3 at faces: label each block again, as in pass 1, and write its segment IDs."""

    name = "segment-labels"

    output: str = option("")
    table_dir: str = option("", help="the solve's records: every block's own table")

    def outputs(self) -> list[str]:
        return [self.output]

    def prepare(self, preparation: Preparation) -> None:
        source = arrays.open_input(self.input)
        prepare_output(
            preparation,
            source,
            arrays.OutputSpec.like(source, self.output, np.uint64, preparation.blocking.target_roi),
        )

    def setup(self) -> None:
        self._function = self.segment_function()
        self._source = arrays.open_input(self.input)
        self._output = arrays.open_output(self.output)
        self._grid = BlockGrid.from_dict(self.grid)
        self._tables = hierarchy.PackStore(self.table_dir)

    def process(self, block: Any) -> None:
        index = self._grid.index(block.write_roi)
        kept = OWN_LABELS.get()
        labelled = kept.pop(index, None) if kept is not None else None
        if labelled is None:
            labelled = own_labels(self._function, self._source, block, self._grid)
        labels, largest = labelled
        first = index * self._grid.id_range + 1
        fragments, segments = hierarchy.block_lut(self._tables, index)
        try:
            table = block_segments(fragments, segments, first, largest, self._grid.id_range)
        except VoxblockError as error:
            raise VoxblockError(f"block {block.write_roi}: {error}") from None
        segments = table[labels]
        roi = block.write_roi.intersect(self._output.roi)
        arrays.write(self._output, roi, crop_to(segments, block.write_roi, roi, self._output.voxel_size))


@dataclass
class RelabelFragments(ArrayWorker):
    """Pass 3 with context: every block's fragments -> segments, through the block's own table
    (what the solve wrote for it), never the whole one."""

    name = "segment-relabel"
    fit = "shrink"

    grid: dict = option({}, help="the block grid and ID range (segment.ids.BlockGrid)")
    table_dir: str = option("", help="the solve's records: every block's own table")

    def output_dtype(self, source: Any) -> np.dtype:
        return np.dtype(np.uint64)  # fragments may be uint32; segment IDs are uint64

    def setup(self) -> None:
        super().setup()
        self._grid = BlockGrid.from_dict(self.grid)
        self._tables = hierarchy.PackStore(self.table_dir)

    def compute(self, data: np.ndarray, block: Any) -> np.ndarray:
        fragments, segments = hierarchy.block_lut(self._tables, self._grid.index(block.write_roi))
        flat = data.ravel()
        where = np.searchsorted(fragments, flat).clip(0, max(fragments.size - 1, 0))
        found = (flat > 0) & (fragments[where] == flat) if fragments.size else np.zeros(flat.size, bool)
        if not (found | (flat == 0)).all():
            raise VoxblockError(
                f"block {block.write_roi} holds fragments its table lacks: the run directory is stale "
                "(fresh=True)"
            )
        result = np.zeros(flat.size, np.uint64)
        result[found] = segments[where[found]]
        return result.reshape(data.shape)


STEPS = ("up", "down", "labels", "export", "all")


@dataclass
class SolveStep(Worker):
    """Pass 2: one step of the hierarchical solve (`segment.hierarchy`); each block of the task
    is one unit of the level (a 1-D task: block k is unit k), or one chunk of the export."""

    name = "segment-solve"
    fit = "valid"

    step: str = option("up", help="up, down, labels, export, or all (one unit: every step at once)")
    level: int = option(1)
    grid: dict = option({}, help="the block grid and ID range (segment.ids.BlockGrid)")
    fanout: int = option(8, help="blocks per axis of a level-1 unit")
    edge_dir: str = option("")
    table_dir: str = option("")
    merge: str = option("any")
    merge_threshold: float = option(0.5)
    lut: str = option("", help="export: the whole 2 x N table")
    edges: str = option("", help="export: every edge, N x 5")
    chunk: int = option(1 << 20, help="export: columns (rows) per chunk")

    def prepare(self, preparation: Preparation) -> None:
        if self.step not in STEPS:
            raise VoxblockError(f"the solve's step must be one of {', '.join(STEPS)}; got {self.step!r}")
        if self.step == "up" and self.level == 1:
            blocks = int(np.prod(self.grid["counts"]))
            found = blocks_with_edges(self.edge_dir)
            if found != blocks:
                raise VoxblockError(
                    f"{found} of {blocks} blocks have edges in {self.edge_dir}; "
                    "the fragments pass is not complete"
                )

    def setup(self) -> None:
        from voxblock.packfile import PackIndex

        self._hierarchy = hierarchy.Hierarchy(BlockGrid.from_dict(self.grid), self.fanout)
        self._tables = hierarchy.PackStore(self.table_dir)
        self._edges = PackIndex(self.edge_dir, EDGES)
        self._edges.refresh()
        self._prefix: np.ndarray | None = None

    def block_record(self, block: int) -> tuple[np.ndarray, int, np.ndarray]:
        payload = self._edges.get(block)
        if payload is None:
            raise VoxblockError(
                f"block {block} has no edges in {self.edge_dir}: the fragments pass is not complete"
            )
        edges, fragments = read_edge_record(payload, f"the edge record of block {block} in {self.edge_dir}")
        return select_edges(edges, self.merge, self.merge_threshold), len(edges), fragments

    def prefix(self) -> np.ndarray:
        if self._prefix is None:
            self._prefix = np.load(Path(self.table_dir) / "offsets.npy", mmap_mode="r")
        return self._prefix

    def process(self, block: Any) -> None:
        unit = int(block.write_roi.begin[0])
        h = self._hierarchy
        if self.step == "up":
            hierarchy.up(h, self.level, unit, self._tables, self.block_record)
        elif self.step == "down":
            hierarchy.down(h, self.level, unit, self._tables)
        elif self.step == "labels":
            hierarchy.labels(h, unit, self._tables, self.prefix())
        elif self.step == "export":
            self.export(unit)
        else:  # one unit: up, down, the counts, its tables, the whole table
            if h.num_units(1) != 1:
                raise VoxblockError("the solve's step 'all' needs a grid of one unit")
            hierarchy.up(h, 1, 0, self._tables, self.block_record)
            hierarchy.down(h, 1, 0, self._tables)
            prefix = hierarchy.offsets(h, self._tables)
            save_array(Path(self.table_dir) / "offsets.npy", prefix)
            self._prefix = prefix
            hierarchy.labels(h, 0, self._tables, prefix)
            create_tables(self.lut, self.edges, prefix, self.chunk)
            for chunk in range(max(1, -(-int(max(prefix[0, -1], prefix[1, -1])) // self.chunk))):
                self.export(chunk)

    def export(self, chunk: int) -> None:
        """Chunk `chunk` of the whole table (2 x N) and of the edges (N x 5), from the blocks'
        records; each chunk is written by one block, so no two writers share one."""
        import zarr

        prefix = self.prefix()
        for name, row, _width in ((self.lut, 0, 2), (self.edges, 1, 5)):
            if not name:
                continue
            total = int(prefix[row, -1])
            start, end = chunk * self.chunk, min(total, (chunk + 1) * self.chunk)
            if start >= end:
                continue
            first = int(np.searchsorted(prefix[row], start, side="right")) - 1
            last = int(np.searchsorted(prefix[row], end, side="left"))
            parts = []
            for index in range(first, last):
                if row == 0:
                    parts.append(np.stack(hierarchy.block_lut(self._tables, index)))
                else:
                    edges, _ = read_edge_record(self._edges.get(index) or b"", f"the edges of block {index}")
                    parts.append(edges.T)
            data = np.concatenate(parts, axis=1)
            data = data[:, start - int(prefix[row, first]) : end - int(prefix[row, first])]
            array = zarr.open_array(str(arrays.ArrayName.parse(name).path), mode="r+")
            if row == 0:
                array[:, start:end] = data
            else:
                array[start:end, :] = data.T


def save_array(path: Path, data: np.ndarray) -> None:
    """Whole or absent: written beside, then renamed."""
    import os

    partial = path.with_name(path.name + ".partial.npy")
    np.save(partial, data)
    os.replace(partial, path)


def create_tables(lut: str, edges: str, prefix: np.ndarray, chunk: int) -> None:
    """The whole table (2 x N) and the edges (N x 5), empty, in chunks of `chunk` columns (rows):
    the export's blocks fill them, one chunk each."""
    import zarr

    from voxblock.segment.edges import EDGE_FIELDS

    for name, shape, chunks, attrs in (
        (lut, (2, int(prefix[0, -1])), (2, chunk), {"rows": ["fragment", "segment"]}),
        (edges, (int(prefix[1, -1]), 5), (chunk, 5), {"columns": list(EDGE_FIELDS)}),
    ):
        array_name = arrays.ArrayName.parse(name)
        zarr_format = arrays.container_format(array_name)
        arrays.make_groups(array_name, zarr_format)
        table = zarr.create_array(
            store=str(array_name.path),
            shape=shape,
            dtype=np.uint64,
            chunks=tuple(max(1, min(c, s)) for c, s in zip(chunks, shape)),
            overwrite=True,
            zarr_format=zarr_format,  # type: ignore[arg-type]
        )
        table.attrs.update(attrs)
