"""segment_blockwise: per-block segmentation, a global solve, a relabel.

Two ways to stitch blocks. With context (any segment function): pass 1
(fragments) labels every block over its read ROI, stores the write
ROI part with block-position IDs, and records edges where its labels meet
fragments that neighbouring blocks wrote into its context. The task runs
with `read_write_conflict`, so of two neighbours one always runs after the
other and sees its fragments: every pair of touching blocks is compared
once. Pass 2 (solve) turns all edges into a lookup table per block, level
by level over super-blocks (`segment.hierarchy`: no process holds every
fragment); pass 3 (relabel) maps each block's fragments through its own. At faces (connected components of a
per-voxel foreground, such as threshold-label; see `segment.faces`): pass 1
labels each block alone and keeps only its outermost layers, pass 3 labels
each block again and writes its segments, so no fragments are stored. Each
pass is a resumable task with its own run directory; edges and the table
are kept in the output container. What pass 1 hands to the others (each
block's edges and, at faces, its outer layers) is appended to pack files,
a pair per worker process (`voxblock.packfile`, `segment.storage`), so
the run directory's files grow with the workers, not the blocks.

A segmentation that fits in one worker (`fits_in_driver`: a built-in
function on a few blocks, Local compute, no timeout) runs every pass in
the driver, as `run_tasks` runs a small job of pure workers: no scheduler,
no worker processes, the same done markers, retries and reports; at faces
each block's labels are kept from pass 1 for pass 3 (`passes.OWN_LABELS`).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from funlib.geometry import Coordinate, Roi

from voxblock import arrays
from voxblock.compute import IN_DRIVER, Local, in_process_off
from voxblock.errors import VoxblockError
from voxblock.geometry import Blocking, check_on_grid
from voxblock.nodes import check_output_container
from voxblock.options import TaskOptions, split_positional
from voxblock.rundir import default_run_dir
from voxblock.segment.functions import SegmentFunction
from voxblock.segment.hierarchy import Hierarchy, default_fanout
from voxblock.segment.ids import BlockGrid
from voxblock.segment.passes import (
    OWN_LABELS,
    LabelSegments,
    RelabelFragments,
    SegmentBlocks,
    SolveStep,
    StitchFaces,
    create_tables,
    save_array,
)
from voxblock.segment.storage import (
    SEGMENT_KEY,
    Segmentation,
    holds_foreign_intermediate,
    written_by_voxblock,
)
from voxblock.workers import Worker, check_output_layout, stable_hash

MERGES = ("any", "overlap", "iou")
STITCHES = ("auto", "context", "faces")
# A segmentation of at most this many blocks, and voxels in their write ROIs, fits in one worker
# (`fits_in_driver`): at 256^3 in 64^3 blocks the driver does it in less time than a scheduler and
# worker processes per pass, and the labels it keeps between passes take 64 MiB (uint32)
IN_DRIVER_BLOCKS = 512
IN_DRIVER_VOXELS = 1 << 24


def segment_blockwise(
    segment_function: str | Path,
    context: Coordinate | tuple[int, ...],
    total_roi: Roi,
    read_roi: Roi,
    write_roi: Roi,
    *args: Any,
    input: str | None = None,
    output: str | None = None,
    parameters: dict[str, Any] | None = None,
    merge: str = "any",
    merge_threshold: float = 0.5,
    stitch: str = "auto",
    keep_fragments: bool = True,
    progress: bool = True,
    serial: bool = False,
    **kwargs: Any,
) -> bool:
    """Segment blockwise into one consistent labelling of `total_roi`.

    `context` (world units) is added around every block; the task runs over
    `total_roi` grown by it, so blocks at the border keep their full context
    (reads past the input are zeros). For a local function such as
    `threshold-label` the result equals the whole-volume labelling up to a
    permutation of IDs. Returns False, with a report, if any pass failed.
    `stitch` says how blocks are joined: "context" compares each block's
    labels with the fragments its neighbours stored in its context (any
    function; merge thresholds apply; fragments are kept); "faces" labels
    each block alone and joins labels that touch across block faces, then
    labels each block again to write it (connected components of a
    foreground only: threshold-label; exact, and nothing per voxel is
    stored); "auto" picks faces where it applies and merge is "any".
    `serial=True` runs every pass in this process (debugging, fast tests).

    After the ROIs come dacapo's `num_workers`, `max_retries`, `timeout` and
    `upstream_tasks`; the other keywords are task options
    (`voxblock.options.TaskOptions`), given to every pass where they apply:
    `compute` (e.g. `voxblock.Slurm(cpus=2)`) says where the workers of
    every pass run and `host` the scheduler address they connect to;
    `chunk_shape` / `shard_shape` (voxels) lay out the segmentation if it is
    created (see `BlockwiseTask`; the scratch arrays keep one chunk per
    block); `run_dir` holds a directory per pass; `fit` is `overhang` unless
    `shrink`; `init_callback_fn` is called when the first pass starts.
    `task_id`, `read_write_conflict` and `check_function` are set per pass.
    """
    from voxblock.run import run_tasks
    from voxblock.task import BlockwiseTask

    given, extra = split_positional(args, kwargs)
    if extra:
        raise VoxblockError(f"segment_blockwise takes no extra positional arguments; got {extra!r}")
    kwargs = dict(kwargs)
    upstream_tasks = given.pop("upstream_tasks", None) or kwargs.pop("upstream_tasks", None)
    own = sorted({"task_id", "read_write_conflict", "check_function"} & set(kwargs))
    if own:
        raise VoxblockError(f"segment_blockwise sets {', '.join(own)} itself, per pass; leave it out")
    options = TaskOptions.of({**given, **kwargs}, "segment_blockwise")
    if options.batch not in (1, None) and options.batch != (1,) * total_roi.dims:
        raise VoxblockError(
            f"segment_blockwise does not batch its passes (batch={options.batch!r} would be "
            "ignored); leave batch out, or make the blocks larger to hand out fewer"
        )
    fit = options.fit or "overhang"
    num_workers, max_retries, fresh, overwrite = (
        options.num_workers,
        options.max_retries,
        options.fresh,
        options.overwrite,
    )
    run_dir, compute, host = options.run_dir, options.compute, options.host
    chunk_shape, shard_shape = options.chunk_shape, options.shard_shape
    if input is None or output is None:
        raise VoxblockError("segment_blockwise needs input='C/D' and output='C/D'")
    if fit not in ("overhang", "shrink"):
        raise VoxblockError(
            f"segment_blockwise writes all of total_roi: fit must be overhang or shrink; got {fit!r}"
        )
    if merge not in MERGES:
        raise VoxblockError(f"merge must be one of {', '.join(MERGES)}; got {merge!r}")
    if not 0 <= merge_threshold <= 1:
        raise VoxblockError(f"merge_threshold must be in [0, 1]; got {merge_threshold}")
    if stitch not in STITCHES:
        raise VoxblockError(f"stitch must be one of {', '.join(STITCHES)}; got {stitch!r}")
    context = Coordinate(context)
    source = arrays.open_input(input)
    if len(context) != source.voxel_size.dims or any(c < v for c, v in zip(context, source.voxel_size)):
        raise VoxblockError(
            f"context {tuple(context)} must be at least one voxel {tuple(source.voxel_size)} on "
            "every axis: blocks are merged where their contexts overlap"
        )
    if any(c % v for c, v in zip(context, source.voxel_size)):
        raise VoxblockError(
            f"context {tuple(context)} must be a multiple of the voxel size {tuple(source.voxel_size)}"
        )
    # the ROI as given, not grown by the context: on the input's grid (from its offset)
    check_on_grid("total ROI", total_roi, source.voxel_size, source.offset)
    read_roi, write_roi = block_rois(read_roi, write_roi, context)
    if not source.roi.contains(total_roi):
        raise VoxblockError(
            f"the region to segment {total_roi} is not inside the input {source.roi}; "
            "choose a total ROI inside the input"
        )
    function = SegmentFunction(str(segment_function), dict(parameters or {})).load()
    function.check_input(source)
    rank = function.stitch_rank(source.voxel_size.dims)
    if stitch == "faces" and rank is None:
        raise VoxblockError(
            f"stitch='faces' needs labels that are connected components of a foreground "
            f"(threshold-label); {segment_function} may need context: use stitch='context'"
        )
    if stitch == "faces" and merge != "any":
        raise VoxblockError(
            f"stitch='faces' joins every touching pair; merge={merge!r} needs stitch='context'"
        )
    method = "faces" if stitch != "context" and rank is not None and merge == "any" else "context"
    output_name = arrays.ArrayName.parse(output)
    blocking = Blocking(total_roi.grow(context, context), read_roi, write_roi, fit)
    identity = {
        "function": str(segment_function),
        "parameters": function.parameters,
        "input": str(arrays.ArrayName.parse(input)),
        "output": str(output_name),
        "total_roi": [list(total_roi.offset), list(total_roi.shape)],
        # as voxblock's convention writes it: either convention names the same run (block_rois)
        "read_roi": [list(write_roi.offset), list(write_roi.shape)],
        "write_roi": [list(write_roi.offset), list(write_roi.shape)],
        "context": list(context),
        "merge": merge,
        "merge_threshold": merge_threshold,
        "fit": fit,
        "stitch": method,
        # how pass 1 stores its results: a run directory of another layout starts afresh
        "edge_files": "packs",  # per worker process (voxblock.packfile); was "npy": one per block
        # the solve level by level, a table per block (segment.hierarchy); was one whole table
        "solve": "hierarchical",
        "fragments": "smallest unsigned dtype",
        "outside the total ROI": "zeros",  # a crop is labelled as if it were the whole volume
    }
    key = stable_hash(identity)
    seg = Segmentation(
        output_name,
        Path(run_dir) if run_dir else default_run_dir([str(output_name)], "segment", key),
        key,
    )
    # the faces passes 1 and 2 declare no outputs, and the solve makes its tables' groups itself:
    # a container that is a file or a user's folder is refused here, before any pass, not after
    for name in (str(output_name), *seg.intermediates()):
        check_output_container(name)
    # refused now, not by the last pass: an output of another geometry or dtype (even with
    # overwrite), or one that holds data this segmentation did not write
    spec = arrays.OutputSpec.like(source, output_name, np.uint64, total_roi)
    arrays.check_output(spec, {}, overwrite, ours=seg.owns, holds=seg.holds)
    _check_layout(output_name, blocking, num_workers, source.voxel_size, chunk_shape, shard_shape)
    for name in seg.intermediates():
        arrays.check_output(
            arrays.ArrayName.parse(name),
            {},
            overwrite,
            ours=written_by_voxblock,
            holds=holds_foreign_intermediate,
        )
    if fresh or seg.recorded_key() != key:
        seg.clear()
    seg.record(identity)

    target = blocking.target_roi
    region = [list(total_roi.offset), list(total_roi.shape)]  # the function reads zeros outside it
    # a block can hold at most one label per voxel it labels
    labelled = blocking.write_roi if method == "faces" else blocking.read_roi
    grid = BlockGrid.of(blocking, int(np.prod(labelled.shape / source.voxel_size)))
    # every pass but the one-block solve runs with the user's workers, retries, timeout and halo
    common = {
        k: getattr(options, k)
        for k in ("num_workers", "max_retries", "timeout", "halo", "max_worker_restarts")
    }
    where = {"compute": compute, "host": host}
    if method == "faces":
        first_pass: Worker = StitchFaces(
            function=str(segment_function),
            parameters=function.parameters,
            input=str(arrays.ArrayName.parse(input)),
            face_dir=str(seg.face_dir),
            edge_dir=str(seg.edge_dir),
            grid=grid.to_dict(),
            region=region,
            rank=rank,
        )
    else:
        first_pass = SegmentBlocks(
            function=str(segment_function),
            parameters=function.parameters,
            input=str(arrays.ArrayName.parse(input)),
            fragments=seg.fragments,
            edge_dir=str(seg.edge_dir),
            grid=grid.to_dict(),
            region=region,
        )
    fragments = BlockwiseTask(
        first_pass,
        blocking.total_roi,
        blocking.read_roi,
        blocking.write_roi,
        upstream_tasks=upstream_tasks,
        task_id="fragments",
        overwrite=True,
        fit=fit,
        run_dir=seg.run_dir / "fragments",
        init_callback_fn=options.init_callback_fn,
        **common,
        **where,
    )
    # a job that fits in one worker runs every pass here (`fits_in_driver`): run_tasks retries and
    # reports its blocks as a worker process would; serial=True (debugging) raises their errors
    in_driver = not serial and fits_in_driver(function, options, upstream_tasks, blocking, source.voxel_size)
    serial_mode: bool | None = True if serial else (None if in_driver else False)
    driver = IN_DRIVER.set(in_driver)
    kept = OWN_LABELS.set({} if in_driver and method == "faces" else None)
    try:
        first = run_tasks([fragments], progress=progress, serial=serial_mode)
        if not first.succeeded:
            return False
        changed = first.tasks[-1].processed > 0
        solved = run_solve(
            seg,
            grid,
            merge,
            merge_threshold,
            fresh=changed,
            options={**common, "max_retries": max_retries},
            where=where,
            serial=serial,
        )
        if solved is None:
            return False
        changed = changed or solved
        last_pass: dict[str, Any] = dict(
            task_id="relabel",
            run_dir=seg.run_dir / "relabel",
            fresh=changed,
            overwrite=True,
            chunk_shape=chunk_shape,
            shard_shape=shard_shape,
            **common,
            **where,
        )
        if method == "faces":
            # the same blocks as pass 1, so that each is labelled exactly as it was there
            relabel = BlockwiseTask(
                LabelSegments(
                    function=str(segment_function),
                    parameters=function.parameters,
                    input=str(arrays.ArrayName.parse(input)),
                    output=str(output_name),
                    table_dir=str(seg.table_dir),
                    grid=grid.to_dict(),
                    region=region,
                ),
                blocking.total_roi,
                blocking.read_roi,
                blocking.write_roi,
                fit=fit,
                read_write_conflict=False,
                **last_pass,
            )
        else:
            relabel = BlockwiseTask(
                RelabelFragments(
                    input=seg.fragments,
                    output=str(output_name),
                    grid=grid.to_dict(),
                    table_dir=str(seg.table_dir),
                ),
                target,
                write_roi,
                write_roi,
                **last_pass,
            )
        third = run_tasks([relabel], progress=progress, serial=serial_mode)
        if not third.succeeded:
            return False
    finally:
        OWN_LABELS.reset(kept)
        IN_DRIVER.reset(driver)
    zarr.open(str(output_name.path), mode="r+").attrs[SEGMENT_KEY] = key
    if not keep_fragments:
        shutil.rmtree(arrays.ArrayName.parse(seg.fragments).path, ignore_errors=True)
        shutil.rmtree(seg.run_dir / "fragments", ignore_errors=True)
        shutil.rmtree(seg.edge_dir, ignore_errors=True)
        shutil.rmtree(seg.face_dir, ignore_errors=True)
    return True


def fits_in_driver(
    function: SegmentFunction,
    options: TaskOptions,
    upstream_tasks: Any,
    blocking: Blocking,
    voxel_size: Coordinate,
) -> bool:
    """Whether a segmentation runs every pass in the driver: a built-in segment function (voxblock's
    own numpy and cc3d: nothing that could take the process down, hang or change it), at most
    `IN_DRIVER_BLOCKS` blocks and `IN_DRIVER_VOXELS` voxels in their write ROIs, `Local` compute,
    no block timeout (nothing could end a block past it here), no init callback and no upstream
    tasks. Then its blocks take less than a scheduler and worker processes per pass would; a
    crash of the driver is resumed as a crash of a worker process is. VOXBLOCK_IN_PROCESS=0 turns
    it off."""
    if in_process_off() or upstream_tasks or function.kind != "built-in":
        return False
    if options.compute is not None and type(options.compute) is not Local:
        return False
    if options.timeout is not None or options.init_callback_fn is not None:
        return False
    blocks = blocking.num_blocks
    voxels = blocks * int(np.prod(blocking.write_roi.shape / voxel_size))
    return blocks <= IN_DRIVER_BLOCKS and voxels <= IN_DRIVER_VOXELS


FANOUT_VARIABLE = "VOXBLOCK_SOLVE_FANOUT"  # blocks per axis of a level-1 unit (tests: small grids)


def solve_fanout(ndim: int) -> int:
    value = os.environ.get(FANOUT_VARIABLE)
    if not value:
        return default_fanout(ndim)
    try:
        fanout = int(value)
    except ValueError:
        fanout = 0
    if fanout < 2:
        raise VoxblockError(f"{FANOUT_VARIABLE} must be an integer of at least 2; got {value!r}")
    return fanout


def run_solve(
    seg: Segmentation,
    grid: BlockGrid,
    merge: str,
    merge_threshold: float,
    fresh: bool,
    options: dict[str, Any],
    where: dict[str, Any],
    serial: bool,
    fanout: int | None = None,
    progress: bool = False,
) -> bool | None:
    """Pass 2, level by level (`segment.hierarchy`): up 1..H, down H..1, the counts (here: a
    few integers per block), every block's table, the whole table and edges. Each step is a
    blockwise task over the level's units (resumable; its own run directory under solve/).
    None: a step failed; else whether any step ran a block (the passes after it start afresh).
    """

    hierarchy = Hierarchy(grid, fanout or solve_fanout(len(grid.counts)))
    solve_dir = seg.run_dir / "solve"
    layout = {"fanout": hierarchy.fanout, "levels": hierarchy.levels, "grid": grid.to_dict()}
    recorded = solve_dir / "layout.json"
    try:
        same = json.loads(recorded.read_text()) == layout
    except (FileNotFoundError, json.JSONDecodeError):
        same = False
    if fresh or not same:  # every record is a function of pass 1's and of the layout
        shutil.rmtree(solve_dir, ignore_errors=True)
        fresh = True
    seg.table_dir.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(layout))
    # one unit is today's whole-graph solve: in this process, unless workers run elsewhere; in a
    # segmentation run in the driver (IN_DRIVER) it fails, is retried and reported as its passes
    local = where.get("compute") is None or isinstance(where.get("compute"), Local)
    in_process = serial or (local and hierarchy.num_units(1) == 1)
    mode: bool | None = None if in_process and not serial and IN_DRIVER.get() else in_process
    common = {"num_workers": 1, "max_retries": options["max_retries"]} if in_process else options
    worker = {
        "grid": grid.to_dict(),
        "fanout": hierarchy.fanout,
        "edge_dir": str(seg.edge_dir),
        "table_dir": str(seg.table_dir),
        "merge": merge,
        "merge_threshold": merge_threshold,
    }
    top = hierarchy.levels
    started = time.perf_counter()
    if hierarchy.num_units(1) == 1:  # one unit: every step as one block (today's one-block solve)
        whole = SolveStep(step="all", lut=seg.lut, edges=seg.edges, **worker)
        processed = _run_units(whole, 1, "all", seg, fresh, common, where, mode)
        if processed is None:
            return None
        _report(hierarchy, np.load(seg.table_dir / "offsets.npy", mmap_mode="r"), started)
        return processed > 0
    steps: list[tuple[str, int, int]] = [
        ("up", level, hierarchy.num_units(level)) for level in range(1, top + 1)
    ]
    steps += [("down", level, hierarchy.num_units(level)) for level in range(top, 0, -1)]
    steps.append(("labels", 1, hierarchy.num_units(1)))
    ran = False
    for step, level, units in steps:
        if step == "labels" and not (seg.table_dir / "offsets.npy").exists():
            prefix = hierarchy_offsets(hierarchy, seg)
            save_array(seg.table_dir / "offsets.npy", prefix)
        name = step if step == "labels" else f"{step}-{level}"
        processed = _run_units(
            SolveStep(step=step, level=level, **worker), units, name, seg, fresh, common, where, mode
        )
        if processed is None:
            return None
        ran = ran or processed > 0
        fresh = fresh or processed > 0
    prefix = np.load(seg.table_dir / "offsets.npy", mmap_mode="r")
    chunk = 1 << 20
    if fresh or not _exported(seg, prefix):
        create_tables(seg.lut, seg.edges, prefix, chunk)
    chunks = max(1, -(-int(max(prefix[0, -1], prefix[1, -1])) // chunk))
    export = SolveStep(step="export", lut=seg.lut, edges=seg.edges, chunk=chunk, **worker)
    processed = _run_units(export, chunks, "export", seg, fresh, common, where, mode)
    if processed is None:
        return None
    _report(hierarchy, prefix, started)
    return ran or processed > 0


def _report(hierarchy: Hierarchy, prefix: np.ndarray, started: float) -> None:
    top, units = hierarchy.levels, hierarchy.num_units(1)
    print(
        f"solve: done - {top} level{'s' if top > 1 else ''} of {hierarchy.fanout}^"
        f"{len(hierarchy.grid.counts)} blocks per unit, {units} unit{'s' if units > 1 else ''} at "
        f"level 1, {int(prefix[2, -1])} segments ({time.perf_counter() - started:.1f} s)",
        flush=True,
    )


def hierarchy_offsets(hierarchy: Hierarchy, seg: Segmentation) -> np.ndarray:
    from voxblock.segment.hierarchy import PackStore, offsets

    return offsets(hierarchy, PackStore(str(seg.table_dir)))


def _exported(seg: Segmentation, prefix: np.ndarray) -> bool:
    try:
        lut = zarr.open_array(str(arrays.ArrayName.parse(seg.lut).path), mode="r")
        edges = zarr.open_array(str(arrays.ArrayName.parse(seg.edges).path), mode="r")
    except Exception:
        return False
    return lut.shape == (2, int(prefix[0, -1])) and edges.shape == (int(prefix[1, -1]), 5)


def _run_units(
    worker: Worker,
    units: int,
    name: str,
    seg: Segmentation,
    fresh: bool,
    common: dict[str, Any],
    where: dict[str, Any],
    serial: bool | None,
) -> int | None:
    """Run one solve step over `units` blocks (a 1-D task: block k is unit k); the blocks it
    processed, or None if it failed. `serial` is run_tasks'."""
    from voxblock.run import run_tasks
    from voxblock.task import BlockwiseTask

    total, one = Roi((0,), (units,)), Roi((0,), (1,))
    task = BlockwiseTask(
        worker,
        total,
        one,
        one,
        task_id=f"solve-{name}",
        run_dir=seg.run_dir / "solve" / name,
        fresh=fresh,
        **common,
        **where,
    )
    summary = io.StringIO()  # one line for the whole solve (run_solve), the steps' only if one failed
    report = run_tasks([task], progress=False, serial=serial, out=summary)
    if not report.succeeded:
        sys.stdout.write(summary.getvalue())
        return None
    return report.tasks[-1].processed


