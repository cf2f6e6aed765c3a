"""run_blockwise: prepare tasks, run them on a daisy server, report every failed block."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from funlib.geometry import Roi

from voxblock.compat import InitCallbacks
from voxblock.errors import VoxblockError
from voxblock.rundir import roi_record
from voxblock.task import BlockwiseTask


@dataclass
class FailedBlock:
    block_id: int
    read_roi: dict[str, list[int]]
    write_roi: dict[str, list[int]]
    attempts: int
    error: str


@dataclass
class TaskReport:
    task_id: str
    run_dir: str
    total_blocks: int
    processed: int
    skipped: int
    failed_blocks: list[FailedBlock] = field(default_factory=list)
    orphaned: int = 0
    worker_restarts: int = 0
    timeouts: int = 0
    retried_blocks: int = 0
    abandoned: str | None = None
    # run in the driver, one block at a time: no scheduler, no worker processes (a small job:
    # `compute.runs_in_process`, or `serial=True`)
    in_process: bool = False
    # blocks with no done marker that neither failed nor were orphaned: daisy ended the task
    # without handing them out (voxblock's check after the run, against daisy faults)
    never_run: int = 0
    last_worker_error: str | None = None
    seconds: float = 0.0
    # from the worker processes that ended normally: the longest set-up (imports, model
    # load), and blocks per second while serving (after set-up), all workers together
    worker_setup_seconds: float = 0.0
    serving_blocks_per_second: float = 0.0
    # a batched task (`batch`): blocks per side of a batch, and the batches daisy handed out
    # (total_blocks, processed, skipped and failed_blocks count blocks; orphaned, never_run,
    # retried_blocks, timeouts and the serving rate count batches, daisy's blocks)
    batch: list[int] | None = None
    batches: int = 0

    @property
    def succeeded(self) -> bool:
        return (
            self.processed + self.skipped == self.total_blocks
            and not self.failed_blocks
            and self.abandoned is None
            and self.never_run == 0
        )


@dataclass
class RunReport:
    tasks: list[TaskReport]

    @property
    def succeeded(self) -> bool:
        return all(t.succeeded for t in self.tasks)

    def summary(self) -> str:
        lines = []
        for t in self.tasks:
            status = "done" if t.succeeded else "FAILED"
            where = " in this process, no worker processes" if t.in_process else ""
            unit = "batches" if t.batch else "blocks"
            batched = f" in {t.batches} batches of {'x'.join(map(str, t.batch))}" if t.batch else ""
            lines.append(
                f"{t.task_id}: {status} - {t.processed} blocks processed, {t.skipped} already "
                f"done, {len(t.failed_blocks)} failed, {t.orphaned} {unit} not run, of "
                f"{t.total_blocks}{batched} ({t.seconds:.1f} s{where}; {t.retried_blocks} {unit} "
                f"retried, {t.worker_restarts} worker restarts, {t.timeouts} timeouts)"
            )
            if t.serving_blocks_per_second:
                lines.append(
                    f"  workers: set-up {t.worker_setup_seconds:.1f} s, then "
                    f"{t.serving_blocks_per_second:.1f} {unit}/s"
                )
            for failed in t.failed_blocks[:20]:
                roi = failed.write_roi
                lines.append(
                    f"  block {failed.block_id} write ROI offset={tuple(roi['offset'])} "
                    f"shape={tuple(roi['shape'])}: {failed.attempts} attempt(s), "
                    f"last error: {failed.error}"
                )
            if len(t.failed_blocks) > 20:
                lines.append(f"  ... and {len(t.failed_blocks) - 20} more in {t.run_dir}/report.json")
            if t.abandoned:
                lines.append(f"  task abandoned: {t.abandoned}")
            if t.never_run:
                lines.append(
                    f"  {t.never_run} {unit} have no done marker though daisy ended the task "
                    "(never run, or cut off): their output may be missing; run again to do them"
                )
            if not t.succeeded and t.in_process:
                lines.append(f"  run in this process: each attempt's error in {t.run_dir}/failures")
            elif not t.succeeded:
                lines.append(f"  worker logs: {t.run_dir}/logs")
        return "\n".join(lines)


def run_blockwise(
    worker: Any,
    total_roi: Roi,
    read_roi: Roi,
    write_roi: Roi,
    *args: Any,
    progress: bool = True,
    worker_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> bool:
    """Run `worker` blockwise; True only if every block succeeded or was already done.

    Failed blocks are printed (ROI, attempts, last error) and kept in the run
    directory's report.json. Arguments are those of `BlockwiseTask`, dacapo's
    order: `num_workers` (16), `max_retries` (2), `timeout`, `upstream_tasks`
    by position or keyword, then worker options and task options
    (`voxblock.options.TaskOptions`: `compute=voxblock.Slurm(...)` for
    cluster workers, `host=` for the address they connect to, ...) by
    keyword; `worker_options={...}` says which are the worker's.
    """
    task = BlockwiseTask(
        worker, total_roi, read_roi, write_roi, *args, worker_options=worker_options, **kwargs
    )
    return run_tasks([task], progress=progress).succeeded


def all_tasks(tasks: Sequence[BlockwiseTask]) -> list[BlockwiseTask]:
    """The tasks and their upstream tasks, upstream first."""
    ordered: list[BlockwiseTask] = []
    visiting: set[int] = set()

    def visit(task: BlockwiseTask) -> None:
        if any(task is t for t in ordered):
            return
        if id(task) in visiting:
            raise VoxblockError(f"upstream_tasks form a cycle through {task.task_id!r}")
        visiting.add(id(task))
        for up in task.upstream_tasks:
            visit(up)
        visiting.discard(id(task))
        ordered.append(task)

    for task in tasks:
        visit(task)
    return ordered


def run_tasks(
    tasks: Sequence[BlockwiseTask],
    progress: bool = True,
    host: str | None = None,
    out: TextIO | None = None,
    serial: bool | None = None,
) -> RunReport:
    """Prepare every task (upstream first), run them as one daisy pipeline, report.

    `serial=True` runs every block in this process, one at a time (no
    server, no worker processes): for debugging and fast tests. By default
    (`serial=None`) a job too small to pay for a server and worker
    processes runs so, the summary says so: a few blocks of a known pure
    worker on `Local` compute with no timeout (`compute.runs_in_process`);
    `serial=False` always starts worker processes. `host` is
    the address cluster workers connect to (default: a task's `host`, else
    `DAISY_HOST`, else the address daisy detects); when every worker is
    local the scheduler listens on loopback only (`scheduler_host`).
    Afterwards, however the run ended, each task's compute cleans up
    (cluster jobs of this run that are still listed are cancelled).
    """
    ordered = all_tasks(tasks)
    planner = PLANNER.get()
    if planner is not None:  # `--plan` (voxblock.plan): check and estimate these tasks, run nothing
        planner(ordered)
    host = scheduler_host(ordered, host)
    prepared: list[BlockwiseTask] = []
    errors: list[str] = []
    chosen = serial is None  # in this process, if at all, of voxblock's accord: blocks retried
    if serial is None:
        from voxblock.compute import runs_in_process

        serial = runs_in_process(ordered)
    if not serial:
        for task in ordered:  # e.g. the fork server imports while the tasks are prepared
            task.compute.warm(task.worker)
    try:
        for task in ordered:
            task.prepare()
            prepared.append(task)
        ids = _unique_ids(ordered)
        if all(t.already_done() for t in ordered):
            # nothing to do: no server, no worker processes (a resumed run that had finished)
            reports = [_done_report(t, ids[id(t)]) for t in ordered]
        else:
            reports, errors = _run_pipeline(ordered, ids, progress, host, serial, retry=chosen)
    finally:
        for task in prepared:
            task.release()
    report = RunReport(reports)
    for task, task_report in zip(ordered, reports):
        (task.run_dir.path / "report.json").write_text(json.dumps(asdict(task_report), indent=2))
    stream = out if out is not None else sys.stdout
    print(report.summary(), file=stream, flush=True)
    if errors:
        raise RuntimeError("; ".join(errors))
    return report


# set by voxblock.plan while it plans a command: run_tasks hands it the tasks instead of running them
PLANNER: ContextVar[Callable[[Sequence[BlockwiseTask]], None] | None] = ContextVar(
    "voxblock_planner", default=None
)

LOOPBACK = "127.0.0.1"


def scheduler_host(tasks: Sequence[BlockwiseTask], host: str | None = None) -> str | None:
    """The address daisy's scheduler gives its workers; None: the one daisy detects.

    daisy listens on every interface unless told loopback, and a scheduler
    reachable from the network hands out blocks (and done markers) to anyone
    who connects. When no task's workers can run elsewhere (`Local`), the
    scheduler listens on 127.0.0.1 whatever `host` or `DAISY_HOST` say: a
    process on this machine always reaches it there. Otherwise `host`, else
    a task's `host`.
    """
    if tasks and not any(t.compute.remote_workers for t in tasks):
        return LOOPBACK
    if host is not None:
        return host
    return next((t.host for t in tasks if t.host), None)


def _run_pipeline(
    ordered: Sequence[BlockwiseTask],
    ids: dict[int, str],
    progress: bool,
    host: str | None,
    serial: bool,
    retry: bool = False,
) -> tuple[list[TaskReport], list[str]]:
    """One daisy pipeline for all tasks; their reports and any init-callback errors. `retry`: a
    serial run fails and retries a block that raises, as a worker process would."""
    import daisy.logging as daisy_logging
    import daisy.v2 as daisy

    daisy_tasks = {id(t): t.daisy_task(ids[id(t)], serial=serial) for t in ordered}
    # blocks of batched tasks done before this run: what daisy skips of them (the report's)
    done_before = {id(t): t.done_blocks() for t in ordered if t.batching is not None}
    for task in ordered:
        task.run_dir.forget_workers()  # this run's timings only
    edges = [(daisy_tasks[id(up)], daisy_tasks[id(t)]) for t in ordered for up in t.upstream_tasks]
    pipeline = daisy.Pipeline(list(daisy_tasks.values()), edges)
    previous_log_dir = daisy_logging.get_log_basedir()
    daisy_logging.set_log_basedir(ordered[-1].run_dir.logs)
    callbacks = InitCallbacks([t for t in ordered if t.init_callback_fn is not None])
    started = time.monotonic()
    started_at = time.time()
    try:
        if serial:
            for task in ordered:
                if task.init_callback_fn is not None:
                    task.init_callback_fn(daisy.Context(task_id=ids[id(task)], worker_id=0))
            from voxblock.compute import RETRY_IN_PROCESS

            token = RETRY_IN_PROCESS.set(retry)
            try:
                states = daisy.run_blockwise(
                    pipeline, multiprocessing=False, progress=False, summary=False, return_states=True
                )
            finally:
                RETRY_IN_PROCESS.reset(token)
        else:
            callbacks.start()
            observer = _progress_recorder(ordered, ids, progress)
            states = daisy.Server().run_blockwise(pipeline, progress=observer, host=host, summary=False)
    finally:
        callbacks.stop()
        daisy_logging.set_log_basedir(previous_log_dir)
        _cleanup(ordered)
    seconds = time.monotonic() - started
    reports = [
        _task_report(t, ids[id(t)], daisy_tasks[id(t)], states.get(ids[id(t)]), seconds, started_at)
        for t in ordered
    ]
    for task, report in zip(ordered, reports):
        if task.batching is not None:
            _count_blocks(task, report, done_before[id(task)])
    for report in reports:
        report.in_process = serial
    return reports, callbacks.errors


def _progress_recorder(ordered: Sequence[BlockwiseTask], ids: dict[int, str], progress: bool) -> Any:
    """daisy's progress observer: each task's counts into its run directory for `voxblock status`
    (voxblock.status.ProgressRecorder), and daisy's progress bars when `progress`."""
    from voxblock.status import ProgressRecorder

    inner = None
    if progress:
        from daisy._progress import _TqdmObserver

        inner = _TqdmObserver(task_order=[ids[id(t)] for t in ordered])
    return ProgressRecorder({ids[id(t)]: (t.run_dir, t.max_retries) for t in ordered}, inner=inner)


