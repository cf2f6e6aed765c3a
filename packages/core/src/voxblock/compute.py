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

The process daisy starts for a command-started worker (the "launcher")
runs the command in its own session, and when the launcher is stopped
(SIGTERM, SIGINT, SIGHUP) it runs the compute's cancel command and
terminates the command; if the launcher dies outright, the kernel sends
the command SIGTERM (Linux). After a run, `run_tasks` calls
`Compute.cleanup(job)`, which for cluster computes cancels any job of the
run still known to the scheduler.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from voxblock.job import Job, process_block, serve_blocks
from voxblock.job import keep_freed_memory as keep_freed_memory  # benchmarks/floor.py
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


class _Stopped(BaseException):
    """The launcher got a signal that ends it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def launch_fields(run_dir: Path) -> dict[str, str]:
    """What `{...}` in a launch command may name, from this worker's DAISY_CONTEXT."""
    fields = {"run_dir": str(run_dir), "task_id": "task", "worker_id": "0", "logdir": ""}
    raw = os.environ.get("DAISY_CONTEXT")
    if raw:
        import daisy.v2 as daisy

        context = dict(daisy.Context.from_env().items())
        keys = ("task_id", "worker_id", "logdir", "hostname", "port")
        fields.update({k: str(context[k]) for k in keys if k in context})
    if not fields["logdir"]:
        fields["logdir"] = str(Path(run_dir) / "logs")
    return fields


def fill(parts: Sequence[str], fields: dict[str, str]) -> list[str]:
    """Replace `{run_dir}`, `{task_id}`, `{worker_id}`, `{logdir}` (plain replace: other braces stay)."""
    filled = []
    for part in parts:
        for key, value in fields.items():
            part = part.replace("{" + key + "}", value)
        filled.append(part)
    return filled


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """preexec_fn: SIGTERM this child when the launcher dies (Linux), so srun cancels its step."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass(frozen=True)
class ServeByCommand:
    """daisy's process function for command-started workers: run the command, wait.

    `{worker_id}`, `{task_id}`, `{logdir}` and `{run_dir}` in `command`,
    `cancel` and `logs` are filled from this worker's daisy context. If
    the launcher is stopped before the command ends, `cancel` runs (e.g.
    `scancel --name JOB`) and the command gets SIGTERM (then SIGKILL).
    When the command fails, the tail of the `logs` files (where a batch
    system wrote the worker's output) is copied to stderr, so the error
    reaches the run report.

    With `watch_server`, the launcher checks every `poll` seconds that the
    scheduler still listens: daisy waits for every worker process at the
    end of a run, and a job still queued would hold the run open until it
    starts. Once the scheduler refuses connections the run is over: the
    job is cancelled and the launcher ends cleanly.
    """

    command: tuple[str, ...]
    run_dir: Path
    cancel: tuple[str, ...] = ()
    logs: tuple[str, ...] = ()
    announce: bool = False
    watch_server: bool = False
    poll: float = 1.0

    def __call__(self) -> None:
        fields = launch_fields(Path(self.run_dir))
        command = fill(self.command, fields)
        if self.announce:
            print(f"voxblock: worker started by: {shlex.join(command)}", file=sys.stderr, flush=True)
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():

            def stop(signum: int, frame: Any) -> None:
                raise _Stopped(signum)

            for signum in STOP_SIGNALS:
                previous[signum] = signal.signal(signum, stop)
        process: subprocess.Popen | None = None
        try:
            process = subprocess.Popen(
                command,
                env=dict(os.environ),
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            returncode = self._wait(process, fields)
            if returncode is None:
                print("voxblock: the run has ended; cancelled this worker's job", file=sys.stderr)
                return
        except (_Stopped, KeyboardInterrupt) as stopped:
            self._stop(process, fields)
            if isinstance(stopped, _Stopped):
                sys.exit(128 + stopped.signum)
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if returncode != 0:
            for name in fill(self.logs, fields):
                _copy_tail(Path(name), sys.stderr)
            raise RuntimeError(f"worker command exited with code {returncode}: {shlex.join(command)}")

    def _wait(self, process: subprocess.Popen, fields: dict[str, str]) -> int | None:
        """The command's exit code; None if the scheduler went away first (the job is then stopped)."""
        if not (self.watch_server and fields.get("hostname") and fields.get("port")):
            return process.wait()
        address = (fields["hostname"], int(fields["port"]))
        refused = 0
        while True:
            try:
                return process.wait(self.poll)
            except subprocess.TimeoutExpired:
                pass
            refused = refused + 1 if server_gone(address) else 0
            if refused >= 2:
                self._stop(process, fields)
                return None

    def _stop(self, process: subprocess.Popen | None, fields: dict[str, str]) -> None:
        """Cancel the job and end the command, ignoring further signals meanwhile."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if self.cancel:
            run_quietly(fill(self.cancel, fields))
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def server_gone(address: tuple[str, int]) -> bool:
    """True only if the scheduler's address refuses connections (timeouts and DNS errors: not gone)."""
    try:
        with socket.create_connection(address, timeout=5):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def run_quietly(command: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess | None:
    """Run a scheduler command (scancel, squeue...); None if it is missing or hangs."""
    try:
        return subprocess.run(
            list(command), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def _copy_tail(path: Path, stream: Any, lines: int = 50) -> None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return
    tail = text.strip().splitlines()[-lines:]
    if tail:
        print(f"--- {path} (last {len(tail)} lines) ---", file=stream)
        print("\n".join(tail), file=stream, flush=True)


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
