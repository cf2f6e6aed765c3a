"""segment_blockwise: per-block segmentation, a global solve, a relabel.

Two ways to stitch blocks. With context (any segment function): pass 1
(fragments) labels every block over its read ROI, stores the write
ROI part with block-position IDs, and records edges where its labels meet
fragments that neighbouring blocks wrote into its context. The task runs
with `read_write_conflict`, so of two neighbours one always runs after the
other and sees its fragments: every pair of touching blocks is compared
once. Pass 2 (solve) turns all edges into a lookup table; pass 3 (relabel)
applies it with the relabel worker. At faces (connected components of a
per-voxel foreground, such as threshold-label; see `segment.faces`): pass 1
labels each block alone and keeps only its outermost layers, pass 3 labels
each block again and writes its segments, so no fragments are stored. Each
pass is a resumable task with its own run directory; edges and the table
are kept in the output container.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from funlib.geometry import Coordinate, Roi

from voxblock import arrays
from voxblock.compute import Local
from voxblock.errors import VoxblockError
from voxblock.files import replace_atomically
from voxblock.geometry import Blocking, check_blocking_on_grid, check_on_grid, context_shell
from voxblock.nodes import check_output_container
from voxblock.options import TaskOptions, split_positional
from voxblock.rundir import default_run_dir
from voxblock.segment import faces as face_stitching
from voxblock.segment.edges import EDGE_FIELDS, block_edges, contact_edges, select_edges
from voxblock.segment.functions import SegmentFunction
from voxblock.segment.ids import BlockGrid, to_global
from voxblock.segment.solve import load_lut, segment_lut
from voxblock.workers import (
    Preparation,
    Worker,
    check_output_layout,
    crop_to,
    option,
    prepare_output,
    stable_hash,
    worker_class,
)

MERGES = ("any", "overlap", "iou")
STITCHES = ("auto", "context", "faces")
SEGMENT_KEY = "voxblock_segment"


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
        save_block_edges(Path(self.edge_dir) / f"{index}.npy", edges, ids)


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


def save_block_edges(path: Path, edges: np.ndarray, fragments: np.ndarray) -> None:
    """One block's edges (E x 5) and fragment IDs in one flat uint64 .npy: [E, N, edges, ids].

    A plain .npy, not an .npz: a zip archive per block cost more than the edges did.
    """
    flat = np.concatenate(
        [np.array([len(edges), len(fragments)], np.uint64), edges.astype(np.uint64).ravel(), fragments]
    ).astype(np.uint64, copy=False)
    replace_atomically(path, lambda file: np.save(file, flat))


def load_block_edges(path: Path) -> tuple[np.ndarray, np.ndarray]:
    flat = np.load(path)
    num_edges, num_fragments = (int(n) for n in flat[:2])
    edges = flat[2 : 2 + 5 * num_edges].reshape(num_edges, 5)
    fragments = flat[2 + 5 * num_edges : 2 + 5 * num_edges + num_fragments]
    if len(fragments) != num_fragments:
        raise VoxblockError(f"{path} is truncated: rerun segment_blockwise with fresh=True")
    return edges, fragments


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

    def process(self, block: Any) -> None:
        grid, dtype, write_roi = self._grid, self._dtype, block.write_roi
        labels, largest = own_labels(self._function, self._source, block, grid)
        index = grid.index(write_roi)
        # faces are kept with the block's own labels: a reader adds the block's ID offset
        own_faces = face_stitching.faces(labels)
        face_dir = Path(self.face_dir)
        face_stitching.save_faces(face_dir / f"{index}.bin", own_faces, labels.shape, dtype)
        neighbours = {}
        for direction in self._directions:
            other = grid.neighbour(write_roi, direction)
            their_faces = (
                None if other is None else face_stitching.load_faces(face_dir / f"{other}.bin", dtype)
            )
            if their_faces is not None:
                layer = face_stitching.facing_layer(their_faces, direction)
                neighbours[direction] = to_global(layer, other, grid.id_range, dtype)
        padded = face_stitching.padded_boundary(labels.shape, own_faces, neighbours, dtype)
        own, theirs = face_stitching.touching_pairs(padded, self.rank)
        edges = contact_edges(to_global(own, index, grid.id_range, dtype), theirs)
        # labels are consecutive from 1 (threshold-label): the block's fragments are 1..largest
        ids = to_global(np.arange(1, largest + 1, dtype=dtype), index, grid.id_range, dtype)
        save_block_edges(Path(self.edge_dir) / f"{index}.npy", edges, ids)


@dataclass
class LabelSegments(Labelling):
    """Pass 3 at faces: label each block again, as in pass 1, and write its segment IDs."""

    name = "segment-labels"

    output: str = option("")
    lut: str = option("")

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
        self._fragments, self._segments = load_lut(self.lut, "segment")

    def process(self, block: Any) -> None:
        labels, largest = own_labels(self._function, self._source, block, self._grid)
        first = self._grid.index(block.write_roi) * self._grid.id_range + 1
        try:
            table = block_segments(self._fragments, self._segments, first, largest, self._grid.id_range)
        except VoxblockError as error:
            raise VoxblockError(f"block {block.write_roi}: {error}") from None
        segments = table[labels]
        roi = block.write_roi.intersect(self._output.roi)
        arrays.write(self._output, roi, crop_to(segments, block.write_roi, roi, self._output.voxel_size))


@dataclass
class SolveLut(Worker):
    """Pass 2: every block's edges -> one fragment -> segment table (a single block)."""

    name = "segment-solve"
    fit = "valid"

    edge_dir: str = option("")
    num_blocks: int = option(0)
    lut: str = option("")
    edges: str = option("")
    merge: str = option("any")
    merge_threshold: float = option(0.5)

    def prepare(self, preparation: Preparation) -> None:
        found = len(list(Path(self.edge_dir).glob("*.npy")))
        if found != self.num_blocks:
            raise VoxblockError(
                f"{found} of {self.num_blocks} blocks have edges in {self.edge_dir}; "
                "the fragments pass is not complete"
            )

    def process(self, block: Any) -> None:
        all_edges, all_fragments = [], []
        for path in sorted(Path(self.edge_dir).glob("*.npy")):
            edges, fragments = load_block_edges(path)
            all_edges.append(edges)
            all_fragments.append(fragments)
        edges = np.concatenate(all_edges) if all_edges else np.zeros((0, 5), np.uint64)
        fragments = np.concatenate(all_fragments) if all_fragments else np.zeros(0, np.uint64)
        lut = segment_lut(fragments, select_edges(edges, self.merge, self.merge_threshold))
        _write_table(self.edges, edges, {"columns": list(EDGE_FIELDS)})
        _write_table(self.lut, lut, {"rows": ["fragment", "segment"]})


