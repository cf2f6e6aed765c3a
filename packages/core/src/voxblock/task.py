"""BlockwiseTask: validate everything, then compose a daisy task.

daisy 2's Task is a compiled class, so a BlockwiseTask holds one rather
than being one. Validation happens in two steps: the constructor checks
what needs no data (worker, options, ROIs, numbers); `prepare()` checks the
arrays and creates outputs, right before the run, after upstream tasks
have prepared theirs.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from funlib.geometry import Coordinate, Roi

from voxblock import arrays
from voxblock.compat import AfterInit, make_worker, split_check
from voxblock.compute import Compute, Job, Local, ServeInProcess, run_name
from voxblock.errors import VoxblockError
from voxblock.geometry import Blocking, check_fit
from voxblock.halo import Halo, plan_thickness
from voxblock.nodes import check_output_container
from voxblock.rundir import RunDirectory, default_run_dir
from voxblock.workers import Preparation, Worker, stable_hash

DEFAULT_MAX_WORKER_RESTARTS = 10


class BlockwiseTask:
    """A worker run over `total_roi` in blocks of `read_roi` / `write_roi`.

    `worker` is a registered worker name (`"threshold"`), a path to a
    dacapo-style worker file, or a `Worker` instance. `total_roi` is the
    total *read* ROI, as in daisy: blocks read inside it (or past it with
    `fit="overhang"`) and write the part of it less the context.

    Keyword-only task options (`fit`, `read_write_conflict`,
    `check_function`, `init_callback_fn`) default to what the worker
    defines. `run_dir`, `fresh`, `overwrite`, `compute`, `host`, `task_id`
    and `max_worker_restarts` control the run; every other argument goes to
    the worker. `host` is the scheduler address workers connect to (see
    `run_tasks`). `halo` (default: where it pays) reads the context of
    blocks from thin copies of chunk faces (`voxblock.halo`).
    `chunk_shape` and `shard_shape` (voxels) lay out outputs this task
    creates (`voxblock.layout`): by default one chunk per write block;
    with `shard_shape`, sharded, each block owning whole shards.
    """

    def __init__(
        self,
        worker: str | Path | Worker,
        total_roi: Roi,
        read_roi: Roi,
        write_roi: Roi,
        num_workers: int = 16,
        max_retries: int = 2,
        timeout: float | None = None,
        upstream_tasks: Sequence[BlockwiseTask] | None = None,
        *args: Any,
        fit: str | None = None,
        read_write_conflict: bool | None = None,
        check_function: Callable[[Any], bool]
        | tuple[Callable[[Any], bool] | None, Callable[[Any], bool] | None]
        | None = None,
        init_callback_fn: Callable[[Any], None] | None = None,
        task_id: str | None = None,
        run_dir: str | Path | None = None,
        fresh: bool = False,
        overwrite: bool = False,
        compute: Compute | None = None,
        host: str | None = None,
        max_worker_restarts: int | None = None,
        halo: bool | None = None,
        chunk_shape: Sequence[int] | None = None,
        shard_shape: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        for name, roi in (
            ("total_roi", total_roi),
            ("read_roi", read_roi),
            ("write_roi", write_roi),
        ):
            if not isinstance(roi, Roi):
                raise VoxblockError(f"{name} must be a funlib.geometry.Roi; got {type(roi).__name__}")
        if not isinstance(num_workers, int) or num_workers < 1:
            raise VoxblockError(f"num_workers must be an integer >= 1; got {num_workers!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise VoxblockError(f"max_retries must be an integer >= 0; got {max_retries!r}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise VoxblockError(f"timeout must be a number of seconds > 0, or None; got {timeout!r}")
        if max_worker_restarts is not None and max_worker_restarts < 0:
            raise VoxblockError(f"max_worker_restarts must be >= 0; got {max_worker_restarts!r}")
        upstream = list(upstream_tasks or [])
        for up in upstream:
            if not isinstance(up, BlockwiseTask):
                raise VoxblockError(f"upstream_tasks must be BlockwiseTasks; got {type(up).__name__}")

        self.worker = make_worker(worker, *args, **kwargs)
        self.blocking = Blocking(total_roi, read_roi, write_roi, check_fit(fit or self.worker.default_fit()))
        _check_valid_coverage(self.blocking, self.worker.worker_name, explicit=fit is not None)
        self.read_write_conflict = (
            self.worker.default_read_write_conflict()
            if read_write_conflict is None
            else bool(read_write_conflict)
        )
        self.pre_check, self.post_check = split_check(
            check_function if check_function is not None else self.worker.check_function()
        )
        self.init_callback_fn = init_callback_fn or self.worker.init_callback_fn()
        self.num_workers = num_workers
        self.max_retries = max_retries
        self.timeout = timeout
        self.upstream_tasks = upstream
        self.max_worker_restarts = (
            max_worker_restarts
            if max_worker_restarts is not None
            else max(DEFAULT_MAX_WORKER_RESTARTS, 2 * num_workers * (max_retries + 1))
        )
        self.fresh = fresh
        self.overwrite = overwrite
        if compute is not None and not isinstance(compute, Compute):
            raise VoxblockError(
                f"compute must be a voxblock Compute (Local(), Slurm(...), ...); got {compute!r}"
            )
        self.compute = compute or Local()
        self.host = host
        if halo not in (None, True, False):
            raise VoxblockError(f"halo must be True, False or None (decide per array); got {halo!r}")
        self.halo = halo
        self.chunk_shape = _voxels("chunk_shape", chunk_shape, self.blocking.write_roi.dims)
        self.shard_shape = _voxels("shard_shape", shard_shape, self.blocking.write_roi.dims)
        self.job: Job | None = None
        self.task_key = stable_hash(self.identity())
        self.task_id = task_id or self.worker.worker_name or "task"
        self.run_dir = RunDirectory(
            Path(run_dir)
            if run_dir is not None
            else default_run_dir(self.worker.outputs(), self.task_id, self.task_key)
        )
        self._prepared = False

    def identity(self) -> dict[str, Any]:
        """What defines this task's result: a rerun with the same identity resumes."""
        return {
            "worker": self.worker.worker_name,
            "options": self.worker.options(),
            "total_roi": _roi(self.blocking.total_roi),
            "read_roi": _roi(self.blocking.read_roi),
            "write_roi": _roi(self.blocking.write_roi),
            "fit": self.blocking.fit,
        }

    @property
    def num_blocks(self) -> int:
        return self.blocking.num_blocks

    def prepare(self) -> None:
        """Check the arrays, create outputs, take the lock, decide resume or fresh.

        Raises VoxblockError before anything is written if the input is bad.
        """
        if self._prepared:
            return
        for name in self.worker.outputs():
            check_output_container(name)
        description = ", ".join(self.worker.outputs()) or str(self.run_dir.path)
        existed = self.run_dir.path.exists()
        self.run_dir.acquire_lock(description)
        try:
            self.worker.prepare(
                Preparation(
                    blocking=self.blocking,
                    task_key=self.task_key,
                    num_workers=self.num_workers,
                    overwrite=self.overwrite,
                    chunk_shape=self.chunk_shape,
                    shard_shape=self.shard_shape,
                    provenance={
                        "task": self.task_key,
                        "worker": self.worker.worker_name,
                        "run_dir": str(self.run_dir.path.resolve()),
                    },
                )
            )
        except BaseException:
            self.run_dir.release_lock()
            if not existed:
                _remove_empty_tree(self.run_dir.path)
            raise
        recorded = self.run_dir.read_task()
        if (
            self.fresh
            or recorded is None
            or recorded.get("key") != self.task_key
            or not self.run_dir.tracking_readable()
        ):
            # a run killed while daisy wrote its tracking store leaves it unreadable:
            # forgetting done markers only redoes blocks, it never skips one
            self.run_dir.reset()
        self.run_dir.write_task(
            {
                "key": self.task_key,
                "task_id": self.task_id,
                "identity": self.identity(),
                "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
        )
        self._prepared = True

    def _halo_thickness(self, array: Any) -> Coordinate | None:
        return plan_thickness(
            self.blocking.read_roi,
            self.blocking.write_roi,
            array.voxel_size,
            arrays.spatial_chunk_shape(array),
            array.roi.begin,
            force=bool(self.halo),
        )

    def halos(self) -> dict[str, Halo]:
        """Halos for the arrays this task's blocks read with context, where they pay (after prepare).

        An input gets one only if no upstream task writes it: its chunks must
        not change while slabs are taken from them.
        """
        kept: dict[str, Halo] = {}
        if self.halo is False:
            return kept
        upstream_outputs = {
            arrays.ArrayName.parse(name) for up in all_upstream(self) for name in up.worker.outputs()
        }
        wanted = [(name, True) for name in self.worker.context_inputs()]
        wanted += [(name, False) for name in self.worker.context_outputs()]
        for name, is_input in wanted:
            parsed = arrays.ArrayName.parse(name)
            if is_input and parsed in upstream_outputs:
                continue
            array = arrays.open_input(name) if is_input else arrays.open_output(name)
            thickness = self._halo_thickness(array)
            if thickness is not None:
                slug = f"{parsed.dataset.replace('/', '_')}-{stable_hash(str(parsed))[:8]}"
                kept[str(name)] = Halo(
                    str(self.run_dir.halo_dir / slug), tuple(thickness), from_reads=is_input
                )
        return kept

    def already_done(self) -> bool:
        """Every block has its done marker (and no pre-check wants a say): nothing to run."""
        return self.pre_check is None and self.run_dir.done_blocks() == self.num_blocks

    def release(self) -> None:
        self.run_dir.release_lock()
        self._prepared = False

    def cleanup(self) -> None:
        """After a run: let the compute end what is left of this run's workers (cluster jobs)."""
        if self.job is not None:
            self.compute.cleanup(self.job)

    def daisy_task(self, task_id: str, serial: bool = False) -> Any:
        """The daisy task that runs this one. Call after `prepare()`."""
        import daisy.v2 as daisy

        job = Job(
            worker=self.worker,
            run_dir=self.run_dir.path,
            post_check=self.post_check,
            name=run_name(task_id),
            halos=self.halos(),
        )
        self.job = job
        if serial:
            function: Any = ServeInProcess(job)
        else:
            function = self.worker.spawn_function(self.compute.process_function(job))
        if self.init_callback_fn is not None and not serial:
            function = AfterInit(function, self.run_dir.path)
        with warnings.catch_warnings():
            # daisy warns that a check_function costs a call per block; here it is
            # the user's explicit choice, and done markers are on regardless.
            warnings.filterwarnings("ignore", message=r"Task\(check_function", category=UserWarning)
            return daisy.Task(
                task_id,
                self.blocking.total_roi,
                self.blocking.read_roi,
                self.blocking.write_roi,
                process_function=function,
                check_function=self.pre_check,
                read_write_conflict=self.read_write_conflict,
                fit=self.blocking.fit,
                max_workers=self.num_workers,
                max_retries=self.max_retries,
                timeout=self.timeout,
                tracking_path=str(self.run_dir.tracking),
                max_worker_restarts=self.max_worker_restarts,
            )

    def __repr__(self) -> str:
        return (
            f"BlockwiseTask({self.task_id!r}, total_roi={self.blocking.total_roi}, "
            f"write_roi={self.blocking.write_roi}, fit={self.blocking.fit!r}, "
            f"num_workers={self.num_workers})"
        )


def all_upstream(task: BlockwiseTask) -> list[BlockwiseTask]:
    """Every task `task` depends on, directly or not."""
    found: list[BlockwiseTask] = []
    stack = list(task.upstream_tasks)
    while stack:
        up = stack.pop()
        if not any(up is t for t in found):
            found.append(up)
            stack.extend(up.upstream_tasks)
    return found


def _roi(roi: Roi) -> list[list[int]]:
    return [list(roi.offset), list(roi.shape)]


def _remove_empty_tree(path: Path) -> None:
    """Remove directories left empty by a refused run (never files)."""
    for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        # up to the CONTAINER.voxblock folder (an output DATASET may be nested: mask/s0)
        root = next((p for p in path.parents if p.name.endswith(".voxblock")), None)
        parent = path.parent
        while root is not None and parent.is_relative_to(root) and not any(parent.iterdir()):
            parent.rmdir()
            if parent == root:
                break
            parent = parent.parent


def _voxels(what: str, shape: Sequence[int] | None, dims: int) -> Coordinate | None:
    if shape is None:
        return None
    values = tuple(shape)
    if len(values) != dims or not all(isinstance(v, int) and v > 0 for v in values):
        raise VoxblockError(f"{what} must be {dims} positive integers (voxels); got {shape!r}")
    return Coordinate(values)


def _check_valid_coverage(blocking: Blocking, worker: str, explicit: bool) -> None:
    """fit='valid' writes only whole blocks: say so where that leaves part of the region unwritten.

    Refused where the fit is the worker's default (dacapo's worker files say 'valid'), since a
    run would end "done" with part of the volume never written; a warning where it was asked for.
    """
    if blocking.fit != "valid":
        return
    target, written = blocking.target_roi, blocking.written_roi
    if written == target or target.empty:
        return
    missing = target.size - (written.size if not written.empty else 0)
    message = (
        f"with fit='valid', blocks of {blocking.write_roi.shape} write only {written} of the region "
        f"{target} (world units): {missing / target.size:.0%} of it would not be written"
    )
    if explicit:
        warnings.warn(message, stacklevel=3)
        return
    raise VoxblockError(
        f"{message}. fit='valid' is the default of worker {worker!r}; pass fit='shrink' or "
        "fit='overhang' to write all of it, or fit='valid' to write only whole blocks"
    )
