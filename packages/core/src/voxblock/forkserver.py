"""Worker processes forked from a warm process instead of started cold.

daisy 2 starts every worker as a fresh Python process (its scheduler is
multi-threaded and cannot fork), which then imports numpy, zarr and the
worker's modules: about 0.3 s of CPU per worker and pass, most of a short
pass, and paid again by every pass of a segmentation. voxblock keeps one
single-threaded fork server per driver process, with those modules imported
once. The process daisy starts (the launcher) hands the server its
environment (daisy's context in it), working directory and standard streams
over a Unix socket; the server forks a child that serves the blocks and
reports its exit status, which the launcher exits with, so daisy sees the
child's exit (a crash, its block-timeout exit) as its worker's. When a
launcher goes away before its child ends (killed by daisy, a user, a test),
its connection closes and the server kills the child: no orphan keeps
serving blocks. The server ends with the driver, and its children with it.

Linux only; anywhere else, with `Local(fork_server=False)` or with
VOXBLOCK_FORK_SERVER=0, each worker imports what it needs itself.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import os
import pickle
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# what every worker needs: the worker loop, and what unpickling a worker takes (the rest comes
# with the workers' own lists; funlib.persistence never: importing it starts threads, and
# workers do not need it)
CORE_MODULES = ("cloudpickle", "daisy.v2", "voxblock.job", "voxblock.workers")
_PID, _STATUS, _LENGTH = struct.Struct("!q"), struct.Struct("!i"), struct.Struct("!Q")
_PR_SET_PDEATHSIG = 1
_PREFIX = "voxblock-fork-"

_lock = threading.Lock()
_server: subprocess.Popen | None = None
_address: str | None = None
_directory: str | None = None
_owner: int | None = None  # the process that started the server: a fork of it must not share it


def available() -> bool:
    return sys.platform.startswith("linux") and hasattr(socket, "send_fds") and hasattr(os, "fork")


# -- the driver's side ---------------------------------------------------------------------


def enabled() -> bool:
    """Available here, and not switched off with VOXBLOCK_FORK_SERVER=0."""
    return available() and os.environ.get("VOXBLOCK_FORK_SERVER", "1").lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


def address(preload: Sequence[str] = ()) -> str:
    """The socket of this process's fork server, started on first use (and again if it died).

    A server started now imports `preload` (module names) after what every
    worker needs, before it forks anyone; started early, it does so while
    the driver prepares its tasks.
    """
    global _server, _address, _directory, _owner
    with _lock:
        if _owner != os.getpid():  # a fork of the driver: start its own
            _server = _address = _directory = None
        if _server is not None and _server.poll() is None and _address is not None:
            return _address
        _stop_locked()
        _remove_stale()
        _owner = os.getpid()
        _directory = tempfile.mkdtemp(prefix=_PREFIX)
        _address = os.path.join(_directory, "socket")
        # the socket listens before the server starts: a launcher can never connect too early
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(_address)
        listener.listen(128)
        try:
            _server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "voxblock.forkserver",
                    str(listener.fileno()),
                    str(os.getpid()),
                    *preload,
                ],
                pass_fds=[listener.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        finally:
            listener.close()
        return _address


def _remove_stale() -> None:
    """Socket directories of servers killed outright (kill -9 of a whole process group): whatever
    of ours no server listens on any more."""
    for directory in Path(tempfile.gettempdir()).glob(_PREFIX + "*"):
        try:
            if directory.stat().st_uid != os.getuid():
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(str(directory / "socket"))
        except ConnectionRefusedError:
            shutil.rmtree(directory, ignore_errors=True)
        except OSError:
            continue


def stop() -> None:
    """End this process's fork server (at exit; tests)."""
    with _lock:
        _stop_locked()


def _stop_locked() -> None:
    global _server, _address, _directory
    if _owner != os.getpid():
        return  # the server of the process this one was forked from: not ours to end
    if _server is not None and _server.poll() is None:
        _server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            _server.wait(5)
    if _directory is not None:
        shutil.rmtree(_directory, ignore_errors=True)
    _server = _address = _directory = None


