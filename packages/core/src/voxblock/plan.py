"""`--plan`: what a run will cost, before it runs; nothing is written to its output.

A plan runs the command as a real run would, up to the point where its tasks would be
prepared (`run.run_tasks`, through `run.PLANNER`): every check the command makes before
that happens with the same messages. Each task is then checked as `BlockwiseTask.prepare`
checks it (output containers, the run directory's lock, the worker's own `prepare` with
the creation of outputs left out), counted (blocks, blocks already done in a resumable run
directory, bytes read and written, files created) and timed: a few blocks, at the border
and inside, run in one worker process against a scratch copy of the outputs (a temporary
directory, deleted after), and the times are scaled by the blocks to run over the workers.

The counts are pure functions of a task's `Blocking` (per axis: millions of blocks cost
nothing); the sampling is the I/O edge (`sample_task`). Commands of several passes
(segment, downsample) stop at the first `run_tasks`: the later passes are counted from the
first one's grid, not sampled. agglomerate plans its four passes itself (`pipeline.PLANNER`,
`agglomerate_passes`): each later one sampled on scratch copies (fragments, graph database, table).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from voxblock.errors import VoxblockError

if TYPE_CHECKING:
    from funlib.geometry import Roi

    from voxblock.geometry import Blocking
    from voxblock.task import BlockwiseTask

# a block under this many voxels spends more on scheduling and chunk I/O than on its data
SMALL_BLOCK_VOXELS = 32**3
MANY_FILES = 10**6
SAMPLE_BLOCKS = 5
# what a run spends per task besides its blocks (daisy's server, the workers' start and end,
# the report), and per block besides the worker's own step (the scheduler's round trip, the
# done marker): measured on voxblock's own runs, added to what the sample measures
TASK_OVERHEAD_SECONDS = 0.3
BLOCK_OVERHEAD_SECONDS = 0.001
# blocks a second one daisy 2 server hands out however fast the workers are (`nox -s scale`,
# no-op blocks): a run of more blocks than MANY_BLOCKS is told to batch them (`batch`)
SCHEDULER_BLOCKS_PER_SECOND = 8000
MANY_BLOCKS = 10**5
# memory of a worker process before its first block (interpreter, numpy, zarr), for the estimate
BASE_WORKER_BYTES = 150 << 20
# run-directory files of one task (task.json, lock, tracking store, report, progress) and per worker
BOOKKEEPING_FILES, BOOKKEEPING_FILES_PER_WORKER = 12, 2


class Planned(Exception):
    """Raised through a command once its tasks are planned: nothing more runs."""


# -- the plan ------------------------------------------------------------------------------------


@dataclass
class PassPlan:
    """One pass (task) of a run: its block grid, I/O and time."""

    name: str
    blocks: int
    done: int = 0
    block_voxels: tuple[int, ...] = ()
    border_blocks: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    files: int = 0  # output chunks or shards the blocks to run touch
    bookkeeping_files: int = 0
    memory: int | None = None  # bytes per worker
    memory_how: str = "estimated from block bytes"
    seconds_per_block: float | None = None
    worker_start: float = 0.0  # seconds a worker process takes before its first block
    how: str = "not sampled"
    wall_seconds: float | None = None
    core_hours: float | None = None
    warnings: list[str] = field(default_factory=list)
    # a batched task: blocks per side of a batch, and the batches daisy hands out
    batch: tuple[int, ...] = ()
    batches: int = 0

    @property
    def to_run(self) -> int:
        return max(0, self.blocks - self.done)


@dataclass
class Plan:
    """What a run will cost: its passes, in order, and what will hurt."""

    command: str
    workers: int
    parallel: int  # blocks that run at once
    passes: list[PassPlan] = field(default_factory=list)
    startup_seconds: float = 0.0  # the driver's, before its first task
    memory_limit: int | None = None  # per worker, bytes (--memory, [cluster] memory)
    warnings: list[str] = field(default_factory=list)

    @property
    def wall_seconds(self) -> float | None:
        walls = [p.wall_seconds for p in self.passes]
        if any(w is None for w in walls):
            return None
        return self.startup_seconds + sum(w or 0.0 for w in walls)

    @property
    def core_hours(self) -> float | None:
        hours = [p.core_hours for p in self.passes]
        return None if any(h is None for h in hours) else sum(h or 0.0 for h in hours)

    def all_warnings(self) -> list[str]:
        found = list(self.warnings)
        for p in self.passes:
            found += [f"{p.name}: {w}" for w in p.warnings]
        return found

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in dataclasses.asdict(self).items() if k != "passes"},
            "passes": [{**dataclasses.asdict(p), "to_run": p.to_run} for p in self.passes],
            "wall_seconds": self.wall_seconds,
            "core_hours": self.core_hours,
            "warnings": self.all_warnings(),
        }

    def render(self) -> str:
        lines = [
            f"plan: {self.command} ({self.workers} workers, {self.parallel} blocks at once); "
            "nothing was written"
        ]
        header = (
            f"  {'pass':14s} {'blocks':>9s} {'done':>9s} {'to run':>9s} {'read':>9s} {'written':>9s} "
            f"{'files':>9s} {'memory/worker':>14s} {'s/block':>8s} {'wall':>8s}"
        )
        lines.append(header)
        for p in self.passes:
            memory = _size(p.memory) if p.memory is not None else "?"
            per_block = f"{p.seconds_per_block:.4f}" if p.seconds_per_block is not None else "-"
            wall = _duration(p.wall_seconds) if p.wall_seconds is not None else "?"
            lines.append(
                f"  {p.name:14s} {p.blocks:>9d} {p.done:>9d} {p.to_run:>9d} {_size(p.bytes_read):>9s} "
                f"{_size(p.bytes_written):>9s} {p.files + p.bookkeeping_files:>9d} {memory:>14s} "
                f"{per_block:>8s} {wall:>8s}"
            )
        for p in self.passes:
            shape = "x".join(map(str, p.block_voxels))
            grid = f"blocks of {shape} voxels ({p.border_blocks} at the border); " if shape else ""
            if p.batch:
                grid += f"handed out in {p.batches} batches of {'x'.join(map(str, p.batch))}; "
            lines.append(
                f"  {p.name}: {grid}"
                f"{p.files} output files + {p.bookkeeping_files} bookkeeping; memory {p.memory_how}; "
                f"time {p.how}"
            )
        wall, hours = self.wall_seconds, self.core_hours
        total_files = sum(p.files + p.bookkeeping_files for p in self.passes)
        lines.append(
            f"total: {sum(p.to_run for p in self.passes)} blocks to run, "
            f"{_size(sum(p.bytes_read for p in self.passes))} read, "
            f"{_size(sum(p.bytes_written for p in self.passes))} written (uncompressed), "
            f"{total_files} files; estimated "
            + (f"{_duration(wall)} wall" if wall is not None else "? wall (a pass not sampled)")
            + (f", {hours:.3g} core-hours" if hours is not None else "")
            + f" (start-up {_duration(self.startup_seconds)} included)"
        )
        for warning in self.all_warnings():
            lines.append(f"warning: {warning}")
        return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# -- counts: pure functions of a Blocking ------------------------------------------------------


def axis_blocks(blocking: Blocking) -> list[list[tuple[int, int, int, int]]]:
    """Per axis, (read begin, read end, write begin, write end) of its blocks (world units): the
    blocks are their product, so sums over blocks are products of per-axis sums."""
    return [blocking._axis_blocks(d) for d in range(blocking.total_roi.dims)]


def _overlap(begin: int, end: int, lo: int, hi: int) -> int:
    return max(0, min(end, hi) - max(begin, lo))


def covered_voxels(blocking: Blocking, roi: Roi, voxel_size: Sequence[int], which: str) -> int:
    """Voxels of `roi` the blocks read (`which="read"`) or write ("write"), summed over blocks
    (a voxel two blocks read counts twice)."""
    first = 0 if which == "read" else 2
    total = 1
    for axis, blocks in enumerate(axis_blocks(blocking)):
        lo, hi = roi.begin[axis], roi.end[axis]
        total *= sum(_overlap(b[first], b[first + 1], lo, hi) for b in blocks) // voxel_size[axis]
    return total


def border_blocks(blocking: Blocking) -> int:
    """Blocks at the border of the grid (the first or last along some axis)."""
    counts = [len(blocks) for blocks in axis_blocks(blocking)]
    interior = math.prod(max(0, n - 2) for n in counts)
    return math.prod(counts) - interior


def units_touched(blocking: Blocking, roi: Roi, unit: Sequence[int], origin: Sequence[int]) -> int:
    """Write units (chunks, shards; world units, on a grid from `origin`) of an array over `roi`
    that the blocks' write ROIs touch."""
    total = 1
    for axis, blocks in enumerate(axis_blocks(blocking)):
        lo, hi, u, o = roi.begin[axis], roi.end[axis], unit[axis], origin[axis]
        touched: set[int] = set()
        for _, _, begin, end in blocks:
            begin, end = max(begin, lo), min(end, hi)
            if begin < end:
                touched.update(range((begin - o) // u, (end - 1 - o) // u + 1))
        total *= len(touched)
    return total


def solve_levels(blocks_per_axis: Sequence[int], fanout: int) -> list[int]:
    """Units of each level of segment's hierarchical solve (super-blocks of fanout^ndim blocks)."""
    levels: list[int] = []
    counts = list(blocks_per_axis)
    while True:
        counts = [-(-n // fanout) for n in counts]
        levels.append(math.prod(counts))
        if all(n == 1 for n in counts):
            return levels


def estimate_wall(to_run: int, seconds_per_block: float, parallel: int, worker_start: float) -> float:
    """A task's wall time: its start (server, workers), then its blocks spread over the workers."""
    if to_run == 0:
        return TASK_OVERHEAD_SECONDS
    at_once = max(1, min(parallel, to_run))
    rounds = to_run / at_once
    return TASK_OVERHEAD_SECONDS + worker_start + rounds * (seconds_per_block + BLOCK_OVERHEAD_SECONDS)


def estimate_core_hours(to_run: int, seconds_per_block: float, workers: int, worker_start: float) -> float:
    return (to_run * (seconds_per_block + BLOCK_OVERHEAD_SECONDS) + workers * worker_start) / 3600


def estimate_memory(block_bytes_read: int, block_bytes_written: int) -> int:
    """A worker's memory from its block's bytes: the read block, what the worker computes from it
    (about as large again) and the written block, twice over (the result and its encoding)."""
    return BASE_WORKER_BYTES + 2 * block_bytes_read + 2 * block_bytes_written


def block_warnings(blocking: Blocking, voxel_size: Sequence[int]) -> list[str]:
    voxels = math.prod(s // v for s, v in zip(blocking.write_roi.shape, voxel_size))
    if voxels < SMALL_BLOCK_VOXELS:
        shape = "x".join(str(s // v) for s, v in zip(blocking.write_roi.shape, voxel_size))
        return [
            f"blocks of {shape} = {voxels} voxels are small (< 32^3): scheduling and chunk I/O "
            "will dominate; use a larger --block-size"
        ]
    return []


# -- the planner: run_tasks' stand-in while a command is planned -------------------------------


class Planner:
    """Collects the plans of the tasks a command would run (`run.PLANNER`)."""

    def __init__(self, command: str, sample: bool, started: float | None) -> None:
        self.command = command
        self.sample = sample
        self.started = started if started is not None else time.time()
        self.passes: list[PassPlan] = []
        self.tasks: list[BlockwiseTask] = []
        self.cleared = False  # a command forgot its earlier passes (segment --fresh)
        self.startup: float | None = None
        self.planned_outputs: set[str] = set()  # arrays the tasks planned so far would create
        self.segmentation: Any = None  # segment_blockwise's, when it is planned

    def __call__(self, tasks: Sequence[BlockwiseTask]) -> None:
        if self.startup is None:
            self.startup = time.time() - self.started
        scratch = Path(tempfile.mkdtemp(prefix="voxblock-plan-"))
        try:
            mapping: dict[str, str] = {}
            for task in tasks:
                self.tasks.append(task)
                self.passes.append(self.plan_task(task, scratch, mapping))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        raise Planned()

    def agglomerate(self, settings: dict[str, Any]) -> None:
        """agglomerate_blockwise's four passes (`pipeline.PLANNER`), once its checks have passed."""
        if self.startup is None:
            self.startup = time.time() - self.started
        scratch = Path(tempfile.mkdtemp(prefix="voxblock-plan-"))
        try:
            mapping: dict[str, str] = {}
            watershed = settings["watershed"]
            self.tasks.append(watershed)  # its workers and compute are every pass's
            if settings["made_by"] != "given":
                self.passes.append(self.plan_task(watershed, scratch, mapping))
            self.passes += agglomerate_passes(self, settings, scratch, mapping)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        raise Planned()

    def plan_task(self, task: BlockwiseTask, scratch: Path, mapping: dict[str, str]) -> PassPlan:
        specs, existing = check_task(task, scratch, self.planned_outputs)
        self.planned_outputs.update(str(spec.name) for spec, _ in specs)
        plan = count_task(task, specs, existing, done=0 if self.cleared else done_blocks(task))
        sampled = None
        if self.sample and plan.to_run > 0:
            sampled = sample_task(task, scratch, mapping)
        elif self.sample:
            plan.how = "nothing to run"
        if sampled is not None:
            plan.seconds_per_block = sampled.per_block(task.blocking)
            plan.worker_start = sampled.start
            plan.memory, plan.memory_how = sampled.peak_rss, "measured (peak RSS of the sample)"
            plan.how = f"from {len(sampled.times)} blocks sampled ({sampled.border} at the border)"
        elif plan.to_run > 0 and self.sample:
            plan.how = "not sampled (this worker's outputs cannot be redirected to a scratch copy)"
        finish_pass(plan, task.num_workers, _parallel(task))
        return plan


def finish_pass(plan: PassPlan, workers: int, parallel: int) -> None:
    if plan.seconds_per_block is not None:
        plan.wall_seconds = estimate_wall(plan.to_run, plan.seconds_per_block, parallel, plan.worker_start)
        plan.core_hours = estimate_core_hours(
            plan.to_run, plan.seconds_per_block, min(workers, max(plan.to_run, 1)), plan.worker_start
        )
    elif plan.to_run == 0:
        plan.wall_seconds, plan.core_hours = TASK_OVERHEAD_SECONDS, 0.0
    if plan.wall_seconds is not None and plan.to_run > 0:
        # however fast the workers, the scheduler hands out its blocks (batches) one at a time
        handed = plan.to_run * (plan.batches or plan.blocks) / plan.blocks
        plan.wall_seconds = max(
            plan.wall_seconds, TASK_OVERHEAD_SECONDS + handed / SCHEDULER_BLOCKS_PER_SECOND
        )


def _parallel(task: BlockwiseTask) -> int:
    """Blocks that run at once: the workers, but no more than this machine's cores for local ones."""
    if task.compute.remote_workers:
        return task.num_workers
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(task.num_workers, cores))


@contextlib.contextmanager
def planning(command: str, sample: bool = True, started: float | None = None) -> Iterator[Planner]:
    """While it lasts, `run_tasks` plans the tasks it is given instead of running them (and
    raises `Planned`); what a command writes before its first task is left out."""
    from voxblock import run
    from voxblock.agglomerate import pipeline

    planner = Planner(command, sample, started)
    token = run.PLANNER.set(planner)
    agglomerate = pipeline.PLANNER.set(planner.agglomerate)
    try:
        with _segment_writes_skipped(planner):
            yield planner
    finally:
        pipeline.PLANNER.reset(agglomerate)
        run.PLANNER.reset(token)


@contextlib.contextmanager
def _segment_writes_skipped(planner: Planner) -> Iterator[None]:
    """segment_blockwise records its identity (and forgets other runs) right before its first
    pass: in a plan, neither; forgetting means no block is done."""
    from voxblock.segment import storage

    record, clear = storage.Segmentation.record, storage.Segmentation.clear

    def forget(self: Any) -> None:
        planner.cleared = True

    def remember(self: Any, identity: Any) -> None:
        planner.segmentation = self

    storage.Segmentation.record = remember  # type: ignore[method-assign]
    storage.Segmentation.clear = forget  # type: ignore[method-assign]
    try:
        yield
    finally:
        storage.Segmentation.record, storage.Segmentation.clear = record, clear  # type: ignore[method-assign]


def plan_command(command: str, call: Any, sample: bool = True, started: float | None = None) -> Plan:
    """Plan what `call()` (a run through `run_tasks`) would do: its checks, then its first tasks."""
    with planning(command, sample, started) as planner:
        try:
            call()
        except Planned:
            pass
    if not planner.tasks:
        raise VoxblockError(f"{command}: nothing to plan (no task would run)")
    first = planner.tasks[0]
    passes = list(planner.passes)
    if planner.segmentation is not None:
        passes += segment_passes(planner)
    plan = Plan(
        command,
        first.num_workers,
        _parallel(first),
        passes,
        startup_seconds=planner.startup or 0.0,
        memory_limit=_memory_limit(first),
    )
    return finish(plan)


def plan_blockwise(*args: Any, sample: bool = True, **kwargs: Any) -> Plan:
    """The plan of `run_blockwise(*args, **kwargs)`: its checks, counts and estimate; nothing
    is written to its output or run directory. `print(plan.render())`, or `plan.to_json()`."""
    from voxblock.run import run_blockwise

    return plan_command("run_blockwise", lambda: run_blockwise(*args, **kwargs), sample=sample)


def process_started() -> float | None:
    """When this process started (time.time(); Linux: /proc), to count a command's start-up."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def segment_passes(planner: Planner) -> list[PassPlan]:
    """segment_blockwise's solve and relabel, from its first pass's grid (not sampled): the
    solve level by level over super-blocks, the relabel over the same blocks (at faces: each
    labelled again, as long as in pass 1) or over the write blocks (with context: a look-up)."""
    import numpy as np

    from voxblock.layout import plan_layout
    from voxblock.rundir import RunDirectory
    from voxblock.segment.pipeline import solve_fanout

    task, first, seg = planner.tasks[0], planner.passes[0], planner.segmentation
    blocking = task.blocking
    counts = [len(a) for a in axis_blocks(blocking)]
    levels = solve_levels(counts, solve_fanout(len(counts)))
    solve = PassPlan("solve", sum(levels), how=f"not sampled: {len(levels)} level(s) of super-blocks")
    solve.seconds_per_block = 0.01
    solve.bookkeeping_files = len(levels) * BOOKKEEPING_FILES
    solve.wall_seconds = len(levels) * TASK_OVERHEAD_SECONDS + sum(levels) * 0.01 / first_parallel(task)
    solve.core_hours = sum(levels) * 0.01 / 3600
    faces = type(task.worker).__name__ == "StitchFaces"
    relabel = PassPlan("relabel", task.num_blocks)
    if first.to_run == 0 and not planner.cleared:
        relabel.done = min(relabel.blocks, RunDirectory(seg.run_dir / "relabel").done_blocks())
    fraction = relabel.to_run / relabel.blocks if relabel.blocks else 0.0
    voxel_size = _voxel_size(task)
    output = seg.output
    target = blocking.target_roi
    relabel.bytes_written = int(8 * covered_voxels(blocking, target, voxel_size, "write") * fraction)
    relabel.bytes_read = int(first.bytes_read * fraction) if faces else int(relabel.bytes_written / 2)
    relabel.block_voxels = first.block_voxels
    relabel.border_blocks = first.border_blocks
    write = blocking.write_roi.shape / voxel_size
    if output.path.exists():
        from voxblock import arrays

        array = arrays.open_input(output, role="output")
        unit, origin = arrays.spatial_write_unit(array) * array.voxel_size, array.roi.begin
    else:
        layout = plan_layout(write, task.chunk_shape, task.shard_shape)
        unit, origin = layout.write_unit * voxel_size, target.begin
    relabel.files = int(units_touched(blocking, target, unit, origin) * fraction)
    relabel.bookkeeping_files = BOOKKEEPING_FILES + BOOKKEEPING_FILES_PER_WORKER * task.num_workers
    relabel.memory = estimate_memory(int(np.prod(write)) * 8, int(np.prod(write)) * 8)
    if first.seconds_per_block is not None:
        # at faces a block is labelled again as in pass 1; with context it is looked up: less
        relabel.seconds_per_block = first.seconds_per_block * (1.0 if faces else 0.5)
        relabel.worker_start = first.worker_start
        relabel.how = "not sampled: " + ("as pass 1 (labelled again)" if faces else "half of pass 1's")
    finish_pass(relabel, task.num_workers, first_parallel(task))
    if first.to_run == 0 and relabel.to_run == 0:
        solve.done, solve.wall_seconds, solve.core_hours = solve.blocks, TASK_OVERHEAD_SECONDS, 0.0
    return [solve, relabel]


# -- agglomerate: its graph, solve and relabel after the fragments --------------------------------

# the graph pass's seconds per block over the fragments pass's, when it has no fragments to sample
# (measured on tests/test_plan.py's agglomerate volume: 0.33 between the two samples' seconds per
# block, 0.83 between the real run's blocks per second, scheduling included)
GRAPH_PER_FRAGMENTS_BLOCK = 0.6
# the solve: seconds per edge (read from the database, then the method's own work) and per node
# read, measured on random graphs of 10^5 and 10^6 edges (mws_lut 4.4-9.5 us, threshold_lut
# 0.8-1.4 us, SQLite's fetch about 1 us a row)
SOLVE_SECONDS_PER_EDGE = {"mws": 5e-6, "threshold": 1.5e-6}
READ_SECONDS_PER_ROW = 1e-6
SOLVE_START_SECONDS = 0.1  # imports and the table's file, when no scratch graph was solved
# finalize: one SQL reduction over every partial row (sums grouped by id and by (u, v))
FINALIZE_SECONDS_PER_ROW = 2e-6
SOLVE_BYTES_PER_EDGE = 64  # u, v, affinity and the method's order and clusters
SCRATCH_LUT_MAX = 10**6  # entries of the table a relabel sample looks fragments up in


@dataclass
class StoredGraph:
    """What a graph database holds already: blocks of this grid, partial rows, its last finalize."""

    blocks: int = 0
    partial_rows: int = 0
    finalized: Any = None  # graphdb.GraphSummary, if no block was written since


@dataclass
class GraphSize:
    nodes: int | None = None
    edges: int | None = None
    how: str = "no graph to size"


def stored_graph(db: str, num_blocks: int) -> StoredGraph:
    """Read-only: the database's blocks (a block is done when `graphdb.block_done` finds its id;
    `check_graph` has made sure its ids are this grid's, 0 .. num_blocks - 1), nothing created."""
    import sqlite3

    from voxblock.agglomerate import graphdb

    postgresql = db.startswith(("postgresql://", "postgres://"))
    if not postgresql and not Path(db).is_file():
        return StoredGraph()
    if postgresql:
        connection = graphdb._connect_postgresql(db, 30.0)
    else:
        connection = sqlite3.connect(f"file:{Path(db).resolve()}?mode=ro", uri=True)
    graph = graphdb.GraphDB(
        db, "postgresql" if postgresql else "sqlite", connection, graphdb.GraphSource("", (), ())
    )
    try:
        cursor = connection.cursor()
        tables = graphdb._tables(graph, cursor)
        if not {"voxblock_blocks", "voxblock_nodes", "voxblock_edges", "voxblock_graph"} <= tables:
            return StoredGraph()
        cursor.execute(f"SELECT COUNT(*) FROM voxblock_blocks WHERE block >= 0 AND block < {int(num_blocks)}")
        blocks = int(cursor.fetchone()[0])
        rows = graphdb._count(cursor, "voxblock_nodes") + graphdb._count(cursor, "voxblock_edges")
        if postgresql:
            connection.rollback()
        return StoredGraph(blocks, rows, graphdb.finalized(graph))
    finally:
        connection.close()


def _fragments_to_read(settings: dict[str, Any], mapping: dict[str, str]) -> str | None:
    """Fragments a later pass's sample can read: the fragments sample's scratch copy (its blocks
    written), else the real ones if they exist, else none."""
    real = str(settings["fragments"])
    scratch = mapping.get(_array_key(real))
    if scratch is not None:
        return scratch
    return real if settings["fragments"].path.exists() else None


def agglomerate_passes(
    planner: Planner, settings: dict[str, Any], scratch: Path, mapping: dict[str, str]
) -> list[PassPlan]:
    """agglomerate_blockwise's graph, solve and relabel, each as its run would do it, nothing written:
    the graph's done blocks from the database (read only), a few graph blocks sampled into a scratch
    SQLite database (reading the fragments sample's scratch fragments on a fresh run), that scratch
    graph finalized and solved here (timed), the solve scaled from the graph's nodes and edges, the
    relabel checked and sampled as a task against a scratch table."""
    fragments = planner.passes[0] if settings["made_by"] != "given" else None
    graph, stored, size, solved = graph_pass(planner, settings, scratch, mapping, fragments)
    solve = solve_pass(settings, size, solved)
    relabel = relabel_pass(planner, settings, scratch, mapping, graph, stored, size)
    return [graph, solve, relabel]


def graph_pass(
    planner: Planner,
    settings: dict[str, Any],
    scratch: Path,
    mapping: dict[str, str],
    fragments: PassPlan | None,
) -> tuple[PassPlan, StoredGraph, GraphSize, float | None]:
    import numpy as np
    from funlib.geometry import Coordinate, Roi

    from voxblock import arrays
    from voxblock.agglomerate.rag import rag_context
    from voxblock.geometry import Blocking

    watershed, source = settings["watershed"], settings["source"]
    voxel_size, volume, block = settings["voxel_size"], settings["volume"], settings["block"]
    context = Coordinate(rag_context(settings["offsets"])) * voxel_size
    blocking = Blocking(
        volume.grow(context, context),
        Roi(-context, block + context * 2),
        Roi((0,) * voxel_size.dims, block),
        "overhang",
    )
    db = str(settings["db"])
    sqlite = not db.startswith(("postgresql://", "postgres://"))
    stored = stored_graph(db, blocking.num_blocks)
    plan = PassPlan("graph", blocking.num_blocks, min(stored.blocks, blocking.num_blocks))
    fraction = plan.to_run / plan.blocks if plan.blocks else 0.0
    readable = _fragments_to_read(settings, mapping)
    fragment_bytes = np.dtype(arrays.open_input(readable).dtype).itemsize if readable else 8
    per_voxel = fragment_bytes + np.dtype(source.dtype).itemsize * math.prod(
        source.shape[: source.channel_dims]
    )
    plan.bytes_read = int(per_voxel * covered_voxels(blocking, volume, voxel_size, "read") * fraction)
    plan.block_voxels = tuple(int(b) for b in block / voxel_size)
    plan.border_blocks = border_blocks(blocking)
    if sqlite and (plan.to_run > 0 or stored.finalized is None):
        path = Path(db)
        plan.files = sum(
            not p.exists()
            for p in (path, Path(f"{db}-wal"), Path(f"{db}-shm"), path.parent / f"{path.stem}-meta.json")
        )
    plan.bookkeeping_files = BOOKKEEPING_FILES + BOOKKEEPING_FILES_PER_WORKER * watershed.num_workers
    plan.memory = estimate_memory(per_voxel * math.prod(blocking.read_roi.shape / voxel_size), 0)
    plan.warnings += block_warnings(blocking, voxel_size)
    size = GraphSize()
    if stored.finalized is not None and plan.to_run == 0:
        size = GraphSize(stored.finalized.nodes, stored.finalized.edges, "the finalized graph's")
    solved: float | None = None
    finalize_seconds = 0.0
    if planner.sample and plan.to_run > 0 and readable is not None:
        sampled, sample_size, finalize_seconds, solved = sample_graph(
            settings, blocking, readable, scratch, mapping, stored, plan.to_run
        )
        plan.seconds_per_block = sampled.per_block(blocking)
        plan.worker_start = sampled.start
        plan.memory, plan.memory_how = sampled.peak_rss, "measured (peak RSS of the sample)"
        origin = (
            "the fragments sample's scratch fragments"
            if readable != str(settings["fragments"])
            else "the fragments"
        )
        plan.how = (
            f"from {len(sampled.times)} blocks sampled ({sampled.border} at the border) on {origin}, "
            f"into a scratch SQLite database; finalize {finalize_seconds:.1f} s (funlib's import and the "
            "reduction, measured on the scratch graph, scaled by its rows)"
        )
        size = sample_size
    elif plan.to_run > 0 and fragments is not None and fragments.seconds_per_block is not None:
        plan.seconds_per_block = fragments.seconds_per_block * GRAPH_PER_FRAGMENTS_BLOCK
        plan.worker_start = fragments.worker_start
        plan.how = (
            f"not sampled (no fragments to read): {GRAPH_PER_FRAGMENTS_BLOCK}x the fragments pass's "
            "seconds per block (the ratio measured on voxblock's test volume)"
        )
    elif plan.to_run == 0:
        plan.how = "nothing to run" + ("" if stored.finalized is not None else "; finalize")
        if stored.finalized is None:
            finalize_seconds = _funlib_import_seconds() + stored.partial_rows * FINALIZE_SECONDS_PER_ROW
    if size.edges is None and stored.blocks and stored.partial_rows:
        # a partial graph: its rows per block over every block
        size = GraphSize(None, None, "no estimate")
    finish_pass(plan, watershed.num_workers, _parallel(watershed))
    if plan.wall_seconds is not None and plan.core_hours is not None:
        plan.wall_seconds += finalize_seconds
        plan.core_hours += finalize_seconds / 3600
    return plan, stored, size, solved


def _funlib_import_seconds() -> float:
    """What finalize spends importing funlib's graph classes in the driver: measured here."""
    begin = time.perf_counter()
    import funlib.persistence.graphs  # noqa: F401

    return time.perf_counter() - begin


def sample_graph(
    settings: dict[str, Any],
    blocking: Blocking,
    readable: str,
    scratch: Path,
    mapping: dict[str, str],
    stored: StoredGraph,
    to_run: int,
) -> tuple[Sample, GraphSize, float, float]:
    """A few graph blocks in a fresh worker process into a scratch SQLite database; then that graph
    finalized and solved here, timed: (sample, the graph's size, finalize seconds, solve seconds)."""
    import sqlite3

    from voxblock.agglomerate.build import rag_task
    from voxblock.agglomerate.graphdb import GraphSource, finalize, open_graph
    from voxblock.agglomerate.solve import graph_lut

    watershed = settings["watershed"]
    scratch_db = scratch / "graph.sqlite"
    task = rag_task(
        readable,
        settings["affinities"],
        scratch_db,
        settings["block"],
        settings["offsets"],
        watershed.num_workers,
        scratch / "graph-run",
        **settings["task_options"],
    )
    sampled = sample_task(task, scratch, mapping)
    if sampled is None:
        raise VoxblockError("graph: its sample blocks could not be run in a scratch database")
    connection = sqlite3.connect(scratch_db)
    try:
        count = [
            int(connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
            for table in ("voxblock_blocks", "voxblock_nodes", "voxblock_edges")
        ]
        record = json.loads(
            connection.execute("SELECT value FROM voxblock_graph WHERE key = 'source'").fetchone()[0]
        )
    finally:
        connection.close()
    blocks, node_rows, edge_rows = count
    scale = to_run / max(blocks, 1)
    nodes = int(node_rows * scale) + (stored.finalized.nodes if stored.finalized else 0)
    edges = int(edge_rows * scale) + (stored.finalized.edges if stored.finalized else 0)
    all_rows = stored.partial_rows + (node_rows + edge_rows) * scale
    imported = _funlib_import_seconds()
    source = GraphSource(record["fragments"], tuple(record["offset"]), tuple(record["voxel_size"]))
    graph = open_graph(scratch_db, source)
    try:
        begin = time.perf_counter()
        finalize(graph)
        reduced = time.perf_counter() - begin
    finally:
        graph.close()
    begin = time.perf_counter()
    graph_lut(scratch_db, settings["method"], settings["threshold"])
    solved = time.perf_counter() - begin
    finalize_seconds = imported + reduced + all_rows * FINALIZE_SECONDS_PER_ROW
    how = f"{node_rows} nodes and {edge_rows} edges in {blocks} sampled blocks, over {to_run} blocks"
    return sampled, GraphSize(nodes, edges, how), finalize_seconds, solved


def solve_pass(settings: dict[str, Any], size: GraphSize, solved: float | None) -> PassPlan:
    """graph_lut in the driver: read the finalized graph, solve it, save the table (one file)."""
    method = settings["method"]
    plan = PassPlan("solve", 1, files=1)
    plan.memory_how = "estimated from the graph's edges"
    if size.edges is None or size.nodes is None:
        plan.how = "not estimated: no graph to size (no fragments to sample and no finalized graph)"
        return plan
    rate = SOLVE_SECONDS_PER_EDGE[method]
    start = solved if solved is not None else SOLVE_START_SECONDS
    seconds = start + size.edges * (READ_SECONDS_PER_ROW + rate) + size.nodes * READ_SECONDS_PER_ROW
    plan.bytes_read = size.edges * 24 + size.nodes * 8
    plan.memory = BASE_WORKER_BYTES + size.edges * SOLVE_BYTES_PER_EDGE + size.nodes * 32
    plan.seconds_per_block = plan.wall_seconds = seconds
    plan.core_hours = seconds / 3600
    plan.how = (
        f"{size.nodes} nodes, {size.edges} edges ({size.how}) at {rate * 1e6:.1f} us per edge ({method}) "
        f"+ {READ_SECONDS_PER_ROW * 1e6:.0f} us per row read"
        + (f", plus {solved:.2f} s measured solving the scratch graph" if solved is not None else "")
    )
    return plan


def previous_relabel(settings: dict[str, Any], graph: PassPlan, stored: StoredGraph) -> BlockwiseTask | None:
    """The relabel task the run will resume, when the solve gives the table an earlier relabel used:
    the graph unchanged (finalized, no block to run) and a table of this method and threshold (the
    output's record, or one an interrupted relabel was writing with). None: a new table, every block."""
    from voxblock.agglomerate.pipeline import AGGLOMERATE_KEY, _without_password
    from voxblock.agglomerate.solve import lut_name

    if graph.to_run > 0 or stored.finalized is None:
        return None
    method, threshold = settings["method"], settings["threshold"]
    output, run_root = settings["output"], settings["run_root"]
    candidates: list[Path] = []
    if output.path.exists():
        import zarr

        record = dict(zarr.open(str(output.path), mode="r").attrs).get(AGGLOMERATE_KEY) or {}
        if (
            record.get("method") == method
            and record.get("threshold") == threshold
            and record.get("fragments") == str(settings["fragments"])
            and record.get("db") == _without_password(str(settings["db"]))
        ):
            candidates.append(Path(record["lut"]))
    candidates += sorted((run_root / "luts").glob(f"{lut_name(method, threshold)}-*.npz"))
    for lut in candidates:
        if not lut.is_file():
            continue
        task = _relabel_task(settings, str(settings["fragments"]), str(lut))
        recorded = task.run_dir.read_task() if task.run_dir.path.is_dir() else None
        if recorded is not None and recorded.get("key") == task.task_key:
            return task
    return None


def _relabel_task(settings: dict[str, Any], fragments: str, lut: str) -> BlockwiseTask:
    """The relabel task as agglomerate_blockwise makes it."""
    from voxblock.task import BlockwiseTask

    write = settings["write"]
    return BlockwiseTask(
        "relabel",
        settings["volume"],
        write,
        write,
        fit="shrink",
        task_id="relabel",
        run_dir=str(settings["run_root"] / "relabel"),
        overwrite=True,
        input=fragments,
        output=str(settings["output"]),
        lut=lut,
        dtype="uint64",
        **settings["common"],
    )


def relabel_pass(
    planner: Planner,
    settings: dict[str, Any],
    scratch: Path,
    mapping: dict[str, str],
    graph: PassPlan,
    stored: StoredGraph,
    size: GraphSize,
) -> PassPlan:
    """The relabel task checked, counted and sampled as any task (its input the fragments, or the
    fragments sample's scratch copy; its table a scratch one of the graph's size)."""
    import numpy as np

    from voxblock.agglomerate.pipeline import _save_lut
    from voxblock.geometry import Blocking

    write = settings["write"]
    previous = previous_relabel(settings, graph, stored)
    readable = _fragments_to_read(settings, mapping)
    if readable is None:
        blocking = Blocking(settings["volume"], write, write, "shrink")
        return PassPlan("relabel", blocking.num_blocks, how="not sampled (no fragments to read)")
    # the table the solve will make is not there yet: one of its size (the run's own, if it resumes
    # one, lies in the run directory, which a check sees in scratch)
    entries = max(1, min(size.nodes or 1, SCRATCH_LUT_MAX))
    ids = np.arange(1, entries + 1, dtype=np.uint64)
    task = _relabel_task(settings, readable, str(_save_lut(scratch / "luts", "plan", np.stack([ids, ids]))))
    specs, existing = check_task(task, scratch, set())
    done = done_blocks(previous) if previous is not None else 0
    plan = count_task(task, specs, existing, done)
    if planner.sample and plan.to_run > 0:
        sampled = sample_task(task, scratch, mapping)
        if sampled is not None:
            plan.seconds_per_block = sampled.per_block(task.blocking)
            plan.worker_start = sampled.start
            plan.memory, plan.memory_how = sampled.peak_rss, "measured (peak RSS of the sample)"
            plan.how = f"from {len(sampled.times)} blocks sampled ({sampled.border} at the border)"
    elif planner.sample:
        plan.how = "nothing to run"
    if previous is None and plan.to_run > 0:
        plan.how += (
            "; all blocks: a new table (the graph, method or threshold differ from the last relabel's)"
        )
    finish_pass(plan, task.num_workers, _parallel(task))
    return plan


def first_parallel(task: BlockwiseTask) -> int:
    return _parallel(task)


def _voxel_size(task: BlockwiseTask) -> Any:
    from voxblock import arrays

    for name in _inputs(task.worker):
        if _exists(name):
            return arrays.open_input(name).voxel_size
    raise VoxblockError(f"{task.task_id}: no input to read the voxel size from")


def finish(plan: Plan) -> Plan:
    """The plan's own warnings: memory over the limit, millions of files."""
    if plan.memory_limit is not None:
        for p in plan.passes:
            if p.memory is not None and p.memory > plan.memory_limit:
                p.warnings.append(
                    f"a worker needs about {_size(p.memory)} ({p.memory_how}), over the "
                    f"{_size(plan.memory_limit)} per worker asked for (--memory, [cluster] memory)"
                )
    files = sum(p.files + p.bookkeeping_files for p in plan.passes)
    if files > MANY_FILES:
        plan.warnings.append(
            f"{files} files will be created: file systems and backups suffer past a million; "
            "use larger blocks or shards (--shard-size)"
        )
    return plan


def _memory_limit(task: BlockwiseTask) -> int | None:
    memory = getattr(task.compute, "memory", None)
    if memory is None:
        return None
    from voxblock.cluster import megabytes

    return megabytes(memory) << 20


# -- checking a task without creating anything -----------------------------------------------


def check_lock(task: BlockwiseTask) -> None:
    """The refusal `RunDirectory.acquire_lock` makes when another live run holds the lock."""
    task.run_dir.check_unlocked(", ".join(task.worker.outputs()) or str(task.run_dir.path))


def _write_roots(task: BlockwiseTask) -> list[Path]:
    """Directories a task writes into besides its outputs: its run directory's tree."""
    path = task.run_dir.path.resolve()
    root = next((p for p in [path, *path.parents] if p.name.endswith(".voxblock")), path)
    return [root]


def redirected(worker: Any, roots: list[Path], scratch: Path, mapping: dict[str, str], outputs: bool) -> Any:
    """A copy of a dataclass worker whose directories under `roots` (and, with `outputs`, whose
    output arrays) are in `scratch`; `mapping` keeps one scratch name per real one. None if the
    worker is no dataclass."""
    if not dataclasses.is_dataclass(worker):
        return None
    from voxblock import arrays

    names = {str(arrays.ArrayName.parse(n)): n for n in worker.outputs()} if outputs else {}
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(worker):
        value = getattr(worker, f.name)
        if not isinstance(value, str) or not value:
            continue
        new = None
        if outputs and _array_key(value) in names:
            new = mapping.setdefault(_array_key(value), _scratch_array(value, scratch, len(mapping)))
        elif outputs and _array_key(value) in mapping:  # an upstream task's output, read here
            new = mapping[_array_key(value)]
        else:
            path = Path(value).resolve()
            for root in roots:
                if path == root or root in path.parents:
                    new = str(scratch / "dirs" / root.name / path.relative_to(root))
        if new is not None:
            changes[f.name] = new
    return dataclasses.replace(worker, **changes)


def _array_key(value: str) -> str:
    from voxblock import arrays

    try:
        return str(arrays.ArrayName.parse(value))
    except Exception:
        return value


def _scratch_array(value: str, scratch: Path, n: int) -> str:
    """A scratch array name for `value`, in a container of the same zarr format."""
    from voxblock import arrays

    name = arrays.ArrayName.parse(value)
    container = scratch / f"out{n}{name.container.suffix}"
    if not container.exists():
        container.mkdir(parents=True)
        fmt = arrays.container_format(name)
        if fmt == 2:
            (container / ".zgroup").write_text('{"zarr_format": 2}')
        else:
            (container / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    return f"{container}/{name.dataset}"


def check_task(task: BlockwiseTask, scratch: Path, planned: set[str]) -> tuple[list[Any], list[Any]]:
    """What `BlockwiseTask.prepare` checks, with nothing created: (specs of the outputs to create,
    with their layouts; specs of outputs that exist). A refusal raises as the run's would."""
    from unittest import mock

    from voxblock import arrays, formats
    from voxblock.nodes import check_output_container

    for name in task.worker.outputs():
        check_output_container(name)
    check_lock(task)
    created: list[Any] = []
    existing: list[Any] = []
    check_output = arrays.check_output

    def checked(spec: Any, *args: Any, **kwargs: Any) -> str:
        action = check_output(spec, *args, **kwargs)
        if isinstance(spec, arrays.OutputSpec) and action != "create":
            existing.append(spec)
        return action

    def create(spec: Any, provenance: Any, layout: Any) -> None:
        formats.check_output_name(spec.name.container, spec.name.dataset, new_level=spec.new_level)
        created.append((spec, layout))

    # its own directories (edges, faces...) in scratch; its outputs where they are, not created
    worker = redirected(task.worker, _write_roots(task), scratch / "check", {}, outputs=False)
    worker = worker if worker is not None else task.worker
    if _reads_planned_output(worker, planned):
        return created, existing  # its input is made by an upstream task: checked when it exists
    with (
        mock.patch.object(arrays, "check_output", checked),
        mock.patch.object(arrays, "create_output", create),
        mock.patch.object(arrays, "record_provenance", lambda name, provenance: None),
    ):
        worker.prepare(task.preparation())
    return created, existing


def _inputs(worker: Any) -> list[str]:
    """The arrays a worker reads over its blocks' read ROIs: its context inputs, or its `input`."""
    found = list(worker.context_inputs())
    given = getattr(worker, "input", None)
    if isinstance(given, str) and given and _array_key(given) not in {_array_key(n) for n in found}:
        found.append(given)
    return found


def _reads_planned_output(worker: Any, planned: set[str]) -> bool:
    return any(_array_key(name) in planned and not _exists(name) for name in _inputs(worker))


def _exists(name: str) -> bool:
    from voxblock import arrays

    return arrays.ArrayName.parse(name).path.exists()


def done_blocks(task: BlockwiseTask) -> int:
    """Blocks a run of `task` would skip: the done markers of its run directory, if that holds
    this task (the same key), as `prepare` decides between resuming and starting afresh."""
    run_dir = task.run_dir
    if task.fresh or not run_dir.path.is_dir():
        return 0
    recorded = run_dir.read_task()
    if recorded is None or recorded.get("key") != task.task_key or not run_dir.tracking_readable():
        return 0
    return min(task.num_blocks, task.done_blocks())


def count_task(task: BlockwiseTask, created: list[Any], existing: list[Any], done: int) -> PassPlan:
    """Blocks, bytes and files of a task, from its blocking and its arrays' dtypes."""
    import numpy as np

    from voxblock import arrays

    blocking = task.blocking
    plan = PassPlan(task.task_id, task.num_blocks, done)
    fraction = plan.to_run / plan.blocks if plan.blocks else 0.0
    read_block = written_block = 0
    voxel_size = None
    for name in _inputs(task.worker):
        if not _exists(name):
            continue
        source = arrays.open_input(name)
        voxel_size = source.voxel_size
        per_voxel = np.dtype(source.dtype).itemsize * math.prod(source.shape[: source.channel_dims])
        plan.bytes_read += int(
            per_voxel * covered_voxels(blocking, source.roi, voxel_size, "read") * fraction
        )
        read_block += per_voxel * math.prod(blocking.read_roi.shape / voxel_size)
        for warning in _read_alignment(blocking, source, name):
            plan.warnings.append(warning)
    outputs: list[tuple[Any, Any, Any]] = [(spec, layout.write_unit, None) for spec, layout in created]
    for spec in existing:
        array = arrays.open_input(spec.name, role="output")
        outputs.append((spec, arrays.spatial_write_unit(array), array))
    for spec, unit, array in outputs:
        voxel_size = spec.voxel_size
        per_voxel = np.dtype(spec.dtype).itemsize * math.prod(spec.channels)
        plan.bytes_written += int(
            per_voxel * covered_voxels(blocking, spec.roi, voxel_size, "write") * fraction
        )
        written_block += per_voxel * math.prod(blocking.write_roi.shape / voxel_size)
        origin = array.roi.begin if array is not None else spec.roi.begin
        world = unit * voxel_size
        plan.files += int(units_touched(blocking, spec.roi, world, origin) * fraction)
        if array is not None and task.num_workers == 1:
            problem = blocking.chunk_misalignment(array.roi, world)
            if problem is not None:
                plan.warnings.append(
                    f"output {spec.name}: its write units of {tuple(unit)} voxels and {problem}: "
                    "blocks share them, so this run must keep to one worker (more are refused)"
                )
    plan.bookkeeping_files = BOOKKEEPING_FILES + BOOKKEEPING_FILES_PER_WORKER * task.num_workers
    if voxel_size is not None:
        plan.block_voxels = tuple(int(s) for s in blocking.write_roi.shape / voxel_size)
        plan.warnings += block_warnings(blocking, voxel_size)
    plan.border_blocks = border_blocks(blocking)
    plan.memory = estimate_memory(read_block, written_block)
    if task.batching is not None:
        plan.batch, plan.batches = tuple(task.batching.batch), task.num_batches
    elif task.num_blocks > MANY_BLOCKS:
        plan.warnings.append(scheduler_warning(task.num_blocks))
    return plan


def scheduler_warning(blocks: int) -> str:
    """What a run of many small-enough blocks loses to the scheduler, and the cure."""
    return (
        f"{blocks} blocks: the scheduler hands out about {SCHEDULER_BLOCKS_PER_SECOND} blocks a second, "
        f"{_duration(blocks / SCHEDULER_BLOCKS_PER_SECOND)} for these whatever the workers; --batch 2 "
        "(batch=2) hands them out 2x2x2 at a time, the same output (a failure redoes its batch)"
    )


def _read_alignment(blocking: Blocking, source: Any, name: str) -> list[str]:
    from voxblock import arrays

    chunk = arrays.spatial_chunk_shape(source) * source.voxel_size
    if all(s % c == 0 for s, c in zip(blocking.write_roi.shape, chunk)) or any(
        c % s == 0 for s, c in zip(blocking.write_roi.shape, chunk)
    ):
        return []
    return [
        f"input {name}: blocks of {tuple(blocking.write_roi.shape / source.voxel_size)} voxels are "
        f"not aligned to its chunks of {tuple(chunk / source.voxel_size)}: each block decodes "
        "parts of chunks its neighbours decode again"
    ]


# -- sampling: a few real blocks, one worker process, scratch outputs --------------------------


@dataclass
class Sample:
    times: list[float]  # seconds per sampled block
    borders: list[bool]  # whether each is at the border
    start: float  # the worker process's start to its first block, plus its first block's warm-up
    peak_rss: int

    @property
    def border(self) -> int:
        return sum(self.borders)

    def per_block(self, blocking: Blocking) -> float:
        """Seconds per block over the grid: border and interior blocks weighted by their counts."""
        at_border = [t for t, b in zip(self.times, self.borders) if b]
        inside = [t for t, b in zip(self.times, self.borders) if not b]
        mean = sum(self.times) / len(self.times)
        if not at_border or not inside:
            return mean
        total = blocking.num_blocks
        border = border_blocks(blocking)
        return (border * _mean(at_border) + (total - border) * _mean(inside)) / total


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def sample_blocks(blocking: Blocking, count: int = SAMPLE_BLOCKS) -> list[tuple[Roi, Roi, bool]]:
    """Up to `count` blocks spread over the grid, at the border and inside: (read, write, border)."""
    from voxblock.geometry import _block

    axes = axis_blocks(blocking)
    if not all(axes):
        return []
    picks = [
        [len(a) // 2 for a in axes],  # the middle
        [0 for _ in axes],  # a corner
        [len(a) - 1 for a in axes],  # the opposite corner
        [0 if d == 0 else len(a) // 2 for d, a in enumerate(axes)],  # a face
        [len(a) // 3 for a in axes],
    ]
    chosen: list[tuple[Roi, Roi, bool]] = []
    seen: set[tuple[int, ...]] = set()
    for index in picks:
        key = tuple(index)
        if key in seen:
            continue
        seen.add(key)
        read, write = _block([axis[i] for axis, i in zip(axes, index)])
        border = any(i in (0, len(a) - 1) for i, a in zip(index, axes))
        chosen.append((read, write, border))
        if len(chosen) == count:
            break
    return chosen


def sample_task(task: BlockwiseTask, scratch: Path, mapping: dict[str, str]) -> Sample | None:
    """Run a few of the task's blocks in one fresh worker process, writing into scratch copies of
    its outputs (same dtype, shape and layout); None if its outputs cannot be redirected."""
    from voxblock.job import Job

    worker = redirected(task.worker, _write_roots(task), scratch, mapping, outputs=True)
    if worker is None:
        return None
    where = scratch / f"task{len(os.listdir(scratch))}"
    where.mkdir()
    preparation = dataclasses.replace(task.preparation(), provenance={"task": "plan"}, overwrite=True)
    worker.prepare(preparation)  # creates the scratch outputs
    blocks = sample_blocks(task.blocking)
    if not blocks:
        return None
    job = Job(
        worker=worker, run_dir=where, shrink=task.blocking if task.daisy_fit != task.blocking.fit else None
    )
    job.save()
    spec = {
        "total": _roi(task.blocking.total_roi),
        "blocks": [[_roi(r), _roi(w)] for r, w, _ in blocks],
    }
    (where / "sample.json").write_text(json.dumps(spec))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "voxblock.plan", str(where)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        error = (done.stderr.strip().splitlines() or ["worker process failed"])[-1]
        raise VoxblockError(f"{task.task_id}: a sample block failed in a scratch copy: {error}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    times = result["times"]
    warm_up = max(0.0, times[0] - result["again"])
    times[0] = result["again"]
    return Sample(
        times=times,
        borders=[b for _, _, b in blocks],
        start=result["ready"] - started + warm_up,
        peak_rss=int(result["peak_rss"]),
    )


def _roi(roi: Roi) -> list[list[int]]:
    return [list(roi.offset), list(roi.shape)]


def _sample_main(where: str) -> None:
    """The sample's worker process: set up as a worker does, then time each block (the first
    twice: its first run holds the warm-up a worker pays once); print the times as JSON."""
    import resource

    import daisy.v2 as daisy
    from funlib.geometry import Roi

    from voxblock.job import Job, keep_freed_memory, process_block
    from voxblock.rundir import RunDirectory

    keep_freed_memory()
    spec = json.loads((Path(where) / "sample.json").read_text())
    job = Job.load(where)
    job.setup()
    ready = time.time()
    run_dir = RunDirectory(Path(where) / "run")
    total = Roi(*spec["total"])
    times = []
    blocks = [
        daisy.Block(total, Roi(*read), Roi(*write), task_id="plan", block_id=i)
        for i, (read, write) in enumerate(spec["blocks"])
    ]
    for block in blocks:
        begin = time.perf_counter()
        process_block(job, block, run_dir)
        times.append(time.perf_counter() - begin)
    begin = time.perf_counter()
    process_block(job, blocks[0], run_dir)
    again = time.perf_counter() - begin
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"ready": ready, "times": times, "again": again, "peak_rss": peak}))


if __name__ == "__main__":
    _sample_main(sys.argv[1])
