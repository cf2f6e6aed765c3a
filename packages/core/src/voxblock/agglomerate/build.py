"""The blockwise pass that builds the region graph: `RagBlocks` (worker "rag") and `build_rag`.

Each block reads fragments and affinities over its read ROI (zeros past the volume: fragment 0
is background, so pairs leaving the volume are no edge), computes its exact partials with
`rag_partials` (its write ROI's voxels, the pairs whose first voxel it owns) and stores them with
`write_block_partials`, one transaction per block under a block id from the write ROI's place on
the block grid. The database is the truth: the task's check function is `block_done`, so a rerun
(or a run after the driver was killed) skips every block whose partials committed, whatever
daisy's done markers say. `build_rag` runs the pass and then `finalize`s the graph. Affinities
are float (0..1) or uint8 (0..255, divided by 255 as the watershed worker does).

The database records where the graph comes from twice: graphdb's source (fragments, offset,
voxel size: another one is refused by `open_graph`) and this pass's build (affinities, offsets,
write block shape and grid origin): a block id means one block only under one blocking, so a
rerun with other affinities, offsets or blocks is refused rather than mixed with the old blocks.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from funlib.geometry import Coordinate, Roi

from voxblock.errors import VoxblockError
from voxblock.geometry import affinity_offsets, check_affinities, check_blocking_on_grid, roi_slices
from voxblock.workers import Preparation, Worker, option

if TYPE_CHECKING:
    from voxblock.agglomerate.graphdb import GraphDB, GraphSource, GraphSummary
    from voxblock.arrays import Array
    from voxblock.task import BlockwiseTask


@dataclass
class RagBlocks(Worker):
    """Region graph partials of fragments and affinities, block by block, into a graph database."""

    name = "rag"
    fit = "overhang"
    preload = (
        "numpy",
        "zarr",
        "fastremap",
        "voxblock.arrays",
        "voxblock.chunks",
        "voxblock.agglomerate.rag",
        "voxblock.agglomerate.graphdb",
    )

    fragments: str = option("", help="fragments, CONTAINER/DATASET (unsigned integers, 0 = background)")
    affinities: str = option("", help="affinities, CONTAINER/DATASET (channels first, one per offset)")
    offsets: list = option(
        [], help="one voxel offset per affinity channel (default: the affinities' 'offsets' attribute)"
    )
    db: str = option("", help="graph database: an SQLite file path or a postgresql:// URL")

    # -- driver ---------------------------------------------------------------------------------

    def prepare(self, preparation: Preparation) -> None:
        from voxblock.agglomerate.graphdb import open_graph
        from voxblock.segment.ids import BlockGrid

        fragments, _ = self.check_inputs()  # refuses bad arrays or offsets before the database is touched
        blocking = preparation.blocking
        check_blocking_on_grid(blocking, fragments.voxel_size, fragments.offset)
        self.check_context(blocking.context, fragments.voxel_size)
        self._grid = BlockGrid.of(blocking, 1)
        self._source = self.graph_source(fragments)
        db = open_graph(self.db, self._source)  # refuses a database holding another graph
        try:
            _claim_build(db, self.build_record())
        finally:
            db.close()

    def check_inputs(self) -> tuple[Array, Array]:
        """Open both arrays and check they describe one volume; resolves `offsets`. Creates nothing."""
        from voxblock import arrays

        for what in ("fragments", "affinities", "db"):
            if not getattr(self, what):
                raise VoxblockError(f"rag: needs {what}=...")
        fragments = arrays.open_input(self.fragments, role="fragments")
        affinities = arrays.open_input(self.affinities, role="affinities")
        check_fragments(fragments, self.fragments, "rag: ")
        check_affinities(affinities, self.affinities, "rag: ")
        check_same_voxels(fragments, self.fragments, affinities, self.affinities, "rag: ")
        self.offsets = self.resolved_offsets(affinities)
        return fragments, affinities

    def resolved_offsets(self, affinities: Array) -> list[list[int]]:
        return affinity_offsets(self.offsets, affinities, "rag", self.affinities)

    def check_context(self, context: tuple[Coordinate, Coordinate], voxel_size: Coordinate) -> None:
        from voxblock.agglomerate.rag import rag_context

        below, above = context
        needed = Coordinate(rag_context(self.offsets)) * voxel_size
        if any(b < n or a < n for b, a, n in zip(below, above, needed)):
            raise VoxblockError(
                f"rag: the blocks' context ({tuple(below)} below, {tuple(above)} above, world units) must "
                f"be at least {tuple(needed)} on each side for offsets {self.offsets}"
            )

    def graph_source(self, fragments: Array) -> GraphSource:
        from voxblock.agglomerate.graphdb import GraphSource
        from voxblock.names import ArrayName

        name = ArrayName.parse(self.fragments)
        return GraphSource(
            fragments=str(name.path.resolve()),
            offset=tuple(int(o) for o in fragments.offset),
            voxel_size=tuple(int(v) for v in fragments.voxel_size),
        )

    def build_record(self) -> dict[str, Any]:
        from voxblock.names import ArrayName

        return {
            "affinities": str(ArrayName.parse(self.affinities).path.resolve()),
            "offsets": self.offsets,
            "write_shape": list(self._grid.stride),
            "grid_origin": list(self._grid.origin),
        }

    def check_function(self) -> Any:
        # before a block only (the scheduler's question); a block's transaction is its done mark
        return (_BlockDone(self), None)

    # -- worker processes -----------------------------------------------------------------------

    def setup(self) -> None:
        from voxblock import arrays
        from voxblock.agglomerate.graphdb import open_graph

        if getattr(self, "_grid", None) is None:
            raise RuntimeError("rag: the worker was not prepared (no block grid)")
        self._fragments = arrays.open_input(self.fragments, role="fragments")
        self._affinities = arrays.open_input(self.affinities, role="affinities")
        self._db = open_graph(self.db, self._source)

    def process(self, block: Any) -> None:
        import numpy as np

        from voxblock import arrays
        from voxblock.agglomerate.graphdb import write_block_partials
        from voxblock.agglomerate.rag import rag_partials

        voxel_size = self._fragments.voxel_size
        fragments = arrays.read(self._fragments, block.read_roi, fill_value=0)
        affinities = arrays.read(self._affinities, block.read_roi, fill_value=0)
        if affinities.dtype == np.uint8:
            affinities = affinities.astype(np.float32) / np.float32(255)
        write = roi_slices(block.write_roi, block.read_roi.begin, voxel_size)
        origin = (block.write_roi.begin - self._fragments.roi.begin) / voxel_size
        partials = rag_partials(fragments, affinities, self.offsets, write, tuple(int(o) for o in origin))
        write_block_partials(self._db, self._grid.index(block.write_roi), partials)

    def __getstate__(self) -> dict[str, Any]:
        # opened per process in setup(): never pickled
        return {k: v for k, v in vars(self).items() if k not in ("_fragments", "_affinities", "_db")}


def check_fragments(fragments: Array, name: str, who: str = "") -> None:
    """Fragments are one label image: no channel axis, unsigned integers, 0 the background."""
    import numpy as np

    if fragments.channel_dims != 0:
        raise VoxblockError(
            f"{who}fragments {name} must have no channel axis; it has {fragments.channel_dims}"
        )
    if np.dtype(fragments.dtype).kind != "u":
        raise VoxblockError(
            f"{who}fragments {name} have dtype {np.dtype(fragments.dtype)}; fragments must be unsigned "
            "integers (0 = background)"
        )


def check_same_voxels(
    fragments: Array, fragments_name: str, affinities: Array, affinities_name: str, who: str = ""
) -> None:
    if affinities.voxel_size != fragments.voxel_size or affinities.roi != fragments.roi:
        raise VoxblockError(
            f"{who}affinities {affinities_name} (voxel size {affinities.voxel_size}, ROI {affinities.roi}) "
            f"and fragments {fragments_name} (voxel size {fragments.voxel_size}, ROI {fragments.roi}) must "
            "cover the same voxels"
        )


class _BlockDone:
    """`block_done` of a block's grid id, one connection per process and thread (picklable).

    Made before the worker is prepared (the task asks for it first): the grid and the graph's
    source are the prepared worker's, read at the first block.
    """

    def __init__(self, worker: RagBlocks) -> None:
        self.worker = worker
        self._connections: dict[tuple[int, int], GraphDB] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"worker": self.worker}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._connections, self._lock = {}, threading.Lock()

    def _db(self) -> GraphDB:
        from voxblock.agglomerate.graphdb import open_graph

        key = (os.getpid(), threading.get_ident())
        with self._lock:
            if key not in self._connections:
                self._connections[key] = open_graph(self.worker.db, self.worker._source)
            return self._connections[key]

    def __call__(self, block: Any) -> bool:
        from voxblock.agglomerate.graphdb import block_done

        return block_done(self._db(), self.worker._grid.index(block.write_roi))

    def close(self) -> None:
        with self._lock:
            for db in self._connections.values():
                db.close()
            self._connections.clear()


def _claim_build(db: GraphDB, record: dict[str, Any]) -> None:
    """Record this pass's inputs and blocking in the database, or refuse a database built otherwise."""
    from voxblock.agglomerate.graphdb import _p, _transaction, _without_password

    text = json.dumps(record, sort_keys=True)
    with _transaction(db, exclusive=True) as cursor:
        cursor.execute("SELECT value FROM voxblock_graph WHERE key = 'build'")
        row = cursor.fetchone()
        if row is None:
            cursor.execute(f"INSERT INTO voxblock_graph (key, value) VALUES ('build', {_p(db)})", (text,))
    if row is not None and json.loads(row[0]) != json.loads(text):
        raise VoxblockError(
            f"graph database {_without_password(db.url)} already holds another graph: it was built from "
            f"{row[0]}, this run is {text}; choose another database"
        )


