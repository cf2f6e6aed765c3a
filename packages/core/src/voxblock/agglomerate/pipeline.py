"""agglomerate_blockwise: affinities -> fragments -> region graph -> one segmentation.

Four passes, each resumable on its own:

1. fragments: the `watershed` worker (mutex watershed per block, block-position IDs), made if the
   fragments array does not exist, resumed if an earlier voxblock run made it with the same
   options, used as they are if they come from elsewhere (refused if made by voxblock otherwise:
   a graph of other fragments would be silently wrong).
2. graph: `build_rag`, the exact region graph (every voxel pair counted once) in an SQLite file
   or a PostgreSQL database; a rerun skips the blocks already stored.
3. solve: `graph_lut` on the finalized graph (threshold or graph mutex watershed) into a LUT file
   named by its method, threshold and content, so that another threshold never reuses the relabel
   of this one.
4. relabel: the `relabel` worker writes the segmentation.

A second run with another method or threshold finds passes 1 and 2 done and only solves and
relabels. Everything that can be refused is refused before pass 1, with nothing created.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from funlib.geometry import Coordinate, Roi

from voxblock import arrays
from voxblock.agglomerate.solve import check_method, check_threshold, graph_lut, lut_name
from voxblock.errors import VoxblockError
from voxblock.files import replace_atomically
from voxblock.geometry import affinity_offsets
from voxblock.nodes import check_output_container
from voxblock.rundir import RUN_DIR_SUFFIX, RunDirectory, default_run_dir

if TYPE_CHECKING:
    from voxblock.agglomerate.graphdb import GraphSource, GraphSummary
    from voxblock.task import BlockwiseTask

AGGLOMERATE_KEY = "voxblock_agglomerate"
FragmentsFrom = Literal["made", "resumed", "given"]
# set by voxblock.plan while a run is planned (--plan): called with the run's settings once every
# check has passed, it plans all four passes and raises, so that none runs
PLANNER: ContextVar[Callable[[dict[str, Any]], None] | None] = ContextVar("agglomerate_planner", default=None)


@dataclass(frozen=True)
class AgglomerateReport:
    """What a run did: where the fragments came from, the graph, the segments, each pass's time."""

    fragments: FragmentsFrom
    graph: GraphSummary
    segments: int
    lut: Path
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        times = ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds.items())
        return (
            f"fragments {self.fragments}; graph: {self.graph.nodes} fragments, {self.graph.edges} edges "
            f"({self.graph.blocks} blocks); {self.segments} segments; table {self.lut}; {times}"
        )


