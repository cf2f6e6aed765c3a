"""Where a run stands, read from its run directory alone (`voxblock status`).

Everything here reads files a run leaves on disk (`voxblock.rundir`), so it
works while the run goes on, from another shell or another node that sees
the filesystem:

- done blocks: daisy's done markers, `tracking/done`, a zarr array of one
  uncompressed byte per block that the scheduler creates at full size when
  the run starts and sets in place (memory-mapped) as blocks complete: a
  read sees each byte 0 or 1, never a torn record;
- failed blocks: `tracking/failures` (failed attempts per block, kills and
  timeouts included) and `failures/*.jsonl` (ROI and error of each attempt
  that raised);
- the rate: `progress.json`, which the driver replaces at most once a
  second with its scheduler's counts and the last two minutes of samples
  (`ProgressRecorder`, a daisy progress observer);
- workers: `workers/HOST-PID.json`, written when a worker process starts,
  every few seconds while it serves blocks, and when it ends;
- running, finished or stopped: the `lock` (a run holds it; a driver killed
  leaves it, held by a dead pid), `report.json` (written when a run ends).

`read_status(target)` gives a `Status`; `render(status)` the text
`voxblock status` prints.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from voxblock.errors import VoxblockError
from voxblock.rundir import RUN_DIR_SUFFIX, RunDirectory

PROGRESS_FILE = "progress.json"
# the driver replaces progress.json at most this often; samples cover the last WINDOW_SECONDS
PROGRESS_INTERVAL = 1.0
SAMPLE_SECONDS = 120.0
# the rate is taken over this much of the recent past
RATE_WINDOW = 60.0

STATES = ("running", "finished", "failed", "stopped", "not started")

# what a run directory holds: never searched for other run directories
_RUN_DIR_PARTS = {"tracking", "logs", "failures", "workers", "halo", "init", "edges", "faces"}
# a zarr / N5 node: never searched (a big array holds millions of chunk files)
_ARRAY_MARKERS = ("zarr.json", ".zarray", ".zgroup", "attributes.json")


# -- what the driver writes ---------------------------------------------------------------------


class ProgressRecorder:
    """A daisy progress observer: each task's scheduler counts into its run directory's
    progress.json, at most once every `interval` seconds (and at start and finish), with
    samples of the last `SAMPLE_SECONDS` for the rate. Forwards every call to `inner`
    (daisy's progress bars) when given. A write that fails is skipped: it never stops a run."""

    def __init__(
        self,
        run_dirs: Mapping[str, tuple[RunDirectory, int]],
        inner: Any = None,
        interval: float = PROGRESS_INTERVAL,
    ) -> None:
        self.run_dirs = dict(run_dirs)  # task id -> (run directory, max_retries)
        self.inner = inner
        self.interval = interval
        self._next = 0.0
        self._started = time.time()
        self._samples: dict[str, deque[tuple[float, int]]] = {t: deque() for t in self.run_dirs}
        self._last: dict[str, tuple[Any, ...]] = {}

    def on_start(self, states: Any) -> None:
        if self.inner is not None:
            self.inner.on_start(states)
        self._write(states, "start")

    def on_progress(self, states: Any) -> None:
        if self.inner is not None:
            self.inner.on_progress(states)
        if time.monotonic() >= self._next:
            self._write(states, "progress")

    def on_finish(self, states: Any) -> None:
        if self.inner is not None:
            self.inner.on_finish(states)
        self._write(states, "finish")

    def _write(self, states: Any, event: str) -> None:
        self._next = time.monotonic() + self.interval
        now = time.time()
        for task_id, state in states.items():
            if task_id not in self.run_dirs:
                continue
            try:
                counts = _counts(state)
            except Exception:
                continue
            samples = self._samples[task_id]
            samples.append((now, counts["completed"] - counts["skipped"]))
            while len(samples) > 2 and samples[1][0] < now - SAMPLE_SECONDS:
                samples.popleft()
            key = (event, *counts.values())
            if self._last.get(task_id) == key:
                continue  # nothing changed: the file on disk says it already
            self._last[task_id] = key
            run_dir, max_retries = self.run_dirs[task_id]
            record = {
                "task_id": task_id,
                "event": event,
                "time": now,
                "started": self._started,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "max_retries": max_retries,
                **counts,
                "samples": [[round(t, 3), n] for t, n in samples],
            }
            try:
                run_dir.write_progress(record)
            except OSError:
                pass


def _counts(state: Any) -> dict[str, Any]:
    return {
        "total": int(state.total_block_count),
        "completed": int(state.completed_count),
        "skipped": int(state.skipped_count),
        "processing": int(state.processing_count),
        "failed": int(state.failed_count),
        "orphaned": int(state.orphaned_count),
        "restarts": int(state.worker_restart_count),
        "abandoned": bool(getattr(state, "abandoned", False)),
    }


# -- what status reads ---------------------------------------------------------------------------


@dataclass
class FailedBlock:
    block_id: int | None
    write_roi: dict[str, list[int]] | None
    read_roi: dict[str, list[int]] | None
    attempts: int
    error: str
    retrying: bool = False  # the run goes on and has attempts left for it


@dataclass
class WorkerProcess:
    host: str
    pid: int
    state: str  # "setting up", "serving" or "ended"
    blocks: int
    seen_seconds_ago: float | None
    alive: bool | None  # None: on another host, and not ended


@dataclass
class TaskStatus:
    task_id: str
    run_dir: str
    state: str  # one of STATES
    done: int
    failed: int
    total: int | None
    blocks_per_second: float | None = None  # over the last RATE_WINDOW seconds, while running
    eta_seconds: float | None = None
    driver: dict[str, Any] | None = None  # host, pid, started, alive (of the lock holder)
    failed_blocks: list[FailedBlock] = field(default_factory=list)
    workers: list[WorkerProcess] = field(default_factory=list)
    updated_seconds_ago: float | None = None  # the driver's last progress record
    seconds: float | None = None  # how long the last run took, once it ended
    note: str | None = None


@dataclass
class Status:
    target: str
    time: float
    tasks: list[TaskStatus]

    @property
    def running(self) -> bool:
        return any(t.state == "running" for t in self.tasks)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "running": self.running}