def rag_task(
    fragments: str,
    affinities: str,
    db: str | Path,
    block_shape: Any,
    offsets: list | None = None,
    num_workers: int = 2,
    run_dir: str | Path | None = None,
    **task_options: Any,
) -> BlockwiseTask:
    """The blockwise task of `build_rag` (run it with `run_tasks`, then `finalize` the database)."""
    from voxblock.agglomerate.rag import rag_context
    from voxblock.task import BlockwiseTask

    worker = RagBlocks(
        fragments=str(fragments), affinities=str(affinities), offsets=list(offsets or []), db=str(db)
    )
    source, _ = worker.check_inputs()  # the offsets, to size the context
    voxel_size = source.voxel_size
    context = Coordinate(rag_context(worker.offsets)) * voxel_size
    block = Coordinate(block_shape)
    if len(block) != voxel_size.dims or any(b <= 0 or b % v for b, v in zip(block, voxel_size)):
        raise VoxblockError(
            f"rag: block_shape {tuple(block)} must be positive multiples of the voxel size {voxel_size}"
        )
    if run_dir is None and not str(db).startswith(("postgresql://", "postgres://")):
        run_dir = f"{db}.voxblock"
    if run_dir is not None:
        task_options["run_dir"] = str(run_dir)
    return BlockwiseTask(
        worker,
        source.roi.grow(context, context),
        Roi(-context, block + context * 2),
        Roi((0,) * voxel_size.dims, block),
        num_workers=num_workers,
        fit="overhang",
        **task_options,
    )