def _done_report(task: BlockwiseTask, task_id: str) -> TaskReport:
    total = task.num_blocks
    report = TaskReport(
        task_id, str(task.run_dir.path), total, 0, total, retried_blocks=task.run_dir.retried_blocks()
    )
    if task.batching is not None:
        report.batch, report.batches = list(task.batching.batch), task.num_batches
    return report


def _count_blocks(task: BlockwiseTask, report: TaskReport, done_before: int) -> None:
    """A batched task's report in blocks, not daisy's batches: those done before the run (by
    their batch's done marker) or in a batch the pre-check called done were skipped, the
    others done now were processed."""
    assert task.batching is not None
    report.batch, report.batches = list(task.batching.batch), report.total_blocks
    report.total_blocks = task.num_blocks
    skipped = done_before + (sum(task.batch_check.skipped) if task.batch_check is not None else 0)
    report.skipped = min(skipped, task.num_blocks)
    report.processed = max(0, task.done_blocks() - report.skipped)


def _cleanup(tasks: Sequence[BlockwiseTask]) -> None:
    errors = []
    for task in tasks:
        try:
            task.cleanup()
        except Exception as error:  # one failed cleanup must not skip the others
            errors.append(f"{task.task_id}: {error!r}")
    if errors:
        print("voxblock: cleanup after the run failed: " + "; ".join(errors), file=sys.stderr)


