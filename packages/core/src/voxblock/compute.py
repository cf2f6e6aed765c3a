"""Where worker processes run; the loop each of them runs is voxblock.job's.

daisy starts one process per worker slot and hands it the scheduler's
address in `DAISY_CONTEXT`. What that process does is chosen here:

- `Local` serves blocks right there (the default).
- `Command` runs a command that starts the worker somewhere else (`ssh
  host`, a cluster launcher...) and waits for it; the far end runs
  `python -m voxblock.compute RUN_DIR`, which reads the worker from the
  run directory and connects back over TCP. The launcher waits, so daisy
  sees the worker end and no job outlives the run.
- `voxblock.cluster` builds on `Command`: `Slurm` (srun) and `Lsf`
  (bsub -K) with per-worker resources.

The process daisy starts for a command-started worker (the "launcher",
`voxblock.launcher`) runs the command, waits, and cancels it when stopped.
After a run, `run_tasks` calls `Compute.cleanup(job)`, which for cluster
computes cancels any job of the run still known to the scheduler.

A small job needs no process at all: a few blocks of a known pure worker
on `Local` compute with no timeout run in the driver (`runs_in_process`,
`ServeInProcess`), as a worker process would run them, with no scheduler
to start nor worker processes to wait for. A caller that knows its whole job is
small and pure (segment_blockwise: `segment.pipeline.fits_in_driver`) says so
with `IN_DRIVER`, and its tasks run there whatever their number of blocks.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from voxblock.job import Job, process_block, serve_blocks
from voxblock.rundir import RunDirectory
from voxblock.workers import Worker

# True while `run_tasks` runs a small job in the driver of its own accord (`runs_in_process`):
# a block that raises is then failed and retried (`max_retries`) and reported, as a worker
# process's would be; a serial run asked for (`serial=True`, debugging) raises it out of run_tasks
RETRY_IN_PROCESS: ContextVar[bool] = ContextVar("voxblock_retry_in_process", default=False)
# True while a caller runs tasks it has judged to fit in one worker, of workers that are pure for
# what they are given (segment_blockwise with a built-in function on a small volume): `run_tasks`
# (serial=None) runs them in the driver, blocks retried and reported, as a small job of PURE_WORKERS
IN_DRIVER: ContextVar[bool] = ContextVar("voxblock_in_driver", default=False)


@dataclass
class ServeInProcess:
    """daisy's block function for serial runs (`serial=True`, or a small job that `run_tasks`
    runs in the driver): no processes, no TCP.

    The job's set-up and per-block step of the worker loop (voxblock.job), run in the
    driver; failures are recorded like in a worker process. Asked for (debugging, fast
    property tests of the pure logic), they are raised out of the run; in a small job run
    here of voxblock's accord (`RETRY_IN_PROCESS`), the block is failed and daisy retries it.
    """

    job: Job
    ready: bool = False

    def __call__(self, block: Any) -> None:
        run_dir = RunDirectory(Path(self.job.run_dir))
        try:
            if not self.ready:
                try:
                    self.job.setup()
                except Exception as error:  # as a worker that fails to start: every attempt tries again
                    run_dir.record_failure(block, error)
                    raise
                self.ready = True
            process_block(self.job, block, run_dir)
        except Exception:
            if not RETRY_IN_PROCESS.get():
                raise
            import daisy.v2 as daisy

            block.status = daisy.BlockStatus.FAILED


@dataclass(frozen=True)
class ServeHere:
    """daisy's process function for `Local`: serve blocks in the process daisy started."""

    job: Job

    def __call__(self) -> None:
        serve_blocks(self.job)


