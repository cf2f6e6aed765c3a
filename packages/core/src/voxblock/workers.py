"""The worker protocol, and finding workers by name or by file.

A worker is a dataclass whose fields are its options. The driver calls
`prepare()` once, before any block runs (validate, create outputs); every
worker process calls `setup()` once (open arrays, load a model) and then
`process(block)` for each block it is given. Workers are picklable: the
driver ships the configured instance to each worker process.

Workers are registered in the `voxblock.workers` entry-point group, so a
third-party package adds one with a line in its pyproject.toml. A path to
a Python file in the style of dacapo's worker files (`spawn_worker`,
`start_worker`, module-level `fit`, `read_write_conflict`) also works:
that convention is `voxblock.compat` (`WorkerFile`, and `make_worker`,
which takes a name, a file or an instance).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from funlib.geometry import Coordinate, Roi

from voxblock.errors import VoxblockError
from voxblock.geometry import Blocking, Fit, check_blocking_on_grid, roi_slices
from voxblock.layout import Layout, plan_layout

if TYPE_CHECKING:
    import numpy as np

    from voxblock import arrays
    from voxblock.arrays import Array

ENTRY_POINT_GROUP = "voxblock.workers"


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A worker option: a dataclass field with a one-line help text for `--help`."""
    metadata = {"help": help}
    if default is dataclasses.MISSING and "default_factory" not in kwargs:
        return field(metadata=metadata, **kwargs)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass(frozen=True)
class Preparation:
    """What the driver knows when it prepares a worker: geometry and intent."""

    blocking: Blocking
    task_key: str
    num_workers: int
    overwrite: bool = False
    provenance: Mapping[str, Any] = field(default_factory=dict)
    # how new outputs lie on disk (voxels); None: one chunk per write block, unsharded
    chunk_shape: Coordinate | None = None
    shard_shape: Coordinate | None = None

    @property
    def concurrent(self) -> bool:
        return self.num_workers > 1


@dataclass
class Worker:
    """Base class of every worker. Subclasses are dataclasses of options."""

    name: ClassVar[str] = ""
    fit: ClassVar[Fit] = "valid"
    read_write_conflict: ClassVar[bool] = False
    # modules a worker process will import (beyond voxblock's own worker module): a fork
    # server imports them once, and its workers start with them loaded
    preload: ClassVar[tuple[str, ...]] = ()

    def prepare(self, preparation: Preparation) -> None:
        """Driver side, before any block: validate inputs, create outputs."""

    def setup(self) -> None:
        """Once per worker process: open arrays, load models."""

    def process(self, block: Any) -> None:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The options that define this worker's result (part of the task key)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def outputs(self) -> list[str]:
        """Names of the arrays this worker writes (for provenance and locking)."""
        return []

    def context_inputs(self) -> list[str]:
        """Arrays read over each block's read ROI, made before this task (may get a halo pre-pass)."""
        return []

    def context_outputs(self) -> list[str]:
        """Arrays this task writes and its blocks read back over their read ROI (halo kept on write)."""
        return []

    def spawn_function(self, serve: Callable[[], None]) -> Callable[[], None]:
        """The daisy process function of one worker process: voxblock's block loop by default."""
        return serve

    def check_function(self) -> Any:
        return None

    def init_callback_fn(self) -> Callable[[Any], None] | None:
        return None

    @property
    def worker_name(self) -> str:
        return self.name

    def default_fit(self) -> Fit:
        return self.fit

    def default_read_write_conflict(self) -> bool:
        return self.read_write_conflict