def find_run_dirs(target: str | Path) -> list[Path]:
    """The run directories TARGET names: a run directory, a directory holding several (each
    pass of segment or agglomerate), an output array CONTAINER/DATASET (its run directory
    beside the container), or a container (or SQLite graph) with its `.voxblock` beside it."""
    from voxblock.rundir import default_run_dir

    text = str(target).rstrip("/") or "/"
    roots = [Path(text), Path(text + RUN_DIR_SUFFIX)]
    try:
        roots.append(default_run_dir([text], "", ""))
    except VoxblockError:
        pass
    found: dict[Path, Path] = {}
    for root in roots:
        for path in _scan(root, depth=6):
            found.setdefault(path.resolve(), path)
    return sorted(found.values(), key=_run_order)


def _scan(directory: Path, depth: int) -> list[Path]:
    if not directory.is_dir():
        return []
    if (directory / "task.json").is_file():
        return [directory]
    if depth == 0 or any((directory / m).exists() for m in _ARRAY_MARKERS):
        return []
    found = []
    try:
        children = sorted(p for p in directory.iterdir() if p.is_dir() and p.name not in _RUN_DIR_PARTS)
    except OSError:
        return []
    for child in children[:1000]:
        found.extend(_scan(child, depth - 1))
    return found


def _run_order(path: Path) -> tuple[float, str]:
    """Passes in the order they ran: when each was (last) prepared."""
    try:
        return (path.joinpath("task.json").stat().st_mtime, str(path))
    except OSError:
        return (float("inf"), str(path))


