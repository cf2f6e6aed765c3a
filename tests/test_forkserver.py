"""Workers forked from the warm fork server: real scheduler, real processes, real signals."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from funlib.geometry import Roi

import voxblock
from voxblock import forkserver
from voxblock.workers import Worker, option

pytestmark = pytest.mark.skipif(not forkserver.available(), reason="the fork server is Linux only")

TOTAL = Roi((0, 0), (8, 8))
BLOCK = Roi((0, 0), (4, 4))


@dataclass
class WhoAmI(Worker):
    """Records which process served each block, and its parent; sleeps if asked."""

    name = "who-am-i"
    record_dir: str = option("")
    sleep: float = option(0.0)

    def process(self, block) -> None:
        key = "_".join(map(str, block.write_roi.offset))
        Path(self.record_dir, key).write_text(f"{os.getpid()} {os.getppid()}")
        time.sleep(self.sleep)


def run(record_dir: Path, **kwargs) -> voxblock.RunReport:
    record_dir.mkdir(parents=True, exist_ok=True)
    task = voxblock.BlockwiseTask(
        WhoAmI(record_dir=str(record_dir)), TOTAL, BLOCK, BLOCK, 2, 0, run_dir=record_dir / "run", **kwargs
    )
    return voxblock.run_tasks([task], progress=False)


def served_by(record_dir: Path) -> set[tuple[int, int]]:
    return {tuple(map(int, p.read_text().split())) for p in record_dir.iterdir() if p.is_file()}


def test_workers_of_every_run_are_forked_from_one_server(tmp_path):
    assert run(tmp_path / "a").succeeded
    assert run(tmp_path / "b").succeeded
    first, second = served_by(tmp_path / "a"), served_by(tmp_path / "b")
    parents = {parent for _, parent in first | second}
    assert parents == {forkserver._server.pid}  # one warm server for both runs
    assert {pid for pid, _ in first}.isdisjoint({pid for pid, _ in second})  # fresh workers per run


def test_without_the_server_workers_start_cold(tmp_path):
    assert run(tmp_path / "a", compute=voxblock.Local(fork_server=False)).succeeded
    parents = {parent for _, parent in served_by(tmp_path / "a")}
    assert forkserver._server is None or forkserver._server.pid not in parents
    # and a launcher that finds no server serves the blocks itself
    assert forkserver.run_forked(str(tmp_path / "no-such-socket"), str(tmp_path), ()) is None


DRIVER = """
import sys, voxblock
sys.path.insert(0, sys.argv[2])
from test_forkserver import WhoAmI, TOTAL, BLOCK
from pathlib import Path
record = Path(sys.argv[1])
task = voxblock.BlockwiseTask(WhoAmI(record_dir=str(record), sleep=60.0), TOTAL, BLOCK, BLOCK, 2, 0,
                              run_dir=record / "run")
voxblock.run_tasks([task], progress=False)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_until(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def start_driver(record: Path, tmpdir: Path | None = None) -> tuple[subprocess.Popen, set[tuple[int, int]]]:
    record.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)} if tmpdir is not None else None
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(record), str(Path(__file__).parent)],
        start_new_session=True,
        env=env,
    )
    assert wait_until(lambda: len(served_by(record)) == 2, 60), "the workers never started"
    return driver, served_by(record)


def launchers(driver: int) -> list[int]:
    """daisy's worker processes of the driver: the launchers that asked the server for a worker."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent == driver and b"daisy._subprocess_worker" in command:
            found.append(int(entry.name))
    return found


def test_a_killed_launcher_takes_its_worker_with_it(tmp_path):
    driver, workers = start_driver(tmp_path / "r")
    try:
        for launcher in launchers(driver.pid):
            os.kill(launcher, signal.SIGKILL)
        # nothing keeps serving blocks for a worker daisy believes is dead
        assert wait_until(lambda: not any(alive(pid) for pid, _ in workers))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()


def socket_directories(under: Path) -> set[Path]:
    return set(under.glob("voxblock-fork-*"))


def test_a_killed_driver_takes_the_server_and_its_workers_with_it(tmp_path):
    # a temporary folder of this driver's own (short: a unix socket path has ~100 characters), so
    # that fork servers of other runs on the machine don't come and go in what is checked
    private = Path(tempfile.mkdtemp(prefix="vbt-", dir="/tmp"))
    try:
        driver, workers = start_driver(tmp_path / "r", tmpdir=private)
        (server,) = {parent for _, parent in workers}
        assert socket_directories(private)  # the driver's server listens there
        try:
            os.kill(driver.pid, signal.SIGKILL)  # the driver alone: its group lives on
            driver.wait()
            assert wait_until(lambda: not alive(server))
            assert wait_until(lambda: not any(alive(pid) for pid, _ in workers))
            assert not socket_directories(private)  # and nothing is left behind
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(driver.pid, signal.SIGKILL)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def test_a_fork_of_the_driver_leaves_the_drivers_server_alone(tmp_path):
    forkserver.address()
    server = forkserver._server
    assert server is not None
    pid = os.fork()
    if pid == 0:  # the fork: ending "its" server at exit must not end the driver's
        forkserver.stop()
        os._exit(0)
    os.waitpid(pid, 0)
    assert server.poll() is None
    assert run(tmp_path / "a").succeeded
    assert {parent for _, parent in served_by(tmp_path / "a")} == {server.pid}


def test_socket_directories_of_servers_killed_outright_are_removed(tmp_path):
    forkserver.stop()
    stale = Path(tempfile.mkdtemp(prefix="voxblock-fork-"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(stale / "socket"))  # bound, never listening: a server that was killed
    forkserver.address()
    assert not stale.exists()
    assert run(tmp_path / "a").succeeded  # and the new server serves


def test_the_environment_can_turn_the_server_off(tmp_path, monkeypatch):
    monkeypatch.setenv("VOXBLOCK_FORK_SERVER", "0")
    assert not forkserver.enabled()
    server = forkserver._server
    assert run(tmp_path / "a").succeeded
    parents = {parent for _, parent in served_by(tmp_path / "a")}
    assert server is None or server.pid not in parents  # the workers were not forked from it


def test_a_server_stopped_while_it_preloads_leaves_quietly(tmp_path):
    """The CLI warms the server as it starts; a run refused at once stops it mid-import: no
    traceback on the user's terminal, no socket directory left."""
    (tmp_path / "slow_to_import.py").write_text("import time\ntime.sleep(5)\n")
    script = (
        "import time\n"
        "from voxblock import forkserver\n"
        "address = forkserver.address(['slow_to_import'])\n"
        "time.sleep(1.0)\n"  # in the slow import by now
        "started = time.monotonic()\n"
        "forkserver.stop()\n"
        "assert time.monotonic() - started < 2, 'the server did not stop at once'\n"
        "import os\n"
        "assert not os.path.exists(os.path.dirname(address))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
