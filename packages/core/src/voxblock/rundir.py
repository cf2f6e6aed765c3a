"""The run directory: what a run leaves on disk so that it can be resumed and read.

    <run_dir>/task.json      the task's identity (worker, options, ROIs)
    <run_dir>/lock           who is running it now (refuses a second run)
    <run_dir>/tracking/      daisy's done markers and failure counts
    <run_dir>/failures/      one JSON line per failed block attempt
    <run_dir>/logs/          one .out/.err pair per worker process
    <run_dir>/halo/          chunk face slabs for reads with context (voxblock.halo), in
                             per-worker pack files (voxblock.packfile)
    <run_dir>/init/          daisy 1's init-callback gate (voxblock.compat)
    <run_dir>/workers/       one JSON per worker process of the last run: start-up and block times
                             (written at its start, every few seconds while it serves, at its end)
    <run_dir>/progress.json  the driver's counts while it runs, replaced at most once a second
                             (voxblock.status: `voxblock status`)
    <run_dir>/report.json    the summary of the last run

By default it sits beside the output container (`volume.zarr.voxblock/
<dataset>/`): inside a zarr container, foreign files break zarr's listing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voxblock.errors import VoxblockError
from voxblock.files import replace_atomically

RUN_DIR_SUFFIX = ".voxblock"


def default_run_dir(outputs: list[str], worker_name: str, task_key: str) -> Path:
    from voxblock.names import ArrayName

    if outputs:
        first = ArrayName.parse(outputs[0])
        return Path(str(first.container) + RUN_DIR_SUFFIX) / first.dataset
    return Path("voxblock_runs") / f"{worker_name}-{task_key[:12]}"


@dataclass(frozen=True)
class RunDirectory:
    path: Path

    @property
    def tracking(self) -> Path:
        return self.path / "tracking"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def failures_dir(self) -> Path:
        return self.path / "failures"

    @property
    def init_dir(self) -> Path:
        return self.path / "init"

    @property
    def workers_dir(self) -> Path:
        return self.path / "workers"

    @property
    def halo_dir(self) -> Path:
        return self.path / "halo"

    @property
    def lock_file(self) -> Path:
        return self.path / "lock"

    # -- identity -------------------------------------------------------------

    def read_task(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / "task.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_task(self, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path / "task.json", json.dumps(record, indent=2, sort_keys=True))

    def reset(self) -> None:
        """Forget done blocks and failures: the next run starts over."""
        for directory in (self.tracking, self.failures_dir, self.init_dir, self.halo_dir):
            shutil.rmtree(directory, ignore_errors=True)
        (self.path / "report.json").unlink(missing_ok=True)
        (self.path / "progress.json").unlink(missing_ok=True)

    # -- lock -----------------------------------------------------------------

    def acquire_lock(self, description: str) -> None:
        try:
            self._acquire_lock(description)
        except OSError as error:
            raise VoxblockError(f"the run directory {self.path} is not writable: {error}") from error

    def _acquire_lock(self, description: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "what": description,
        }
        for _ in range(2):
            try:
                _create_with(self.lock_file, json.dumps(owner))
            except FileExistsError:
                holder = self._lock_holder()
                if holder is not None and _is_stale(holder):
                    self.lock_file.unlink(missing_ok=True)
                    continue
                raise self._held(holder, description) from None
            _remove_dead_private_files(self.lock_file)
            return
        raise VoxblockError(f"could not take the lock {self.lock_file}")

    def check_unlocked(self, description: str) -> None:
        """acquire_lock's refusal, reading only: for a check that must create nothing (--plan)."""
        if not self.lock_file.exists():
            return
        holder = self._lock_holder()
        if holder is None or not _is_stale(holder):
            raise self._held(holder, description)

    def _held(self, holder: dict[str, Any] | None, description: str) -> VoxblockError:
        who = (
            f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
            if holder
            else "another process"
        )
        return VoxblockError(
            f"another run ({who}) is writing {description}; two runs on one output "
            f"would interleave. If that run is dead, remove {self.lock_file}"
        )

    def release_lock(self) -> None:
        holder = self._lock_holder()
        if holder is not None and holder.get("pid") == os.getpid():
            self.lock_file.unlink(missing_ok=True)

    def _lock_holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.lock_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def lock_holder(self) -> dict[str, Any] | None:
        """Who holds the lock (host, pid, started, what), or None."""
        return self._lock_holder()

    # -- progress (voxblock.status) -------------------------------------------

    def write_progress(self, record: dict[str, Any]) -> None:
        """Driver side: the scheduler's counts for this task, replacing the last ones."""
        _write_atomic(self.path / "progress.json", json.dumps(record))

    def _tracking(self) -> tuple[Any, Any] | None:
        """daisy's per-block (done, failure count) arrays, or None before anything ran."""
        import numpy as np
        import zarr

        try:
            store = zarr.open_group(str(self.tracking), mode="r")
            return np.asarray(store["done"][...]), np.asarray(store["failures"][...])
        except Exception:
            return None

    def tracking_arrays(self) -> tuple[Any, Any] | None:
        """(done markers, failure counts) per block on the block grid; None if unreadable.
        Safe during a run: daisy sizes both at the start and sets bytes in place."""
        return self._tracking()

    def tracking_readable(self) -> bool:
        """False if daisy's tracking store exists but cannot be read (a torn write)."""
        return not self.tracking.exists() or self._tracking() is not None

    def done_blocks(self) -> int:
        tracking = self._tracking()
        return 0 if tracking is None else int((tracking[0] > 0).sum())

    def retried_blocks(self) -> int:
        """Blocks that are done but failed at least once (a raise, a kill or a timeout)."""
        tracking = self._tracking()
        if tracking is None:
            return 0
        done, failures = tracking
        return int(((done > 0) & (failures > 0)).sum())

    # -- failures -------------------------------------------------------------

    def record_failure(self, block: Any, error: BaseException) -> None:
        """Worker side: append one failed attempt of `block` (one line, atomic append)."""
        self.failures_dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps(
            {
                "block_id": int(block.block_id[1]),
                "read_roi": roi_record(block.read_roi),
                "write_roi": roi_record(block.write_roi),
                "error": f"{type(error).__name__}: {error}",
                "traceback": "".join(traceback.format_exception(error))[-4000:],
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "time": time.time(),
            }
        )
        fd = os.open(
            self.failures_dir / f"{int(block.block_id[1])}.jsonl",
            os.O_CREAT | os.O_APPEND | os.O_WRONLY,
            0o644,
        )
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def failures(self, block_id: int) -> list[dict[str, Any]]:
        try:
            text = (self.failures_dir / f"{block_id}.jsonl").read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    # -- worker timings -------------------------------------------------------

    def record_worker(self, timings: dict[str, Any]) -> None:
        """Worker side: its state (at its start, every few seconds while it serves blocks) and,
        when its loop ends, how long set-up took and how long it served blocks."""
        self.workers_dir.mkdir(parents=True, exist_ok=True)
        record = {**timings, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        _write_atomic(self.workers_dir / f"{socket.gethostname()}-{os.getpid()}.json", json.dumps(record))

    def worker_records(self) -> list[dict[str, Any]]:
        records = []
        for path in sorted(self.workers_dir.glob("*.json")):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        return records

    def forget_workers(self) -> None:
        shutil.rmtree(self.workers_dir, ignore_errors=True)


def roi_record(roi: Any) -> dict[str, list[int]]:
    return {"offset": [int(v) for v in roi.offset], "shape": [int(v) for v in roi.shape]}


def _is_stale(holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def _create_with(path: Path, text: str) -> None:
    """Create `path` holding `text`, or raise FileExistsError; never an empty `path`.

    The text goes to a private file first, then a hard link names it `path` (link fails if
    `path` exists). A run killed between open(O_EXCL) and its write would leave an empty
    lock with no owner to test for life, which every later run must refuse.
    """
    private = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}")
    private.write_text(text)
    try:
        os.link(private, path)
    except FileExistsError:
        raise
    except OSError:
        # A file system without hard links: exclusive create, then write (a small window).
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
    finally:
        private.unlink(missing_ok=True)


def _remove_dead_private_files(path: Path) -> None:
    """_create_with's private files left by processes killed in it, on this host."""
    host = socket.gethostname()
    for private in path.parent.glob(f".{path.name}.{host}.*"):
        pid = private.name.rsplit(".", 1)[-1]
        if pid.isdigit() and _is_stale({"host": host, "pid": int(pid)}):
            private.unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    replace_atomically(path, lambda file: file.write(text.encode()))