def read_status(target: str | Path, now: float | None = None) -> Status:
    """Every task found under TARGET (see `find_run_dirs`); VoxblockError if none."""
    run_dirs = find_run_dirs(target)
    if not run_dirs:
        raise VoxblockError(
            f"no run directory found for {target}: give an output array (CONTAINER/DATASET), "
            "a run directory (one holding task.json) or a directory holding run directories"
        )
    now = time.time() if now is None else now
    return Status(str(target), now, [task_status(path, now) for path in run_dirs])


def task_status(path: str | Path, now: float | None = None) -> TaskStatus:
    """Where the task of one run directory stands."""
    now = time.time() if now is None else now
    run_dir = RunDirectory(Path(path))
    task = run_dir.read_task() or {}
    blocking = _blocking(task.get("identity") or {})
    batching = _batching(blocking, task.get("identity") or {})
    progress = _read_json(run_dir.path / PROGRESS_FILE)
    report = _read_json(run_dir.path / "report.json")
    prepared = _mtime(run_dir.path / "task.json")
    # records of an earlier run of this directory say nothing about this one
    if progress is not None and progress.get("started", 0.0) < prepared - 1.0:
        progress = None
    if report is not None and _mtime(run_dir.path / "report.json") < prepared:
        report = None

    total: int | None = blocking.num_blocks if blocking is not None else None
    if total is None and progress is not None:
        total = int(progress["total"])
    tracking = run_dir.tracking_arrays()
    if tracking is not None:
        done_markers, failure_counts = tracking
        done = int((done_markers > 0).sum()) if batching is None else batching.done_blocks(done_markers)
    else:
        done_markers = failure_counts = None
        done = int(progress["completed"]) if progress is not None else 0

    holder = run_dir.lock_holder()
    driver = None
    if holder is not None:
        driver = {**holder, "alive": _alive(holder.get("host"), holder.get("pid"))}
    state, note = _state(driver, done, total, report, progress)
    if driver is not None and driver["alive"] is None:
        note = f"the driver runs on {driver.get('host')}: whether it is alive can't be checked from here"

    running = state == "running"
    max_retries = int(progress.get("max_retries", 2)) if progress is not None else None
    failed_blocks = (
        _failed_blocks(run_dir, blocking, done_markers, failure_counts)
        if batching is None
        else _failed_in_batches(run_dir, batching, done_markers, failure_counts)
    )
    for block in failed_blocks:
        block.retrying = running and (max_retries is None or block.attempts <= max_retries)
    status = TaskStatus(
        task_id=str(task.get("task_id") or run_dir.path.name),
        run_dir=str(run_dir.path),
        state=state,
        done=done,
        failed=len(failed_blocks),
        total=total,
        driver=driver,
        failed_blocks=failed_blocks,
        workers=_workers(run_dir, now, running),
        note=note,
    )
    if progress is not None:
        status.updated_seconds_ago = max(0.0, now - float(progress["time"]))
    if running and progress is not None:
        status.blocks_per_second = _rate(progress.get("samples") or [], now)
        if batching is not None and status.blocks_per_second:  # daisy counts batches
            status.blocks_per_second *= batching.blocking.num_blocks / max(1, batching.num_batches)
        given_up = sum(1 for b in failed_blocks if not b.retrying)
        if status.blocks_per_second and total is not None:
            status.eta_seconds = max(0, total - done - given_up) / status.blocks_per_second
    if report is not None and not running:
        status.seconds = float(report.get("seconds") or 0.0) or None
    return status


def _state(
    driver: dict[str, Any] | None,
    done: int,
    total: int | None,
    report: dict[str, Any] | None,
    progress: dict[str, Any] | None,
) -> tuple[str, str | None]:
    if driver is not None:
        if driver["alive"] is False:
            return "stopped", (
                f"the driver (pid {driver.get('pid')} on {driver.get('host')}) is dead but holds the "
                "lock: killed. Run the same command again to resume"
            )
        return "running", None
    if total is not None and done >= total:
        return "finished", None
    if report is not None:
        if report.get("failed_blocks") or report.get("abandoned") or report.get("orphaned"):
            return "failed", report.get("abandoned")
        return "finished", None
    if progress is not None and progress.get("event") == "finish":
        return "failed", None
    if done == 0 and progress is None:
        return "not started", None
    return "stopped", "no run holds this directory and none finished: run it again to resume"