def agglomerate_blockwise(
    affinities: str,
    fragments: str,
    output: str,
    db: str | Path,
    block_shape: Sequence[int],
    *,
    context: Sequence[int] | None = None,
    offsets: list | None = None,
    method: str = "mws",
    threshold: float = 0.5,
    num_workers: int = 2,
    bias: float | list[float] = -0.5,
    strides: list | None = None,
    randomized_strides: bool = False,
    min_size: int = 0,
    mask: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **task_options: Any,
) -> AgglomerateReport:
    """Segment `affinities` (CONTAINER/DATASET, channels first, one channel per offset) into `output`.

    `block_shape` and `context` are in world units (context: what each fragments block reads
    around it; default: the largest offset on each axis). `db` is the region graph: an SQLite file
    path (the default place to start: nothing to run) or a `postgresql://` URL (workers on many
    machines). `method` "mws" (mutex watershed on the graph, as volara's GraphMWS) or "threshold"
    (connected components of the edges with mean affinity above `threshold`). `bias`, `strides`,
    `randomized_strides`, `min_size` and `mask` are the watershed worker's options for the
    fragments. Other keywords are task options (`max_retries`, `timeout`, `compute`, ...).
    Raises VoxblockError for bad inputs (before any work) and for blocks that kept failing.
    """
    from voxblock.agglomerate.build import RagBlocks, _BlockDone, rag_task
    from voxblock.agglomerate.graphdb import check_graph, finalize, finalized, open_graph
    from voxblock.geometry import check_affinities
    from voxblock.run import run_tasks
    from voxblock.task import BlockwiseTask
    from voxblock.workers import worker_class

    method = check_method(method)
    threshold = check_threshold(threshold)
    for what in ("run_dir", "fit", "read_write_conflict", "check_function", "task_id", "upstream_tasks"):
        if what in task_options:
            raise VoxblockError(f"agglomerate_blockwise sets {what} itself, per pass; leave it out")
    if task_options.get("batch", 1) not in (1, None):
        raise VoxblockError(
            f"agglomerate_blockwise does not batch its passes (batch={task_options['batch']!r}): the "
            "graph pass's blocks wait for their neighbours; leave batch out, or make the blocks larger"
        )
    worker_class("watershed")  # the passes need voxblock-workers: say so now
    worker_class("relabel")
    source = arrays.open_input(affinities, role="affinities")
    affinity_name = str(_absolute(affinities))
    check_affinities(source, affinity_name, "agglomerate: ")
    offsets = affinity_offsets(list(offsets or []), source, "agglomerate", affinity_name)
    voxel_size = source.voxel_size
    volume = source.roi  # spatial ROI
    block = _world("block_shape", block_shape, voxel_size, positive=True)
    if context is None:
        from voxblock.agglomerate.rag import rag_context

        margin = Coordinate(rag_context(offsets)) * voxel_size
    else:
        margin = _world("context", context, voxel_size, positive=False)
    fragments_name = _absolute(fragments)  # one run, however its names are written
    output_name = _absolute(output)
    for name in (fragments_name, output_name):
        check_output_container(str(name))
    if fragments_name == output_name:
        raise VoxblockError(f"fragments and output are both {output_name}: name two arrays")
    run_root = Path(str(output_name.container) + RUN_DIR_SUFFIX) / output_name.dataset

    watershed_options: dict[str, Any] = {
        "input": affinity_name,
        "output": str(fragments_name),
        "offsets": offsets,
        "bias": bias,
        "strides": list(strides or []),
        "randomized_strides": randomized_strides,
        "min_size": min_size,
    }
    if mask:
        watershed_options["mask"] = str(_absolute(mask))
    common = {"num_workers": num_workers, **task_options}
    write = Roi((0,) * voxel_size.dims, block)
    watershed = BlockwiseTask(
        "watershed",
        volume.grow(margin, margin),
        write.grow(margin, margin),
        write,
        fit="shrink",
        task_id="fragments",
        **watershed_options,
        **common,
    )
    made_by = _fragments_origin(fragments_name, watershed)

    seconds: dict[str, float] = {}
    if made_by == "given":
        _check_given_fragments(fragments_name, source, affinity_name)
    source_record = _graph_source(fragments_name, volume, voxel_size)
    build_record = {
        "affinities": str(arrays.ArrayName.parse(affinities).path.resolve()),
        "offsets": offsets,
        "write_shape": list(block),
        "grid_origin": list(volume.begin),
    }
    check_graph(db, source_record, build_record)  # reads only: nothing created
    _check_output(output_name, source, overwrite, run_root)
    planner = PLANNER.get()
    if planner is not None:
        planner({**locals(), "fragments": fragments_name, "output": output_name, "affinities": affinity_name})

    # -- pass 1: fragments
    if made_by != "given":
        start = time.perf_counter()
        report = run_tasks([watershed], progress=progress)
        seconds["fragments"] = time.perf_counter() - start
        if not report.succeeded:
            raise VoxblockError(f"agglomerate: fragments failed:\n{report.summary()}")

    # -- pass 2: the region graph
    start = time.perf_counter()
    rag_run_dir = None if _is_sqlite(db) else run_root / "rag"
    rag = rag_task(
        str(fragments_name), affinity_name, db, block, offsets, num_workers, rag_run_dir, **task_options
    )
    try:
        report = run_tasks([rag], progress=progress)
    finally:
        if isinstance(rag.pre_check, _BlockDone):
            rag.pre_check.close()
    if not report.succeeded:
        raise VoxblockError(f"agglomerate: the region graph was not built:\n{report.summary()}")
    worker = rag.worker
    assert isinstance(worker, RagBlocks)
    graph = open_graph(db, source_record)
    try:
        # the reduction reads every partial: done again only if a block was written since
        summary = finalized(graph) or finalize(graph)
    finally:
        graph.close()
    seconds["graph"] = time.perf_counter() - start

    # -- pass 3: the solve
    start = time.perf_counter()
    lut = graph_lut(db, method, threshold)
    lut_path = _save_lut(run_root / "luts", lut_name(method, threshold), lut)
    seconds["solve"] = time.perf_counter() - start

    # -- pass 4: relabel
    start = time.perf_counter()
    relabel = BlockwiseTask(
        "relabel",
        volume,
        write,
        write,
        fit="shrink",
        task_id="relabel",
        run_dir=str(run_root / "relabel"),
        overwrite=True,  # checked above: absent, ours, or overwrite asked for
        input=str(fragments_name),
        output=str(output_name),
        lut=str(lut_path),
        dtype="uint64",
        **common,
    )
    report = run_tasks([relabel], progress=progress)
    if not report.succeeded:
        raise VoxblockError(f"agglomerate: the relabel pass failed:\n{report.summary()}")
    import zarr

    zarr.open(str(output_name.path), mode="r+").attrs[AGGLOMERATE_KEY] = {
        "fragments": str(fragments_name),
        "db": _without_password(str(db)),
        "method": method,
        "threshold": threshold,
        "lut": str(lut_path),
    }
    seconds["relabel"] = time.perf_counter() - start
    segments = int(np.unique(lut[1]).size) if lut.shape[1] else 0
    return AgglomerateReport(made_by, summary, segments, lut_path, seconds)