@dataclass
class ArrayWorker(Worker):
    """One input array in, one output array out: most workers are this.

    A subclass sets `output_dtype` (and `output_channels` if it writes
    channels) and implements `compute(data, block)`, which gets the input
    over the block's read ROI (zero outside the input) and returns the
    output over the write ROI or the read ROI.

    `prepare()` (driver, once) opens the input, checks the blocks are on its
    voxel grid, calls the hooks `check_input(source)`, `check_blocking(blocking,
    source)`, `output_dtype(source)` and `output_channels(source)` in that order
    (a hook may keep what it found for a later one), records the preparation
    (`self.preparation`) and, for `block_ids = True`, the block grid
    (`global_ids`), then creates or checks the output. Subclasses implement the
    hooks rather than override `prepare`. `setup()` (each worker process, once)
    opens `self.source` and `self.target`; a subclass that loads a model extends
    it (`super().setup()` first).

    Its default fit is `overhang`: border blocks keep their full size, read
    zeros past the input and have their writes clipped to the output, so the
    whole requested region is written.
    """

    fit: ClassVar[Fit] = "overhang"
    preload: ClassVar[tuple[str, ...]] = ("numpy", "zarr", "voxblock.arrays", "voxblock.chunks")

    input: str = option("", help="input array, CONTAINER/DATASET (e.g. volume.zarr/raw)")
    output: str = option("", help="output array, CONTAINER/DATASET; created if missing")

    fill_value: ClassVar[float] = 0
    # True for a worker that writes labels (fragments): prepare() records the task's block grid
    # and `global_ids(labels, block)` gives a block's labels IDs unique across the volume
    block_ids: ClassVar[bool] = False
    # what the driver knew (blocking, num_workers, ...): set by prepare(), shipped to every process
    preparation: ClassVar[Preparation | None] = None
    # True for a worker whose output is a new level of its input's OME-NGFF image (downsample): the
    # output may be named as a level beside the input, which is otherwise refused
    new_level: ClassVar[bool] = False

    def check_input(self, source: Array) -> None:
        """Raise VoxblockError if this worker cannot use `source` (dtype, channels, options)."""

    def check_blocking(self, blocking: Blocking, source: Array) -> None:
        """Raise VoxblockError if this worker cannot run on these blocks (their fit, shape or
        context, e.g. a model's input and output shapes); after `check_input`, in the driver."""

    def output_dtype(self, source: Array) -> np.dtype:
        import numpy as np

        return np.dtype(source.dtype)

    def output_channels(self, source: Array) -> tuple[int, ...]:
        return ()

    def output_voxel_size(self, source: Array) -> Coordinate:
        """The output's voxel size: the input's, or a multiple of it (a coarser level from the same
        origin, whose blocks must then write whole output voxels; `compute` returns them)."""
        return source.voxel_size

    def compute(self, data: np.ndarray, block: Any) -> np.ndarray:
        raise NotImplementedError

    def outputs(self) -> list[str]:
        return [self.output]

    def context_inputs(self) -> list[str]:
        return [self.input]

    def prepare(self, preparation: Preparation) -> None:
        from voxblock import arrays

        if not self.input:
            raise VoxblockError(f"worker {self.name!r} needs an input array (input=...)")
        if not self.output:
            raise VoxblockError(f"worker {self.name!r} needs an output array (output=...)")
        if arrays.ArrayName.parse(self.input) == arrays.ArrayName.parse(self.output):
            raise VoxblockError(f"input and output are the same array ({self.input})")
        source = arrays.open_input(self.input)
        check_blocking_on_grid(preparation.blocking, source.voxel_size, source.offset)
        self.check_input(source)
        self.check_blocking(preparation.blocking, source)
        voxel_size = Coordinate(self.output_voxel_size(source))
        if voxel_size != source.voxel_size:
            if any(o % i for o, i in zip(voxel_size, source.voxel_size)):
                raise VoxblockError(
                    f"worker {self.name!r}: output voxel size {tuple(voxel_size)} is not a multiple of "
                    f"the input's {tuple(source.voxel_size)}"
                )
            check_blocking_on_grid(preparation.blocking, voxel_size, source.offset)
        self.preparation = preparation
        if self.block_ids:
            from voxblock.segment.ids import BlockGrid

            # a block keeps at most one label per voxel of its write ROI
            voxels = 1
            for size in preparation.blocking.write_roi.shape / voxel_size:
                voxels *= int(size)
            self._block_grid = BlockGrid.of(preparation.blocking, voxels)
        prepare_output(
            preparation,
            source,
            arrays.OutputSpec.like(
                source,
                self.output,
                self.output_dtype(source),
                preparation.blocking.written_roi,
                tuple(self.output_channels(source)),
                voxel_size,
                new_level=self.new_level,
            ),
        )

    def setup(self) -> None:
        from voxblock import arrays

        if self.block_ids and getattr(self, "_block_grid", None) is None:
            raise RuntimeError(f"{self.name}: the worker was not prepared (no block grid)")
        self._source = arrays.open_input(self.input)
        self._target = arrays.open_output(self.output)

    @property
    def source(self) -> Array:
        """The input array, opened by `setup()` in each worker process."""
        return self._source

    @property
    def target(self) -> Array:
        """The output array, opened by `setup()` in each worker process."""
        return self._target

    def global_ids(self, labels: np.ndarray, block: Any) -> np.ndarray:
        """A block's local labels (over its write ROI, 1..n with n at most the voxels of a write
        block, 0 background) as uint64 IDs unique across the volume (needs `block_ids = True`).

        Block k of the task's grid owns IDs k * V + 1 .. (k + 1) * V (V: voxels of a write
        block): IDs depend only on where a block lies, not on the order blocks run in, and a
        block that is redone writes the same IDs.
        """
        grid = getattr(self, "_block_grid", None)
        if grid is None:
            raise RuntimeError(f"{self.name}: global_ids needs block_ids = True and a prepared worker")
        return grid.to_global(labels, block.write_roi)

    def process(self, block: Any) -> None:
        import numpy as np

        from voxblock import arrays

        data = arrays.read(self._source, block.read_roi, fill_value=self.fill_value)
        result = np.asarray(self.compute(data, block))
        spatial = tuple(result.shape[result.ndim - block.write_roi.dims :])
        write_shape = tuple(block.write_roi.shape / self._target.voxel_size)
        if spatial != write_shape:
            read_shape = tuple(block.read_roi.shape / self._target.voxel_size)
            if spatial != read_shape:
                raise ValueError(
                    f"worker {self.name!r} returned spatial shape {spatial} for a block whose "
                    f"write ROI is {write_shape} and read ROI is {read_shape} voxels"
                )
            result = crop_to(result, block.read_roi, block.write_roi, self._target.voxel_size)
        arrays.write(self._target, block.write_roi, result.astype(self._target.dtype, copy=False))


