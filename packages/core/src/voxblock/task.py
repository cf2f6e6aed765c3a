"""BlockwiseTask: validate everything, then compose a daisy task.

daisy 2's Task is a compiled class, so a BlockwiseTask holds one rather
than being one. Validation happens in two steps: the constructor checks
what needs no data (worker, options, ROIs, numbers); `prepare()` checks the
arrays and creates outputs, right before the run, after upstream tasks
have prepared theirs.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from funlib.geometry import Coordinate, Roi

from voxblock import arrays
from voxblock.compat import AfterInit, WorkerFile, make_worker
from voxblock.compute import Job, Local, ServeInProcess, run_name
from voxblock.errors import VoxblockError
from voxblock.geometry import Batching, Blocking, check_batch, check_fit, daisy_links_unread_blocks
from voxblock.halo import Halo, plan_thickness
from voxblock.job import BatchCheck, ShrunkCheck
from voxblock.nodes import check_output_container
from voxblock.options import split_check, split_keywords, split_positional
from voxblock.rundir import RunDirectory, default_run_dir
from voxblock.workers import Preparation, Worker, stable_hash, worker_class


class BlockwiseTask:
    """A worker run over `total_roi` in blocks of `read_roi` / `write_roi`.

    `worker` is a registered worker name (`"threshold"`), a path to a
    dacapo-style worker file, or a `Worker` instance. `total_roi` is the
    total *read* ROI, as in daisy: blocks read inside it (or past it with
    `fit="overhang"`) and write the part of it less the context.

    The arguments after the ROIs are dacapo's: `num_workers`,
    `max_retries`, `timeout`, `upstream_tasks`, then any positional
    arguments of a worker file's spawn_worker. Keyword arguments named like
    a field of `voxblock.options.TaskOptions` (`fit`, `run_dir`, `compute`,
    `halo`, `chunk_shape`, ...: see there and the README) are task options;
    every other one is the worker's, as is all of `worker_options`. A
    keyword that the worker takes too (an option `timeout` of the worker) is
    refused unless `worker_options={"timeout": ...}` gives the worker's; or
    pass a configured worker instance. Task options left out default to
    what the worker defines (`fit`, `read_write_conflict`,
    `check_function`, `init_callback_fn`) or to TaskOptions' defaults.
    """

    def __init__(
        self,
        worker: str | Path | Worker,
        total_roi: Roi,
        read_roi: Roi,
        write_roi: Roi,
        *args: Any,
        worker_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        for name, roi in (
            ("total_roi", total_roi),
            ("read_roi", read_roi),
            ("write_roi", write_roi),
        ):
            if not isinstance(roi, Roi):
                raise VoxblockError(f"{name} must be a funlib.geometry.Roi; got {type(roi).__name__}")
        given, worker_args = split_positional(args, kwargs)
        kwargs = dict(kwargs)
        upstream = list(given.pop("upstream_tasks", None) or kwargs.pop("upstream_tasks", None) or [])
        for up in upstream:
            if not isinstance(up, BlockwiseTask):
                raise VoxblockError(f"upstream_tasks must be BlockwiseTasks; got {type(up).__name__}")
        if worker_options is not None and isinstance(worker, Worker):
            raise VoxblockError("worker_options cannot be added to a worker instance; set them on it")
        options, worker_kwargs = split_keywords(
            kwargs, worker_options, lambda: worker_option_names(worker), f"worker {str(worker)!r}", given
        )
        self.options = options
        self.worker = make_worker(worker, *worker_args, **worker_kwargs)
        fit = options.fit
        self.blocking = Blocking(total_roi, read_roi, write_roi, check_fit(fit or self.worker.default_fit()))
        _check_valid_coverage(self.blocking, self.worker.worker_name, explicit=fit is not None)
        self.read_write_conflict = (
            self.worker.default_read_write_conflict()
            if options.read_write_conflict is None
            else bool(options.read_write_conflict)
        )
        self.pre_check, self.post_check = split_check(
            options.check_function if options.check_function is not None else self.worker.check_function()
        )
        self.init_callback_fn = options.init_callback_fn or self.worker.init_callback_fn()
        self.num_workers = options.num_workers
        self.max_retries = options.max_retries
        self.timeout = options.timeout
        self.upstream_tasks = upstream
        self.batching = self._batching(options.batch)
        self.daisy_fit = self._daisy_fit()
        self.max_worker_restarts = options.worker_restarts()
        self.fresh = options.fresh
        self.overwrite = options.overwrite
        self.compute = options.compute or Local()
        self.host = options.host
        self.halo = options.halo
        self.chunk_shape = options.voxels("chunk_shape", self.blocking.write_roi.dims)
        self.shard_shape = options.voxels("shard_shape", self.blocking.write_roi.dims)
        self.job: Job | None = None
        # the pre-check of a batched task's last daisy task: it counts the blocks it calls done
        self.batch_check: BatchCheck | None = None
        identity = self.identity()
        self.task_key = stable_hash(identity)
        # what the outputs hold: the same whatever the batch (a rerun with another batch may write them)
        self.output_key = (
            stable_hash({k: v for k, v in identity.items() if k != "batch"})
            if self.batching is not None
            else self.task_key
        )
        self.task_id = options.task_id or self.worker.worker_name or "task"
        self.run_dir = RunDirectory(
            Path(options.run_dir)
            if options.run_dir is not None
            else default_run_dir(self.worker.outputs(), self.task_id, self.output_key)
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
            # a shrink task daisy runs as overhang keeps a tracking store of another layout
            **({"daisy_fit": self.daisy_fit} if self.daisy_fit != self.blocking.fit else {}),
            # so does a batched one: a daisy block (a done marker) per batch
            **({"batch": list(self.batching.batch)} if self.batching is not None else {}),
        }

    def _batching(self, batch: int | tuple[int, ...]) -> Batching | None:
        """How daisy hands out this task's blocks `batch` per side at a time (None: one by one).

        Refused for a worker file, which serves daisy's blocks itself (voxblock cannot split
        them), and where blocks wait for neighbours that write what they read
        (read_write_conflict): a batch runs its blocks in grid order, which could read a
        neighbour's output before or after the unbatched run would have, and differ from it."""
        shape = check_batch(batch, self.blocking.total_roi.dims)
        if all(k == 1 for k in shape):
            return None
        name = self.worker.worker_name
        if type(self.worker).spawn_function is not Worker.spawn_function:
            raise VoxblockError(
                f"worker {name!r} serves daisy's blocks itself (a worker file's spawn_function), so "
                f"voxblock cannot split a batch of {tuple(shape)} blocks into its blocks: leave "
                "batch out (batch=1), or run a voxblock worker"
            )
        if self.read_write_conflict:
            raise VoxblockError(
                f"worker {name!r} has read_write_conflict: its blocks wait for neighbours that write "
                "what they read, and a batch would run them in another order than one by one, "
                "which could change the output: leave batch out (batch=1)"
            )
        return Batching(self.blocking, shape)

    @property
    def scheduled(self) -> Blocking:
        """The blocks daisy hands out: one per batch, else this task's own (as daisy_fit tiles)."""
        return self.batching.scheduled if self.batching is not None else self.blocking

    @property
    def num_batches(self) -> int:
        """Blocks daisy hands out (done markers): batches, or else `num_blocks`."""
        return self.batching.num_batches if self.batching is not None else self.num_blocks

    def done_blocks(self) -> int:
        """This task's blocks that have a done marker (those in batches marked done, if batched)."""
        if self.batching is None:
            return self.run_dir.done_blocks()
        tracking = self.run_dir.tracking_arrays()
        return 0 if tracking is None else self.batching.done_blocks(tracking[0])

    def _daisy_fit(self) -> str:
        """The fit daisy schedules this task with: its own, except "overhang" for a shrink task
        with upstream tasks that daisy 2 would mis-schedule (`daisy_links_unread_blocks`: some
        border blocks handed out twice, as many never, the run "done" with holes). Its blocks are
        then clipped to what shrink hands out before the worker sees them (`Job.shrink`); a
        worker file, which serves daisy's blocks itself, is refused."""
        fit = self.blocking.fit
        if self.batching is not None:
            return "overhang"  # daisy hands out batches: Batching.scheduled
        if fit != "shrink" or not any(
            daisy_links_unread_blocks(self.blocking, up.scheduled) for up in self.upstream_tasks
        ):
            return fit
        if type(self.worker).spawn_function is not Worker.spawn_function:
            raise VoxblockError(
                f"worker {self.worker.worker_name!r} with fit='shrink' and these upstream_tasks: "
                f"daisy 2 would hand some border blocks of the region {self.blocking.target_roi} out "
                "twice and never run others (upstream blocks past its end are linked to shrunk "
                "blocks that do not read them), and the run would end 'done' with holes; this "
                "worker serves daisy's blocks itself, so voxblock cannot clip them. Use "
                "fit='overhang', or a total ROI whose region is a whole number of write blocks"
            )
        return "overhang"

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
            self.worker.prepare(self.preparation())
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
            _warn_other_batch(recorded, self.identity(), self.fresh)
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

    def preparation(self) -> Preparation:
        """What the worker's `prepare` is told (also by `voxblock.plan`, which checks without creating)."""
        return Preparation(
            blocking=self.blocking,
            task_key=self.task_key,
            num_workers=self.num_workers,
            overwrite=self.overwrite,
            chunk_shape=self.chunk_shape,
            shard_shape=self.shard_shape,
            provenance={
                "task": self.output_key,
                "worker": self.worker.worker_name,
                "run_dir": str(self.run_dir.path.resolve()),
            },
        )

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
        return self.pre_check is None and self.run_dir.done_blocks() == self.num_batches

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
            shrink=self.blocking if self.daisy_fit != self.blocking.fit and self.batching is None else None,
            batch=self.batching,
        )
        self.job = job
        if serial:
            function: Any = ServeInProcess(job)
        else:
            function = self.worker.spawn_function(self.compute.process_function(job))
        if self.init_callback_fn is not None and not serial:
            function = AfterInit(function, self.run_dir.path)
        check = self.pre_check
        if check is not None and job.shrink is not None:
            check = ShrunkCheck(check, job.shrink)
        if check is not None and self.batching is not None:
            check = self.batch_check = BatchCheck(check, self.batching)
        scheduled, timeout = self.scheduled, self.timeout
        if timeout is not None and self.batching is not None:
            timeout *= self.batching.max_blocks  # the timeout is per block, daisy's per batch
        with warnings.catch_warnings():
            # daisy warns that a check_function costs a call per block; here it is
            # the user's explicit choice, and done markers are on regardless.
            warnings.filterwarnings("ignore", message=r"Task\(check_function", category=UserWarning)
            return daisy.Task(
                task_id,
                scheduled.total_roi,
                scheduled.read_roi,
                scheduled.write_roi,
                process_function=function,
                check_function=check,
                read_write_conflict=self.read_write_conflict,
                fit=self.daisy_fit,
                max_workers=self.num_workers,
                max_retries=self.max_retries,
                timeout=timeout,
                tracking_path=str(self.run_dir.tracking),
                max_worker_restarts=self.max_worker_restarts,
            )

    def __repr__(self) -> str:
        return (
            f"BlockwiseTask({self.task_id!r}, total_roi={self.blocking.total_roi}, "
            f"write_roi={self.blocking.write_roi}, fit={self.blocking.fit!r}, "
            f"num_workers={self.num_workers})"
        )


def worker_option_names(worker: str | Path | Worker) -> Collection[str]:
    """The keywords a worker takes: its dataclass fields, or the named parameters of a worker
    file's spawn_worker (none for an instance: it is configured)."""
    if isinstance(worker, Worker):
        return ()
    text = str(worker)
    if text.endswith(".py") or Path(text).is_file():
        return WorkerFile.parameters(Path(text)).names
    return [f.name for f in dataclasses.fields(worker_class(text))]


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


def _warn_other_batch(recorded: dict[str, Any] | None, identity: dict[str, Any], fresh: bool) -> None:
    """A rerun with another batch than the run it resumes redoes every block: say so."""
    before = dict((recorded or {}).get("identity") or {})
    identity = json.loads(json.dumps(identity, default=str))  # as recorded
    if fresh or not before or before == identity:
        return
    was, now = before.pop("batch", 1), identity.get("batch", 1)
    if was != now and before == {k: v for k, v in identity.items() if k != "batch"}:
        warnings.warn(
            f"the run directory's done markers are of batch={was}, this run's batch={now}: they "
            "start afresh and every block runs again (the output is the same). Rerun with "
            f"batch={was} to resume where the run stopped",
            stacklevel=4,
        )


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