def run_name(task_id: str) -> str:
    """A name unique to one run of one task, for the jobs it starts: TASK-TOKEN."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task_id) or "task"
    return f"{safe}-{uuid.uuid4().hex[:8]}"


class Compute:
    """Starts worker processes. Subclasses say where."""

    # whether workers may run on another machine: then the scheduler must listen on an address
    # they reach; when no task's workers do, it listens on loopback only (see `run.scheduler_host`)
    remote_workers: ClassVar[bool] = True

    def process_function(self, job: Job) -> Callable[[], None]:
        raise NotImplementedError

    def warm(self, worker: Worker | type[Worker]) -> None:
        """Called by `run_tasks` before it prepares the tasks (and by the CLI as it starts, with the
        worker's class): start what workers will need."""

    def cleanup(self, job: Job) -> None:
        """Called by `run_tasks` after the run, however it ended: end what is left of its workers."""


@dataclass(frozen=True)
class Local(Compute):
    """Worker processes on this machine, started by daisy.

    With `fork_server` (Linux), each worker is forked from one warm process
    per driver that has the worker's modules imported (`voxblock.forkserver`):
    no worker of any pass spends 0.3 s of CPU importing numpy and zarr again.
    """

    remote_workers: ClassVar[bool] = False
    fork_server: bool = True

    def process_function(self, job: Job) -> Callable[[], None]:
        from voxblock import forkserver

        if self.fork_server and forkserver.enabled():
            job.save()
            modules = worker_modules(job.worker)
            # a class of voxblock.forkserver: the launcher daisy starts imports nothing else of ours
            alone = type(job.worker).spawn_function is Worker.spawn_function
            return forkserver.ServeForked(forkserver.address(modules), Path(job.run_dir), modules, alone)
        return ServeHere(job)

    def warm(self, worker: Worker | type[Worker]) -> None:
        from voxblock import forkserver

        if self.fork_server and forkserver.enabled():
            forkserver.address(worker_modules(worker))


# Workers known to be pure: numpy (and fastremap) on the block's arrays, nothing else. No model,
# no native code that may take the process down, no threads, signals, environment or working
# directory changed, no output on the terminal: what they do in the driver they would do in a worker.
PURE_WORKERS = frozenset(
    {
        "voxblock_workers.threshold.Threshold",
        "voxblock_workers.argmax.Argmax",
        "voxblock_workers.relabel.Relabel",
    }
)
# a job this small runs in the driver: its blocks take less than a worker process takes to start
IN_PROCESS_BLOCKS = 8
# ... and, where more than one worker could share them, reads at most this many voxels in all
IN_PROCESS_VOXELS = 1 << 23


def runs_in_process(tasks: Sequence[Any]) -> bool:
    """Whether `run_tasks` runs these tasks (BlockwiseTasks) in this process, one block at a
    time, with no scheduler and no worker processes: only a small job (`IN_PROCESS_BLOCKS`
    blocks in all; `IN_PROCESS_VOXELS` read, unless one worker would do them all anyway) of
    known pure workers (`PURE_WORKERS`) on `Local` compute, with no block timeout and no init
    callback. In the driver nothing could kill a block past its timeout, and a block that takes
    the process down (a segfault, the OOM killer) would take the run with it instead of costing
    a worker restart and a retry: that is safe only for workers that cannot do either. Failed
    blocks are recorded and retried (`max_retries`) as in a worker. VOXBLOCK_IN_PROCESS=0 turns
    it off. Under `IN_DRIVER` the caller has judged the size and the workers: only the compute,
    timeout and init callback are checked."""
    if in_process_off():
        return False
    if IN_DRIVER.get():
        return all(_driver_can_serve(task) for task in tasks)
    blocks = 0
    for task in tasks:
        if not _driver_can_serve(task) or not _pure(type(task.worker)):
            return False
        blocks += task.num_blocks
    if blocks > IN_PROCESS_BLOCKS:
        return False
    if blocks <= 1 or all(t.num_workers <= 1 for t in tasks):
        return True  # one worker process would serve them all, one after the other, anyway
    return sum(_voxels_read(t) for t in tasks) <= IN_PROCESS_VOXELS


def in_process_off() -> bool:
    """VOXBLOCK_IN_PROCESS=0: every job starts a scheduler and worker processes."""
    return os.environ.get("VOXBLOCK_IN_PROCESS", "1").lower() in ("0", "false", "no", "off")


def _driver_can_serve(task: Any) -> bool:
    """Nothing but a worker process could honour a block timeout, compute elsewhere, or an init
    callback that runs as workers start."""
    return type(task.compute) is Local and task.timeout is None and task.init_callback_fn is None


def _pure(kind: type) -> bool:
    return (
        f"{kind.__module__}.{kind.__qualname__}" in PURE_WORKERS
        and getattr(kind, "spawn_function", None) is Worker.spawn_function
    )


def may_run_in_process(
    kind: type[Worker], compute: Compute, timeout: float | None, input_name: str | None, block_size: str
) -> bool:
    """The CLI's guess, as it starts, that `runs_in_process` will say yes (then it does not warm
    a fork server that nothing would use): a pure worker on `Local` compute with no timeout,
    and an input that the array's metadata alone (no zarr import) shows to be at most
    `IN_PROCESS_BLOCKS` blocks of `block_size` voxels. False where it cannot tell."""
    if in_process_off() or type(compute) is not Local or timeout is not None or not _pure(kind):
        return False
    shape = _metadata_shape(Path(input_name)) if input_name else None
    try:
        block = [int(v) for v in str(block_size).replace("x", ",").split(",") if v.strip()]
    except ValueError:
        return False
    if shape is None or not block or min(block) <= 0:
        return False
    if len(block) > 1:
        shape = shape[-len(block) :]
    blocks = 1
    for i, size in enumerate(shape):
        blocks *= -(-int(size) // block[min(i, len(block) - 1)])
    return blocks <= IN_PROCESS_BLOCKS


def _metadata_shape(path: Path) -> list[int] | None:
    """A zarr array's shape from its metadata file (v3 or v2), or None."""
    import json

    for name in ("zarr.json", ".zarray"):
        try:
            metadata = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        shape = metadata.get("shape") if isinstance(metadata, dict) else None
        if isinstance(shape, list) and all(isinstance(s, int) for s in shape):
            return shape
        return None
    return None


def _voxels_read(task: Any) -> int:
    from voxblock import arrays

    voxel_size = arrays.open_input(task.worker.input).voxel_size
    voxels = 1
    for size, voxel in zip(task.blocking.read_roi.shape, voxel_size):
        voxels *= -(-int(size) // int(voxel))
    return voxels * task.num_blocks


def worker_modules(worker: Worker | type[Worker]) -> tuple[str, ...]:
    """What the fork server imports for this worker: what it declares, and its module if that
    is voxblock's own (a user's module, a script or a test, is imported by the worker alone:
    its import-time code never runs in the server)."""
    kind = worker if isinstance(worker, type) else type(worker)
    module = kind.__module__
    own = (module,) if module.split(".")[0] in ("voxblock", "voxblock_workers") else ()
    return (*kind.preload, *own)


@dataclass(frozen=True)
class Command(Compute):
    """Workers started by a command prefix, e.g. ("ssh", "node7") or a launcher.

    `{run_dir}` in the template is replaced by the run directory (and
    `{task_id}`, `{worker_id}`, `{logdir}` by this worker's); the worker
    command `python -m voxblock.compute RUN_DIR` is appended.
    """

    template: Sequence[str] = field(default_factory=tuple)
    python: str = sys.executable

    def process_function(self, job: Job) -> Callable[[], None]:
        from voxblock.launcher import ServeByCommand  # imported by the driver and launchers, not workers

        job.save()
        return ServeByCommand(tuple([*self.template, *worker_command(job, self.python)]), Path(job.run_dir))


def worker_command(job: Job, python: str = sys.executable) -> list[str]:
    """The command that runs one worker anywhere the run directory is visible."""
    # -W: `python -m voxblock.compute` warns that the package imported the module first
    run_dir = str(Path(job.run_dir).resolve())
    return [python, "-W", "ignore::RuntimeWarning:runpy", "-m", "voxblock.compute", run_dir]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of a worker started by a command: load the job, serve blocks."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.exit("usage: python -m voxblock.compute RUN_DIR")
    serve_blocks(Job.load(args[0]))


if __name__ == "__main__":
    main()