def crop_to(data: np.ndarray, data_roi: Roi, roi: Roi, voxel_size: Coordinate) -> np.ndarray:
    """The part of `data` (covering `data_roi`, channels first) that covers `roi`: e.g. a result
    computed over a block's read ROI cropped to its write ROI. A view, no copy."""
    return data[(slice(None),) * (data.ndim - roi.dims) + roi_slices(roi, data_roi.begin, voxel_size)]


def prepare_output(preparation: Preparation, source: Array, spec: arrays.OutputSpec) -> None:
    """Check an output against what the task will write; create it if missing."""
    from voxblock import arrays

    blocking = preparation.blocking
    if spec.roi.empty:
        raise VoxblockError(
            f"no block fits in the total ROI {blocking.total_roi} with read ROI "
            f"{blocking.read_roi} and fit={blocking.fit!r}: nothing would be written"
        )
    if not source.roi.contains(blocking.target_roi.intersect(spec.roi)):
        raise VoxblockError(
            f"the region to write {blocking.target_roi} is not inside the input "
            f"{source.roi} (the total ROI may extend past the input only by the context)"
        )
    action = arrays.check_output(spec, preparation.provenance, preparation.overwrite)
    layout = check_output_layout(
        spec.name,
        blocking,
        preparation.num_workers,
        spec.voxel_size,
        spec.chunk_shape or preparation.chunk_shape,
        preparation.shard_shape,
        spec.roi,
    )
    if action == "create":
        assert layout is not None  # the output does not exist yet
        arrays.create_output(spec, preparation.provenance, layout)
    elif action == "overwrite":
        arrays.record_provenance(spec.name, preparation.provenance)