atexit.register(stop)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# -- the launcher's side (in the process daisy started) --------------------------------------


def run_forked(server: str, run_dir: str, modules: Sequence[str]) -> int | None:
    """Have the server fork a worker for `run_dir` with this process's streams and environment;
    its exit code (negative: killed by that signal), or None if no server answered."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(server)
    except OSError:
        connection.close()
        return None
    with connection:
        request = pickle.dumps(
            {
                "env": dict(os.environ),
                "cwd": os.getcwd(),
                "path": list(sys.path),  # where this process finds the job's modules (e.g. a test's)
                "run_dir": run_dir,
                "modules": list(modules),
            }
        )
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        socket.send_fds(connection, [_LENGTH.pack(len(request))], [0, 1, 2])
        connection.sendall(request)
        if _receive(connection, _PID.size) is None:
            return None  # the server ended before it forked: nothing ran
        status = _receive(connection, _STATUS.size)
        if status is None:
            raise RuntimeError("voxblock's fork server ended while this worker ran")
        return _STATUS.unpack(status)[0]


@dataclass(frozen=True)
class ServeForked:
    """daisy's process function for `Local` with a fork server: a warm child serves the blocks.

    The child shares this process's streams and environment; this process
    waits for it and exits as it did (see above). With no
    server to answer, it serves the blocks itself.
    """

    server: str
    run_dir: Path
    modules: tuple[str, ...] = ()
    # the launcher ends as soon as its child has (daisy's process function is this one's, not
    # wrapped by a worker's `spawn_function` that may do more after it)
    exit_when_done: bool = False

    def __call__(self) -> None:
        code = run_forked(self.server, str(self.run_dir), self.modules)
        if code is None:
            from voxblock.job import Job, serve_blocks

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
        if self.exit_when_done:
            # nothing of this process's is left to do: skip finalizing daisy's modules, which
            # daisy, and the end of the run, would wait for
            with contextlib.suppress(Exception):
                logging = sys.modules.get("logging")
                if logging is not None:
                    logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(0)


def _receive(connection: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# -- the server ------------------------------------------------------------------------------


def _import(modules: Iterable[str]) -> None:
    for name in modules:
        if name not in sys.modules:
            with contextlib.suppress(Exception):  # the worker will raise the error itself
                importlib.import_module(name)


def serve(listener: socket.socket, driver: int) -> None:
    """Fork a worker per connection; report each one's exit; kill it if its launcher goes."""
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    child_of: dict[socket.socket, int] = {}
    connection_of: dict[int, socket.socket | None] = {}  # None: its launcher has gone
    try:
        _serve_until_orphaned(listener, driver, selector, child_of, connection_of)
    finally:  # the driver has gone or stopped the server: so do its workers
        for pid in connection_of:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _serve_until_orphaned(
    listener: socket.socket,
    driver: int,
    selector: selectors.BaseSelector,
    child_of: dict[socket.socket, int],
    connection_of: dict[int, socket.socket | None],
) -> None:
    while os.getppid() == driver:
        for key, _ in selector.select(0.1):
            if key.data is _EXITED:
                continue  # a child has ended: reaped below, its launcher told at once
            if key.fileobj is listener:
                connection, _ = listener.accept()
                pid = _fork_worker(connection, [listener, *child_of], selector)
                if pid is None:
                    connection.close()
                    continue
                child_of[connection] = pid
                connection_of[pid] = connection
                selector.register(connection, selectors.EVENT_READ)
                _watch_exit(pid, selector)
            else:  # a launcher says nothing more: readable means it has gone
                connection = key.fileobj
                assert isinstance(connection, socket.socket)
                selector.unregister(connection)
                connection.close()
                pid = child_of.pop(connection)
                connection_of[pid] = None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        _reap(child_of, connection_of, selector)