def _write_table(name: str, data: np.ndarray, attrs: dict[str, Any]) -> None:
    array_name = arrays.ArrayName.parse(name)
    chunks = tuple(
        max(1, min(s, 1 << 20)) if i == data.ndim - 1 else max(1, s) for i, s in enumerate(data.shape)
    )
    zarr_format = arrays.container_format(array_name)  # a table in a zarr v2 container is v2 too
    arrays.make_groups(array_name, zarr_format)
    table = zarr.create_array(
        store=str(array_name.path),
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        overwrite=True,
        zarr_format=zarr_format,  # type: ignore[arg-type]
    )
    if data.size:
        table[...] = data
    table.attrs.update(attrs)


@dataclass
class Segmentation:
    """Names and places of one segment_blockwise run, derived from its output.

    The intermediate arrays sit next to the output, named after it: OUTPUT_fragments,
    OUTPUT_lut, OUTPUT_edges (`image.zarr/labels/cells/0_lut` for `image.zarr/labels/cells/0`).
    Inside a label's multiscale group they are not levels: OME-NGFF readers (ome-zarr-py,
    napari) list only the multiscale's datasets, and ome-zarr-models validates the group.
    """

    output: arrays.ArrayName
    run_dir: Path
    key: str
    fragments: str = field(init=False)
    lut: str = field(init=False)
    edges: str = field(init=False)

    def __post_init__(self) -> None:
        base = f"{self.output.container}/{self.output.dataset}"
        self.fragments = f"{base}_fragments"
        self.lut = f"{base}_lut"
        self.edges = f"{base}_edges"

    @property
    def edge_dir(self) -> Path:
        return self.run_dir / "edges"

    @property
    def face_dir(self) -> Path:
        return self.run_dir / "faces"

    def recorded_key(self) -> str | None:
        try:
            return json.loads((self.run_dir / "segment.json").read_text()).get("key")
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def record(self, identity: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "segment.json").write_text(
            json.dumps({"key": self.key, "identity": identity}, indent=2)
        )

    def intermediates(self) -> list[str]:
        return [self.fragments, self.lut, self.edges]

    def clear(self) -> None:
        """Forget every pass: intermediate arrays, edges and the passes' run directories."""
        for name in self.intermediates():
            shutil.rmtree(arrays.ArrayName.parse(name).path, ignore_errors=True)
        for sub in ("edges", "faces", "fragments", "solve", "relabel"):
            shutil.rmtree(self.run_dir / sub, ignore_errors=True)


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
    worker_class("relabel")  # the relabel pass needs voxblock-workers: say so now
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
        "edge_files": "npy",
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
    _check_segment_output(seg, overwrite, arrays.OutputSpec.like(source, output_name, np.uint64, total_roi))
    _check_layout(output_name, blocking, num_workers, source.voxel_size, chunk_shape, shard_shape)
    for name in seg.intermediates():
        _check_intermediate(name, overwrite)
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
    first = run_tasks([fragments], progress=progress, serial=serial)
    if not first.succeeded:
        return False
    changed = first.tasks[-1].processed > 0
    solve = BlockwiseTask(
        SolveLut(
            edge_dir=str(seg.edge_dir),
            num_blocks=fragments.num_blocks,
            lut=seg.lut,
            edges=seg.edges,
            merge=merge,
            merge_threshold=merge_threshold,
        ),
        target,
        target,
        target,
        1,
        max_retries,
        None,
        task_id="solve",
        run_dir=seg.run_dir / "solve",
        fresh=changed,
        **where,
    )
    # one block of pure bookkeeping: on this machine, in this process, unless workers run elsewhere
    local = compute is None or isinstance(compute, Local)
    second = run_tasks([solve], progress=False, serial=serial or local)
    if not second.succeeded:
        return False
    changed = changed or second.tasks[-1].processed > 0
    if method == "faces":
        # the same blocks as pass 1, so that each is labelled exactly as it was there
        relabel = BlockwiseTask(
            LabelSegments(
                function=str(segment_function),
                parameters=function.parameters,
                input=str(arrays.ArrayName.parse(input)),
                output=str(output_name),
                lut=seg.lut,
                grid=grid.to_dict(),
                region=region,
            ),
            blocking.total_roi,
            blocking.read_roi,
            blocking.write_roi,
            fit=fit,
            read_write_conflict=False,
            task_id="relabel",
            run_dir=seg.run_dir / "relabel",
            fresh=changed,
            overwrite=True,
            chunk_shape=chunk_shape,
            shard_shape=shard_shape,
            **common,
            **where,
        )
    else:
        relabel = BlockwiseTask(
            "relabel",
            target,
            write_roi,
            write_roi,
            task_id="relabel",
            run_dir=seg.run_dir / "relabel",
            fresh=changed,
            overwrite=True,
            input=seg.fragments,
            output=str(output_name),
            lut=seg.lut,
            dtype="uint64",  # fragments may be uint32; segment IDs are uint64 whatever the volume's size
            chunk_shape=chunk_shape,
            shard_shape=shard_shape,
            **common,
            **where,
        )
    third = run_tasks([relabel], progress=progress, serial=serial)
    if not third.succeeded:
        return False
    zarr.open(str(output_name.path), mode="r+").attrs[SEGMENT_KEY] = key
    if not keep_fragments:
        shutil.rmtree(arrays.ArrayName.parse(seg.fragments).path, ignore_errors=True)
        shutil.rmtree(seg.run_dir / "fragments", ignore_errors=True)
        shutil.rmtree(seg.edge_dir, ignore_errors=True)
        shutil.rmtree(seg.face_dir, ignore_errors=True)
    return True


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


