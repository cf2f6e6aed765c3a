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
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from voxblock.job import Job, process_block, serve_blocks
from voxblock.rundir import RunDirectory
from voxblock.workers import Worker


@dataclass
class ServeInProcess:
    """daisy's block function for serial runs (`serial=True`): no processes, no TCP.

    For debugging and for fast property tests of the pure logic: the job's set-up and
    per-block step of the worker loop (voxblock.job), run in the driver; failures are
    recorded like in a worker process and re-raised so daisy retries them.
    """

    job: Job
    ready: bool = False

    def __call__(self, block: Any) -> None:
        if not self.ready:
            self.job.setup()
            self.ready = True
        process_block(self.job, block, RunDirectory(Path(self.job.run_dir)))


@dataclass(frozen=True)
class ServeHere:
    """daisy's process function for `Local`: serve blocks in the process daisy started."""

    job: Job

    def __call__(self) -> None:
        serve_blocks(self.job)


@dataclass(frozen=True)
class ServeForked:
    """daisy's process function for `Local` with a fork server: a warm child serves the blocks.

    The child shares this process's streams and environment; this process
    waits for it and exits as it did (see `voxblock.forkserver`). With no
    server to answer, it serves the blocks itself.
    """

    server: str
    run_dir: Path
    modules: tuple[str, ...] = ()

    def __call__(self) -> None:
        from voxblock import forkserver

        code = forkserver.run_forked(self.server, str(self.run_dir), self.modules)
        if code is None:
            serve_blocks(Job.load(self.run_dir))
            return
        if code != 0:
            sys.stdout.flush()
            sys.stderr.flush()
            if code < 0:  # killed by a signal: end by the same one, so that daisy reports it as such
                with contextlib.suppress(OSError, ValueError):  # SIGKILL's cannot be set, nor needs to
                    signal.signal(-code, signal.SIG_DFL)
                os.kill(os.getpid(), -code)
            os._exit(code if code > 0 else 128 - code)  # daisy reads a block timeout from the code


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

    def warm(self, worker: Worker) -> None:
        """Called by `run_tasks` before it prepares the tasks: start what workers will need."""

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
            return ServeForked(forkserver.address(modules), Path(job.run_dir), modules)
        return ServeHere(job)

    def warm(self, worker: Worker) -> None:
        from voxblock import forkserver

        if self.fork_server and forkserver.enabled():
            forkserver.address(worker_modules(worker))


def worker_modules(worker: Worker) -> tuple[str, ...]:
    """What the fork server imports for this worker: what it declares, and its module if that
    is voxblock's own (a user's module, a script or a test, is imported by the worker alone:
    its import-time code never runs in the server)."""
    module = type(worker).__module__
    own = (module,) if module.split(".")[0] in ("voxblock", "voxblock_workers") else ()
    return (*worker.preload, *own)


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