def _unique_ids(tasks: Sequence[BlockwiseTask]) -> dict[int, str]:
    ids: dict[int, str] = {}
    used: set[str] = set()
    for task in tasks:
        candidate, n = task.task_id, 1
        while candidate in used:
            n += 1
            candidate = f"{task.task_id}-{n}"
        used.add(candidate)
        ids[id(task)] = candidate
    return ids


def _task_report(
    task: BlockwiseTask, task_id: str, daisy_task: Any, state: Any, seconds: float, started_at: float = 0.0
) -> TaskReport:
    failed = []
    for block, attempts in _failed_blocks(task, daisy_task, started_at):
        block_id = int(block.block_id[1])
        read_roi, write_roi = block.read_roi, block.write_roi
        if task.daisy_fit != task.blocking.fit and task.batching is None:  # as the worker saw it
            read_roi, write_roi = task.blocking.clip(read_roi, write_roi)
        error = (
            attempts[-1]["error"]
            if attempts
            else (
                (state.last_worker_error or "worker process died").strip().splitlines()[-1]
                if state is not None
                else "unknown"
            )
        )
        failed.append(
            FailedBlock(
                block_id=block_id,
                read_roi=roi_record(read_roi),
                write_roi=roi_record(write_roi),
                # daisy fails a block after max_retries + 1 failed attempts; attempts that
                # died with their worker (SIGKILL, timeout) leave no record
                # (a block of a batch: as often as it failed, the batch's other failures being
                # other blocks')
                attempts=len(attempts)
                if task.batching is not None and attempts
                else max(len(attempts), task.max_retries + 1),
                error=error,
            )
        )
    if state is None:
        return TaskReport(task_id, str(task.run_dir.path), task.num_blocks, 0, 0, failed)
    never_run = 0
    if not state.abandoned:
        # daisy's counts are not enough: a block it hands out twice counts twice (the second
        # time "already done"), and the task ends with as many blocks never handed out
        done = task.run_dir.done_blocks()
        failed_batches = len(daisy_task.failed_blocks()) if task.batching is not None else len(failed)
        never_run = max(0, task.num_batches - done - failed_batches - int(state.orphaned_count))
    return TaskReport(
        task_id=task_id,
        run_dir=str(task.run_dir.path),
        total_blocks=int(state.total_block_count),
        processed=int(state.completed_count) - int(state.skipped_count),
        skipped=int(state.skipped_count),
        failed_blocks=failed,
        orphaned=int(state.orphaned_count),
        worker_restarts=int(state.worker_restart_count),
        timeouts=int(state.timeout_reclaim_count),
        retried_blocks=task.run_dir.retried_blocks(),
        abandoned=state.abandon_reason if state.abandoned else None,
        never_run=never_run,
        last_worker_error=state.last_worker_error,
        seconds=seconds,
        **_worker_timings(task.run_dir.worker_records()),
    )