def _alive(host: Any, pid: Any) -> bool | None:
    """Whether a process runs: None where it can't be told (another host)."""
    if host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return None
    return _not_zombie(int(pid))


def _not_zombie(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return fields[0] != "Z"


def _rate(samples: list[list[float]], now: float) -> float | None:
    """Blocks per second over the last RATE_WINDOW seconds, up to `now` (a stall slows it)."""
    if not samples:
        return None
    base = samples[0]
    for sample in samples:
        if sample[0] <= now - RATE_WINDOW:
            base = sample
    last = samples[-1]
    span = now - base[0]
    if span <= 0:
        return None
    return max(0.0, (last[1] - base[1]) / span)


def _blocking(identity: dict[str, Any]) -> Any:
    from funlib.geometry import Roi

    from voxblock.geometry import Blocking

    try:
        rois = [Roi(*identity[k]) for k in ("total_roi", "read_roi", "write_roi")]
        return Blocking(*rois, fit=identity.get("fit", "valid"))
    except Exception:
        return None


def _batching(blocking: Any, identity: dict[str, Any]) -> Any:
    """The batches of a batched task (its identity's `batch`), else None."""
    from voxblock.geometry import Batching, check_batch

    if blocking is None or "batch" not in identity:
        return None
    try:
        return Batching(blocking, check_batch(identity["batch"], blocking.total_roi.dims))
    except Exception:
        return None


def _failed_in_batches(
    run_dir: RunDirectory, batching: Any, done_markers: Any, failure_counts: Any
) -> list[FailedBlock]:
    """`_failed_blocks` of a batched task, whose done markers and failure counts are per batch:
    its blocks that recorded a failure, outside batches marked done (by their own ROI), and the
    batches that failed with no block recording it (their worker died: by the batch's ROI)."""
    import numpy as np

    scheduled = batching.scheduled
    shift = scheduled.tracking_shift
    stride, start = scheduled.write_roi.shape, scheduled.target_roi.begin
    dims = range(scheduled.total_roi.dims)

    def cell(offset: list[int]) -> tuple[int, ...]:
        """The tracking cell of the batch holding the block whose write ROI starts at `offset`."""
        return tuple(shift[d] + (offset[d] - start[d]) // stride[d] for d in dims)

    def marked(index: tuple[int, ...], array: Any) -> bool:
        try:
            return array is not None and bool(array[index] > 0)
        except IndexError:
            return False

    failed: list[FailedBlock] = []
    recorded: set[tuple[int, ...]] = set()
    paths = sorted(run_dir.failures_dir.glob("*.jsonl"))[:10000] if run_dir.failures_dir.is_dir() else []
    for path in paths:
        try:
            attempts = sorted(run_dir.failures(int(path.stem)), key=lambda a: a.get("time", 0.0))
            index = cell(attempts[-1]["write_roi"]["offset"]) if attempts else None
        except (ValueError, OSError, json.JSONDecodeError, KeyError, IndexError):
            continue
        if index is None:
            continue
        recorded.add(index)
        if not marked(index, done_markers):
            last = attempts[-1]
            failed.append(
                FailedBlock(int(path.stem), last["write_roi"], last["read_roi"], len(attempts), last["error"])
            )
    if failure_counts is not None and done_markers is not None:
        axes = [scheduled._axis_blocks(d) for d in dims]
        for found in np.argwhere((failure_counts > 0) & (done_markers == 0)):
            index = tuple(int(i) for i in found)
            if index in recorded:
                continue
            position = tuple(i - shift[d] for d, i in enumerate(index))
            if min(position) < 0:
                continue
            read_roi, write_roi = _grid_rois(position, axes)
            failed.append(
                FailedBlock(
                    None,
                    write_roi,
                    read_roi,
                    int(failure_counts[index]),
                    "the worker process of its batch died (killed, or past the timeout): no error recorded",
                )
            )
    return sorted(failed, key=lambda b: tuple((b.write_roi or {}).get("offset", ())))


def _failed_blocks(
    run_dir: RunDirectory, blocking: Any, done_markers: Any, failure_counts: Any
) -> list[FailedBlock]:
    """Blocks not done that failed at least once: from the tracking store's failure counts
    (kills and timeouts included) and the failure records (ROI, error)."""
    import numpy as np

    axes = None
    shift: tuple[int, ...] = ()  # grid block i's tracking cell is i + shift (Blocking.tracking_shift)
    if blocking is not None:
        axes = [blocking._axis_blocks(d) for d in range(blocking.total_roi.dims)]
        shift = blocking.tracking_shift

    def cell(index: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(i + s for i, s in zip(index, shift)) if shift else index

    records: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    ids: dict[tuple[int, ...], int] = {}
    paths = sorted(run_dir.failures_dir.glob("*.jsonl"))[:10000] if run_dir.failures_dir.is_dir() else []
    for path in paths:
        try:
            attempts = run_dir.failures(int(path.stem))
        except (ValueError, OSError, json.JSONDecodeError):
            continue
        if not attempts:
            continue
        index = _grid_index(attempts[-1]["write_roi"]["offset"], axes)
        key = index if index is not None else (-1, int(path.stem))
        records[key] = sorted(attempts, key=lambda a: a.get("time", 0.0))
        ids[key] = int(path.stem)

    def is_done(index: tuple[int, ...]) -> bool:
        if done_markers is None or index[0] < 0:
            return False
        try:
            return bool(done_markers[cell(index)] > 0)
        except IndexError:
            return False

    keys: set[tuple[int, ...]] = {k for k in records if not is_done(k)}
    if failure_counts is not None and done_markers is not None:
        for found in np.argwhere((failure_counts > 0) & (done_markers == 0)):
            index = tuple(int(i) - s for i, s in zip(found, shift)) if shift else tuple(int(i) for i in found)
            if min(index, default=0) >= 0:
                keys.add(index)
    failed = []
    for key in sorted(keys):
        attempts = records.get(key, [])
        counted = 0
        if failure_counts is not None and key[0] >= 0:
            try:
                counted = int(failure_counts[cell(key)])
            except IndexError:
                pass
        write_roi = read_roi = None
        if attempts:
            write_roi, read_roi = attempts[-1]["write_roi"], attempts[-1]["read_roi"]
        elif axes is not None:
            read_roi, write_roi = _grid_rois(key, axes)
        failed.append(
            FailedBlock(
                block_id=ids.get(key),
                write_roi=write_roi,
                read_roi=read_roi,
                attempts=max(counted, len(attempts)),
                error=(
                    attempts[-1]["error"]
                    if attempts
                    else "its worker process died (killed, or past the timeout): no error recorded"
                ),
            )
        )
    return failed


# per axis, (read begin, read end, write begin, write end) of each block (Blocking._axis_blocks)
Axes = list[list[tuple[int, int, int, int]]]


def _grid_index(offset: list[int], axes: Axes | None) -> tuple[int, ...] | None:
    """The done-marker index of the block whose write ROI starts at `offset`."""
    if axes is None or len(offset) != len(axes):
        return None
    index = []
    for value, blocks in zip(offset, axes):
        hit = next((i for i, b in enumerate(blocks) if b[2] <= value < b[3]), None)
        if hit is None:
            return None
        index.append(hit)
    return tuple(index)


def _grid_rois(index: tuple[int, ...], axes: Axes) -> tuple[Any, Any]:
    try:
        spans = [axis[i] for axis, i in zip(axes, index)]
    except IndexError:
        return None, None
    read = {"offset": [s[0] for s in spans], "shape": [s[1] - s[0] for s in spans]}
    write = {"offset": [s[2] for s in spans], "shape": [s[3] - s[2] for s in spans]}
    return read, write


def _workers(run_dir: RunDirectory, now: float, running: bool) -> list[WorkerProcess]:
    workers = []
    for record in run_dir.worker_records():
        state = record.get("state") or ("ended" if "serving_seconds" in record else "serving")
        alive: bool | None = False
        if state != "ended" and running:
            alive = _alive(record.get("host"), record.get("pid"))
        seen = record.get("time")
        workers.append(
            WorkerProcess(
                host=str(record.get("host")),
                pid=int(record.get("pid", -1)),
                state=state,
                blocks=int(record.get("blocks", 0)),
                seen_seconds_ago=max(0.0, now - float(seen)) if seen is not None else None,
                alive=alive,
            )
        )
    return workers


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# -- text ----------------------------------------------------------------------------------------


def render(status: Status, width: int = 30, max_failed: int = 10) -> str:
    """What `voxblock status` prints: per task, a bar, counts, rate and ETA, the driver and
    workers, and the failed blocks."""
    lines = []
    base = Path(status.target)
    for task in status.tasks:
        where = _shown_path(Path(task.run_dir), base)
        lines.append(f"{task.task_id}  {task.state.upper()}  ({where})")
        total = task.total if task.total is not None else 0
        fraction = task.done / total if total else 0.0
        filled = int(fraction * width)  # full only when all are done
        counts = f"{task.done}/{task.total if task.total is not None else '?'} blocks done"
        if task.failed:
            retrying = sum(1 for b in task.failed_blocks if b.retrying)
            counts += f", {task.failed} failed" + (f" ({retrying} retrying)" if retrying else "")
        lines.append(f"  [{'#' * filled}{'.' * (width - filled)}] {fraction:6.1%}  {counts}")
        if task.state == "running":
            rate = (
                "rate unknown" if task.blocks_per_second is None else f"{task.blocks_per_second:.2f} blocks/s"
            )
            eta = "" if task.eta_seconds is None else f", ETA {_duration(task.eta_seconds)}"
            seen = (
                ""
                if task.updated_seconds_ago is None
                else f" (driver's last record {_duration(task.updated_seconds_ago)} ago)"
            )
            lines.append(f"  {rate}{eta}{seen}")
        elif task.seconds:
            lines.append(f"  the last run took {_duration(task.seconds)}")
        if task.driver is not None:
            lines.append(
                f"  driver: pid {task.driver.get('pid')} on {task.driver.get('host')} "
                f"since {task.driver.get('started')}"
            )
        alive = [w for w in task.workers if w.alive is not False and w.state != "ended"]
        if task.state == "running" or alive:
            shown = ", ".join(f"{w.host}:{w.pid} ({w.state}{_seen(w)})" for w in alive[:8])
            more = f", and {len(alive) - 8} more" if len(alive) > 8 else ""
            lines.append(f"  workers: {len(alive)} alive" + (f": {shown}{more}" if alive else ""))
        for block in task.failed_blocks[:max_failed]:
            roi = block.write_roi or {}
            what = f"block {block.block_id}" if block.block_id is not None else "block"
            retrying = ", retrying" if block.retrying else ""
            lines.append(
                f"  failed {what} write ROI offset={tuple(roi.get('offset', ()))} "
                f"shape={tuple(roi.get('shape', ()))}: {block.attempts} attempt(s){retrying}, "
                f"last error: {block.error}"
            )
        if len(task.failed_blocks) > max_failed:
            lines.append(f"  ... and {len(task.failed_blocks) - max_failed} more (--json lists them all)")
        if task.note:
            lines.append(f"  {task.note}")
    return "\n".join(lines)


def _shown_path(path: Path, base: Path) -> str:
    """A run directory as shown: below the target, else below the working directory."""
    for root in (base, Path.cwd()):
        try:
            relative = path.resolve().relative_to(root.resolve())
        except (ValueError, OSError):
            continue
        if str(relative) != ".":
            return str(relative)
    return str(path)


def _seen(worker: WorkerProcess) -> str:
    if worker.alive is None and worker.seen_seconds_ago is not None:
        return f", seen {_duration(worker.seen_seconds_ago)} ago"
    return ""


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"
