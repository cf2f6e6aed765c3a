"""Where worker processes run, and the loop each of them runs.

daisy starts one process per worker slot and hands it the scheduler's
address in `DAISY_CONTEXT`. What that process does is chosen here:

- `Local` serves blocks right there (the default).
- `Command` runs a command that starts the worker somewhere else (`ssh
  host`, a cluster launcher...) and waits for it; the far end runs
  `python -m voxblock.compute RUN_DIR`, which reads the worker from the
  run directory and connects back over TCP. The launcher waits, so daisy
  sees the worker end and no job outlives the run.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle

from voxblock.rundir import RunDirectory
from voxblock.workers import Worker

WORKER_FILE = "worker.pkl"


class BlockCheckFailed(RuntimeError):
    """The task's post-check said a processed block is not done."""


@dataclass(frozen=True)
class Job:
    """Everything one worker process needs: picklable, and saved in the run directory."""

    worker: Worker
    run_dir: Path
    post_check: Callable[[Any], bool] | None = None

    def save(self) -> Path:
        path = Path(self.run_dir) / WORKER_FILE
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(cloudpickle.dumps(self))
        os.replace(tmp, path)
        return path


def serve_blocks(job: Job) -> None:
    """The worker loop: set up once, then process blocks until none are left.

    A block that raises is recorded (ROI, error) and reported to the
    scheduler as failed, which retries it; this process carries on with the
    next block, so one bad block does not cost a model reload.
    """
    import daisy.v2 as daisy

    run_dir = RunDirectory(Path(job.run_dir))
    client = daisy.Client()
    job.worker.setup()
    while True:
        current = None
        try:
            with client.acquire_block() as block:
                if block is None:
                    return
                current = block
                try:
                    job.worker.process(block)
                    if job.post_check is not None and not job.post_check(block):
                        raise BlockCheckFailed(
                            f"check_function says block {block.block_id[1]} "
                            f"(write ROI {block.write_roi}) is not done after processing"
                        )
                except Exception as error:
                    # record before daisy hears of the failure: after the last
                    # attempt the run may end as soon as it does
                    run_dir.record_failure(block, error)
                    raise
        except Exception:
            if current is None:
                raise


@dataclass
class ServeInProcess:
    """daisy's block function for serial runs (`serial=True`): no processes, no TCP.

    For debugging and for fast property tests of the pure logic; failures are
    recorded like in a worker process and re-raised so daisy retries them.
    """

    job: Job
    ready: bool = False

    def __call__(self, block: Any) -> None:
        if not self.ready:
            self.job.worker.setup()
            self.ready = True
        try:
            self.job.worker.process(block)
            if self.job.post_check is not None and not self.job.post_check(block):
                raise BlockCheckFailed(f"check_function says block {block.block_id[1]} is not done")
        except Exception as error:
            RunDirectory(Path(self.job.run_dir)).record_failure(block, error)
            raise


@dataclass(frozen=True)
class ServeHere:
    """daisy's process function for `Local`: serve blocks in the process daisy started."""

    job: Job

    def __call__(self) -> None:
        serve_blocks(self.job)


@dataclass(frozen=True)
class ServeByCommand:
    """daisy's process function for `Command`: start the worker with a command, wait."""

    command: tuple[str, ...]
    run_dir: Path

    def __call__(self) -> None:
        result = subprocess.run(list(self.command), env=dict(os.environ))
        if result.returncode != 0:
            raise RuntimeError(
                f"worker command exited with code {result.returncode}: {shlex.join(self.command)}"
            )


@dataclass(frozen=True)
class AfterInit:
    """Hold a worker process until the task's init callback has run in the driver.

    daisy 2 has no init callback; voxblock keeps daisy 1's promise (called
    once, when the task starts, with a context that reaches the scheduler)
    by having the first worker offer its context and every worker wait.
    """

    function: Callable[[], None]
    run_dir: Path

    def __call__(self) -> None:
        import daisy.v2 as daisy

        run_dir = RunDirectory(Path(self.run_dir))
        run_dir.announce_worker(dict(daisy.Context.from_env().items()))
        run_dir.wait_for_init()
        self.function()


class Compute:
    """Starts worker processes. Subclasses say where."""

    def process_function(self, job: Job) -> Callable[[], None]:
        raise NotImplementedError


@dataclass(frozen=True)
class Local(Compute):
    """Worker processes on this machine, started by daisy."""

    def process_function(self, job: Job) -> Callable[[], None]:
        return ServeHere(job)


@dataclass(frozen=True)
class Command(Compute):
    """Workers started by a command prefix, e.g. ("ssh", "node7") or a launcher.

    `{run_dir}` in the template is replaced by the run directory; the worker
    command `python -m voxblock.compute RUN_DIR` is appended.
    """

    template: Sequence[str] = field(default_factory=tuple)
    python: str = sys.executable

    def process_function(self, job: Job) -> Callable[[], None]:
        job.save()
        prefix = [part.replace("{run_dir}", str(job.run_dir)) for part in self.template]
        worker = [self.python, "-m", "voxblock.compute", str(job.run_dir)]
        return ServeByCommand(tuple(prefix + worker), Path(job.run_dir))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of a worker started by a command: load the job, serve blocks."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.exit("usage: python -m voxblock.compute RUN_DIR")
    job = cloudpickle.loads((Path(args[0]) / WORKER_FILE).read_bytes())
    serve_blocks(job)


if __name__ == "__main__":
    main()