def _fork_worker(
    connection: socket.socket, inherited: list[socket.socket], selector: selectors.BaseSelector
) -> int | None:
    connection.settimeout(30)
    fds: list[int] = []
    request = None
    try:
        header, fds, _, _ = socket.recv_fds(connection, _LENGTH.size, 3)
        body = _receive(connection, _LENGTH.unpack(header)[0]) if len(header) == _LENGTH.size else None
        request = pickle.loads(body) if body is not None and len(fds) == 3 else None
    except (OSError, pickle.UnpicklingError, struct.error):
        pass
    if request is None:
        for fd in fds:
            os.close(fd)
        return None
    sys.path[:] = request["path"]  # find the worker's modules where its launcher would
    _import(request["modules"])
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    # SIGTERM (the server's stop) must not reach the child before it has its own handlers
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    server = os.getpid()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; it never returns
            _run_child(connection, fds, request, [selector, *inherited], server)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    for fd in fds:
        os.close(fd)
    connection.settimeout(None)
    try:
        connection.sendall(_PID.pack(pid))
    except OSError:
        pass  # the launcher has gone already: the loop sees it and kills the child
    return pid


def _run_child(
    connection: socket.socket, fds: list[int], request: dict[str, Any], servers: list[Any], server: int
) -> None:  # pragma: no cover
    code = 1
    try:
        for held in [*servers, connection]:  # the server's sockets and selector are not the worker's
            held.close()
        for fd in _pidfds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for signum in (signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != server:
            return  # the server died before the line above: no worker without a launcher
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.path[:] = request["path"]
        importlib.invalidate_caches()
        _reseed()
        from voxblock.job import Job, serve_blocks

        serve_blocks(Job.load(request["run_dir"]))
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _reseed() -> None:  # pragma: no cover - in the child
    """Forked children would otherwise share the server's random state."""
    import random

    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


# selector data of a child's pidfd (Linux 5.3+): readable when the child ends, so that its
# launcher, and daisy, hear of it at once rather than at the selector's next 0.1 s timeout
_EXITED = object()
_pidfds: dict[int, int] = {}


def _watch_exit(pid: int, selector: selectors.BaseSelector) -> None:
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return  # no pidfds here: the timeout notices the exit
    _pidfds[pid] = fd
    selector.register(fd, selectors.EVENT_READ, _EXITED)


def _unwatch_exit(pid: int, selector: selectors.BaseSelector) -> None:
    fd = _pidfds.pop(pid, None)
    if fd is not None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            selector.unregister(fd)
        os.close(fd)


def _reap(
    child_of: dict[socket.socket, int],
    connection_of: dict[int, socket.socket | None],
    selector: selectors.BaseSelector,
) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _unwatch_exit(pid, selector)
        connection = connection_of.pop(pid, None)
        if connection is None:
            continue  # its launcher had gone; it was killed
        selector.unregister(connection)
        child_of.pop(connection, None)
        with contextlib.suppress(OSError):
            connection.sendall(_STATUS.pack(os.waitstatus_to_exitcode(status)))
        connection.close()


def _stop_serving(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _stop_preloading(path: str) -> Any:
    """The stop signal's handler while the server imports: stopped then (a run refused right
    after the CLI warmed the server, the driver gone), it has no child to end, and an exception
    raised into an import half done would print a traceback. It leaves quietly at once."""

    def stop(signum: int, frame: Any) -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)
            os.rmdir(os.path.dirname(path))
        os._exit(0)

    return stop


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    listener = socket.socket(fileno=int(args[0]))
    driver = int(args[1])
    preload = args[2:]
    path = listener.getsockname()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the driver and the workers
    signal.signal(signal.SIGTERM, _stop_preloading(path))  # stop() or the driver's death
    # Python 3.12 warns on fork() where a native thread exists (numpy's BLAS pool); that
    # pool is idle here and re-created in the child (OpenBLAS forks cleanly)
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork")
    _import([*CORE_MODULES, *preload])
    signal.signal(signal.SIGTERM, _stop_serving)  # serving: end the children first
    code = 0
    try:
        serve(listener, driver)
    except SystemExit:
        pass
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:  # the driver has gone (killed, perhaps, before it could clean up): leave nothing behind
        with contextlib.suppress(OSError):
            os.unlink(path)
            os.rmdir(os.path.dirname(path))
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        # and at once: finalizing numpy's, zarr's... modules takes 0.1 s that stop() waits for
        os._exit(code)


if __name__ == "__main__":
    main()