def check_output_layout(
    name: str | arrays.ArrayName,
    blocking: Blocking,
    num_workers: int,
    voxel_size: Coordinate,
    chunk_shape: Coordinate | None = None,
    shard_shape: Coordinate | None = None,
    roi: Roi | None = None,
) -> Layout | None:
    """Refuse, before anything is created, an output its blocks could not write safely.

    Blocks that run at once must each own whole write units (shards, else
    chunks): zarr rewrites a whole unit on every write, so two writers of
    one lose voxels without an error. An existing output is checked as it
    is (None is returned); a new one gets its layout (chunks, shards), with
    its ROI `roi` (default: what the blocks write).
    """
    from voxblock import arrays

    name = arrays.ArrayName.parse(name)
    if name.path.exists():
        check_existing_output(name, blocking, num_workers)
        return None
    layout = plan_layout(blocking.write_roi.shape / voxel_size, chunk_shape, shard_shape)
    if layout.shard is not None and arrays.container_format(name) == 2:
        raise VoxblockError(
            f"output {name}: {name.container} is a zarr v2 container, and zarr v2 has no shards; "
            "write the output to a new (zarr v3) container, or leave out the shard size"
        )
    if num_workers > 1:
        unit = layout.write_unit * voxel_size
        _check_write_unit(name, blocking, roi or blocking.written_roi, unit, layout.shard is not None)
    return layout


def check_existing_output(name: str | arrays.ArrayName, blocking: Blocking, num_workers: int) -> None:
    """Refuse blocks that would share a write unit (shard, else chunk) of an existing output."""
    from voxblock import arrays

    if num_workers < 2:
        return
    existing = arrays.open_input(name, role="output")
    unit = arrays.spatial_write_unit(existing) * existing.voxel_size
    _check_write_unit(name, blocking, existing.roi, unit, arrays.is_sharded(existing))


def _check_write_unit(
    name: Any, blocking: Blocking, array_roi: Roi, unit_world: Coordinate, sharded: bool
) -> None:
    problem = blocking.chunk_misalignment(array_roi, unit_world)
    if problem is None:
        return
    what = "shards" if sharded else "chunks"
    raise VoxblockError(
        f"output {name} is written in {what} of {tuple(unit_world)} world units and {problem}: "
        f"with more than one worker, two blocks would rewrite the same {what[:-1]} and one would "
        f"lose its voxels. Use a block size that is a multiple of the {what[:-1]} on the same grid, "
        "or one worker (num_workers=1, --workers 1)"
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, Coordinate)):
        return [_jsonable(v) for v in value]
    numpy = sys.modules.get("numpy")  # a numpy scalar means numpy is imported already
    if numpy is not None and isinstance(value, numpy.generic):
        return value.item()
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"
    return repr(value)


def stable_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(_jsonable(data), sort_keys=True).encode()).hexdigest()


# -- finding workers (a worker file, dacapo's convention: voxblock.compat) ---------


def registered_workers() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


# classes already found by name: the CLI, the task and make_worker each look one up, and every
# look-up of the entry points reads every installed distribution's metadata (10-20 ms)
_LOADED: dict[str, type[Worker]] = {}


def worker_class(name: str) -> type[Worker]:
    if name in _LOADED:
        return _LOADED[name]
    found = registered_workers()
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise VoxblockError(
            f"unknown worker {name!r}; registered workers: {known} "
            "(install voxblock-workers for the standard ones, or pass a path to a worker file)"
        )
    cls = found[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Worker)):
        raise VoxblockError(f"entry point {name!r} does not name a voxblock Worker class")
    _LOADED[name] = cls
    return cls