def block_rois(read_roi: Roi, write_roi: Roi, context: Coordinate) -> tuple[Roi, Roi]:
    """A block's read ROI (its write ROI grown by the context) and write ROI, from either convention.

    voxblock passes read ROI = write ROI and names the context; dacapo passes a read ROI that
    already holds it (write ROI grown by the context). Growing dacapo's read ROI again read twice
    the context and wrote the total ROI shrunk by it, so anything else is refused, not guessed.
    Blocks start at the total ROI and depend on these two only by their shapes and relative
    offset: the pair comes back with the write ROI at the origin, the same for both conventions
    (so that either resumes a run started with the other).
    """
    if read_roi.dims != len(context) or write_roi.dims != len(context):
        raise VoxblockError(
            f"the read ROI {read_roi} and write ROI {write_roi} must have {len(context)} axes, as the data"
        )
    grown = write_roi.grow(context, context)
    if read_roi in (write_roi, grown):
        write = Roi((0,) * write_roi.dims, write_roi.shape)
        return write.grow(context, context), write
    raise VoxblockError(
        f"the read ROI {read_roi} fits neither convention for the write ROI {write_roi} and context "
        f"{tuple(context)}: pass read ROI = write ROI (voxblock adds the context: read {grown}) or "
        f"read ROI = write ROI grown by the context ({grown}, as dacapo does)"
    )


def _check_layout(
    output: arrays.ArrayName,
    blocking: Blocking,
    num_workers: int,
    voxel_size: Coordinate,
    chunk_shape: tuple[int, ...] | None,
    shard_shape: tuple[int, ...] | None,
) -> None:
    """The last pass's output layout checked now, before pass 1 (its write grid is pass 1's)."""
    check_output_layout(
        output,
        blocking,
        num_workers,
        voxel_size,
        Coordinate(chunk_shape) if chunk_shape is not None else None,
        Coordinate(shard_shape) if shard_shape is not None else None,
        blocking.target_roi,
    )