def _failed_blocks(task: BlockwiseTask, daisy_task: Any, since: float) -> list[tuple[Any, list[dict]]]:
    """The blocks daisy failed, each with its failed attempts since `since` (this run's: a
    resumed run keeps earlier runs' records). Of a batched task: the blocks of each failed batch
    that failed, by their own ROI, or the batch itself where none did (its worker died)."""

    def attempts(block: Any) -> list[dict]:
        return [a for a in task.run_dir.failures(int(block.block_id[1])) if a.get("time", 0.0) >= since]

    failed = daisy_task.failed_blocks()
    if task.batching is None:
        return [(block, attempts(block)) for block in failed]
    from voxblock.job import batch_blocks

    found: list[tuple[Any, list[dict]]] = []
    for batch in failed:
        inside = [(block, attempts(block)) for block in batch_blocks(batch, task.batching)]
        found += [(block, tried) for block, tried in inside if tried] or [(batch, [])]
    return found


def _worker_timings(records: list[dict[str, Any]]) -> dict[str, float]:
    """Set-up and serving rate over the worker processes of one run (see `compute.serve_blocks`)."""
    records = [r for r in records if "serving_seconds" in r]  # those that ended normally
    if not records:
        return {}
    serving = max(r.get("serving_seconds", 0.0) for r in records)
    blocks = sum(r.get("blocks", 0) for r in records)
    return {
        "worker_setup_seconds": max(r.get("setup_seconds", 0.0) for r in records),
        "serving_blocks_per_second": blocks / serving if serving > 0 else 0.0,
    }