def _check_segment_output(seg: Segmentation, overwrite: bool, spec: arrays.OutputSpec) -> None:
    """Refuse, before any pass runs, an output the last pass would refuse or must not overwrite.

    As `arrays.check_output` for run_blockwise: an existing array of another geometry or dtype is
    refused even with overwrite; one with no provenance and no chunk written holds nothing to lose.
    """
    path = seg.output.path
    if not path.exists():
        return
    arrays.check_output(spec, {}, overwrite=True)  # geometry and dtype only: raises on a mismatch
    if overwrite:
        return
    try:
        existing = arrays.open_array(path, mode="r")
        attrs = dict(existing.attrs)
    except Exception as error:
        raise VoxblockError(f"output {seg.output} exists but cannot be read: {error}") from error
    recorded = attrs.get(SEGMENT_KEY)
    if recorded == seg.key:
        return
    if recorded is None and attrs.get(arrays.PROVENANCE_KEY, {}).get("run_dir", "").startswith(
        str(seg.run_dir.resolve())
    ):
        return  # an earlier, unfinished run of a segmentation into this output
    if recorded is None and arrays.PROVENANCE_KEY not in attrs and _no_chunk_written(existing):
        return  # an empty array made for this output (e.g. prepare_ds): no data to lose
    raise VoxblockError(
        f"output {seg.output} already holds "
        + ("a different segmentation" if recorded else "data this segmentation did not write")
        + "; refusing to overwrite it (pass overwrite=True / --overwrite to replace it)"
    )


def _no_chunk_written(array: Any) -> bool:
    """No chunk written: True only where that is known (zarr, a dropped time axis); N5: data may exist."""
    return arrays.no_chunk_written(array)


def _check_intermediate(name: str, overwrite: bool) -> None:
    path = arrays.ArrayName.parse(name).path
    if not path.exists() or overwrite:
        return
    try:
        attrs = dict(zarr.open(str(path), mode="r").attrs)
    except Exception:
        attrs = {}
    if arrays.PROVENANCE_KEY not in attrs and "rows" not in attrs and "columns" not in attrs:
        raise VoxblockError(
            f"{name} exists and was not written by voxblock; segment_blockwise keeps its "
            "fragments, edges and table there. Move it, or pass overwrite=True"
        )