# -- checks before any work ------------------------------------------------------------------------


def _absolute(name: str | arrays.ArrayName) -> arrays.ArrayName:
    parsed = arrays.ArrayName.parse(name)
    return arrays.ArrayName(parsed.container.resolve(), parsed.dataset)


def _world(what: str, values: Sequence[int], voxel_size: Coordinate, positive: bool) -> Coordinate:
    try:
        shape = Coordinate(int(v) for v in values)
    except (TypeError, ValueError):
        raise VoxblockError(
            f"{what} must be {voxel_size.dims} integers (world units); got {values!r}"
        ) from None
    if len(shape) != voxel_size.dims or any((s <= 0 if positive else s < 0) for s in shape):
        raise VoxblockError(
            f"{what} must be {voxel_size.dims} {'positive' if positive else 'non-negative'} integers "
            f"(world units); got {tuple(values)}"
        )
    if any(s % v for s, v in zip(shape, voxel_size)):
        raise VoxblockError(f"{what} {tuple(shape)} must be a multiple of the voxel size {tuple(voxel_size)}")
    return shape


def _fragments_origin(name: arrays.ArrayName, watershed: BlockwiseTask) -> FragmentsFrom:
    """made (absent), resumed (an earlier voxblock run of this very pass) or given (from elsewhere)."""
    if not name.path.exists():
        return "made"
    run_dir = RunDirectory(default_run_dir([str(name)], "fragments", watershed.task_key))
    recorded = run_dir.read_task()
    if recorded is None:
        return "given"
    if recorded.get("key") == watershed.task_key:
        return "resumed"
    theirs = recorded.get("identity", {})
    ours = watershed.identity()
    defaults = type(watershed.worker)().options() if _constructible(watershed.worker) else {}
    their_options = {**defaults, **theirs.get("options", {})}  # an option added since: its default
    differ = sorted(
        key
        for key in set(their_options) | set(ours["options"])
        if their_options.get(key) != ours["options"].get(key)
    )
    differ += [key for key in ("total_roi", "read_roi", "write_roi", "fit") if theirs.get(key) != ours[key]]
    if not differ:
        watershed.overwrite = True  # recorded by an older voxblock: redone, with the same result
        return "resumed"
    raise VoxblockError(
        f"fragments {name} were made by an earlier voxblock run with other settings ({', '.join(differ)} "
        f"differ; its record: {run_dir.path}/task.json). A graph of them would not be this run's: pass "
        "the same settings to reuse them, or name other fragments (and another database)"
    )


def _constructible(worker: Any) -> bool:
    try:
        type(worker)()
    except Exception:
        return False
    return True


def _check_given_fragments(name: arrays.ArrayName, affinities: Any, affinities_name: str) -> None:
    from voxblock.agglomerate.build import check_fragments, check_same_voxels

    fragments = arrays.open_input(str(name), role="fragments")
    check_fragments(fragments, str(name))
    check_same_voxels(fragments, str(name), affinities, affinities_name)


def _graph_source(fragments: arrays.ArrayName, volume: Roi, voxel_size: Coordinate) -> GraphSource:
    from voxblock.agglomerate.graphdb import GraphSource

    return GraphSource(
        fragments=str(fragments.path.resolve()),
        offset=tuple(int(o) for o in volume.begin),
        voxel_size=tuple(int(v) for v in voxel_size),
    )


def _is_sqlite(db: str | Path) -> bool:
    return not str(db).startswith(("postgresql://", "postgres://"))


def _without_password(url: str) -> str:
    from voxblock.agglomerate.graphdb import _without_password

    return _without_password(url)


def _check_output(name: arrays.ArrayName, source: Any, overwrite: bool, run_root: Path) -> None:
    """Absent, written by an earlier agglomeration into it (rewritten), or refused unless overwrite."""

    def ours(attrs: Any) -> bool | None:
        if AGGLOMERATE_KEY in attrs:
            return True
        provenance = attrs.get(arrays.PROVENANCE_KEY)
        if provenance is None:
            return None
        return str(provenance.get("run_dir", "")).startswith(str(run_root.resolve()))

    spec = arrays.OutputSpec.like(source, name, np.uint64, source.roi)
    arrays.check_output(spec, {}, overwrite, ours=ours, holds=lambda attrs: "data agglomerate did not write")


def _save_lut(directory: Path, stem: str, lut: np.ndarray) -> Path:
    """The table as dacapo/volara keep one (.npz), named by its content: a new table, a new relabel."""
    buffer = io.BytesIO()
    np.savez(buffer, fragment_segment_lut=lut)
    digest = hashlib.sha256(lut.tobytes() + str(lut.shape).encode()).hexdigest()[:12]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}-{digest}.npz"
    if not path.exists():
        replace_atomically(path, lambda file: file.write(buffer.getvalue()))
    return path