def build_rag(
    fragments: str,
    affinities: str,
    db: str | Path,
    block_shape: Any,
    offsets: list | None = None,
    num_workers: int = 2,
    run_dir: str | Path | None = None,
    progress: bool = False,
    **task_options: Any,
) -> GraphSummary:
    """Build the region graph of `fragments` and `affinities` into `db` and finalize it.

    `block_shape` is the write block in world units; each block reads the context
    `rag_context(offsets)` voxels around it (fit "overhang": border blocks keep their size and
    read zeros past the volume). `run_dir` (daisy's tracking, logs) defaults to `<db>.voxblock`
    for an SQLite file, to voxblock's default (`voxblock_runs/rag-<key>` in the working directory)
    for a PostgreSQL URL. Other keywords are task options (`max_retries`, `compute`, ...). A rerun
    skips the blocks in the database; a failed run raises VoxblockError and finalizes nothing.
    """
    from voxblock.agglomerate.graphdb import finalize, open_graph
    from voxblock.run import run_tasks

    task = rag_task(fragments, affinities, db, block_shape, offsets, num_workers, run_dir, **task_options)
    try:
        report = run_tasks([task], progress=progress)
    finally:
        if isinstance(task.pre_check, _BlockDone):
            task.pre_check.close()  # the driver's connections: no write-ahead log left open
    if not report.succeeded:
        raise VoxblockError(f"rag: the graph was not built, some blocks failed:\n{report.summary()}")
    worker = task.worker
    assert isinstance(worker, RagBlocks)
    graph = open_graph(db, worker.graph_source(worker.check_inputs()[0]))
    try:
        return finalize(graph)
    finally:
        graph.close()
