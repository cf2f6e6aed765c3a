"""The launcher: the process daisy starts for a command-started worker runs the command and waits.

`Command` (and `voxblock.cluster`'s `Slurm` and `Lsf`) hand daisy a
`ServeByCommand`: it fills `{run_dir}`, `{task_id}`, `{worker_id}` and
`{logdir}` in the command from this worker's daisy context, runs it in its own
session and waits. When the launcher is stopped (SIGTERM, SIGINT, SIGHUP) it
runs the compute's cancel command and terminates the command; if the launcher
dies outright, the kernel sends the command SIGTERM (Linux). With
`watch_server` it ends the command once the scheduler is gone. When the
command fails, the tail of its log files goes to stderr, so the error reaches
the run report. Also here: `run_quietly`, for the batch systems' own commands
(scancel, squeue, bkill).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
