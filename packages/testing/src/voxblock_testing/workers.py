"""Test-support workers: registered nowhere, importable by every worker process.

- `Recorder` writes one JSON line per block it is given (block id, read and
  write ROI, pid), so a test can compare what the real scheduler handed
  out with what `voxblock.Blocking` says it should.
- `Flaky` copies its input to its output but fails chosen blocks the first
  `fail_times` times they are attempted: by raising, by SIGKILL-ing its own
  process, or by hanging far past the task's timeout. Attempts are counted
  in files, so the count survives killed processes and restarted runs.

Both are plain `voxblock.Worker` dataclasses: pass an instance as the
worker of `voxblock.BlockwiseTask` / `run_blockwise`.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from funlib.geometry import Roi

from voxblock import ArrayWorker, Preparation, Worker, option
from voxblock.errors import VoxblockError
from voxblock.rundir import roi_record

FailMode = Literal["raise", "kill", "hang"]
FAIL_MODES: tuple[str, ...] = ("raise", "kill", "hang")


class FlakyFailure(RuntimeError):
    """What `Flaky` raises in mode "raise"."""


def _append_line(path: Path, line: str) -> None:
    """Append one line with a single write (atomic for short lines on a local disk)."""
    fd = os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def block_key(roi: Roi) -> str:
    """A file-name-safe key of a block: its write ROI."""
    offset = ",".join(str(int(v)) for v in roi.offset)
    shape = ",".join(str(int(v)) for v in roi.shape)
    return f"offset={offset};shape={shape}"


# -- Recorder -------------------------------------------------------------------------------------


@dataclass
class Recorder(Worker):
    """Write one JSON line per processed block into `directory` (one file per process)."""

    name: ClassVar[str] = "recorder"

    directory: str = option("", help="where the per-process .jsonl records go")
    sleep: float = option(0.0, help="seconds to sleep in every block")

    def prepare(self, preparation: Preparation) -> None:
        if not self.directory:
            raise VoxblockError("recorder needs directory=...")
        Path(self.directory).mkdir(parents=True, exist_ok=True)

    def process(self, block: Any) -> None:
        if self.sleep:
            time.sleep(self.sleep)
        record = {
            "block_id": int(block.block_id[1]),
            "task_id": str(block.block_id[0]),
            "read_roi": roi_record(block.read_roi),
            "write_roi": roi_record(block.write_roi),
            "pid": os.getpid(),
            "time": time.time(),
        }
        _append_line(Path(self.directory) / f"{os.getpid()}.jsonl", json.dumps(record))


def read_records(directory: str | Path) -> list[dict[str, Any]]:
    """Every record a `Recorder` wrote into `directory`, in time order."""
    records = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        records.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return sorted(records, key=lambda r: r["time"])


def record_rois(record: dict[str, Any]) -> tuple[Roi, Roi]:
    """(read ROI, write ROI) of one record."""
    read, write = record["read_roi"], record["write_roi"]
    return Roi(read["offset"], read["shape"]), Roi(write["offset"], write["shape"])


def recorded_blocks(directory: str | Path) -> list[tuple[Roi, Roi]]:
    """(read ROI, write ROI) of every block recorded in `directory`, in time order."""
    return [record_rois(r) for r in read_records(directory)]


# -- Flaky ----------------------------------------------------------------------------------------


@dataclass
class Flaky(ArrayWorker):
    """Copy input to output; fail chosen blocks the first `fail_times` attempts.

    `fail_at` is a world coordinate: the block whose write ROI contains it
    fails (None: every block fails). Each attempt of a block appends a line
    to `attempts_dir/<block>.attempts` before anything else happens, so
    `attempts(...)` tells how often each block was tried, across processes
    and runs.
    """

    name: ClassVar[str] = "flaky"

    attempts_dir: str = option("", help="where attempts are counted (one file per block)")
    fail_times: int = option(1, help="fail each chosen block this many times, then succeed")
    fail_at: list[int] | None = option(None, help="world coordinate inside the failing block (None: all)")
    mode: str = option("raise", help="how to fail: raise, kill (SIGKILL itself) or hang")
    hang_seconds: float = option(3600.0, help="how long mode 'hang' sleeps")
    sleep: float = option(0.0, help="seconds to sleep in every block (to be caught mid-run)")
    half_write: bool = option(False, help="in mode kill: write half of the block's output first")
    done_dir: str = option("", help="append one line per block here once its output is written")

    def check_input(self, source: Any) -> None:
        if self.mode not in FAIL_MODES:
            raise VoxblockError(f"flaky: mode must be one of {', '.join(FAIL_MODES)}; got {self.mode!r}")
        if not self.attempts_dir:
            raise VoxblockError("flaky needs attempts_dir=...")
        Path(self.attempts_dir).mkdir(parents=True, exist_ok=True)

    def chosen(self, write_roi: Roi) -> bool:
        if self.fail_at is None:
            return True
        return write_roi.contains(tuple(self.fail_at))

    def compute(self, data: np.ndarray, block: Any) -> np.ndarray:
        path = Path(self.attempts_dir) / f"{block_key(block.write_roi)}.attempts"
        before = count_lines(path)
        _append_line(path, json.dumps({"pid": os.getpid(), "time": time.time()}))
        if self.sleep:
            time.sleep(self.sleep)
        if self.chosen(block.write_roi) and before < self.fail_times:
            if self.mode == "kill":
                if self.half_write:
                    self._write_half(data, block)
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.mode == "hang":
                time.sleep(self.hang_seconds)
            raise FlakyFailure(
                f"flaky failure {before + 1} of {self.fail_times} in block {block.block_id[1]} "
                f"(write ROI {block.write_roi})"
            )
        return data

    def _write_half(self, data: np.ndarray, block: Any) -> None:
        """Write the first half (along the first axis) of the block: a torn write."""
        from voxblock import arrays
        from voxblock.workers import crop_to

        written = crop_to(data, block.read_roi, block.write_roi, self._target.voxel_size)
        half = written.shape[0] // 2 or 1
        voxel = self._target.voxel_size
        roi = Roi(block.write_roi.offset, (half * voxel[0], *block.write_roi.shape[1:]))
        arrays.write(self._target, roi, (written[:half] + 1000).astype(self._target.dtype))

    def process(self, block: Any) -> None:
        super().process(block)
        if self.done_dir:
            Path(self.done_dir).mkdir(parents=True, exist_ok=True)
            _append_line(
                Path(self.done_dir) / f"{os.getpid()}.done",
                json.dumps({"block": block_key(block.write_roi), "time": time.time()}),
            )


def completed_blocks(done_dir: str | Path, since: float = 0.0) -> list[str]:
    """Every completion `Flaky` logged in `done_dir` at or after `since` (block keys, with repeats)."""
    keys = []
    for path in Path(done_dir).glob("*.done"):
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record["time"] >= since:
                    keys.append(record["block"])
    return keys


def count_lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except FileNotFoundError:
        return 0


def attempts(attempts_dir: str | Path) -> dict[str, int]:
    """How often `Flaky` attempted each block: {block key: attempts}."""
    return {
        path.name[: -len(".attempts")]: count_lines(path) for path in Path(attempts_dir).glob("*.attempts")
    }


def attempts_of(attempts_dir: str | Path, write_roi: Roi) -> int:
    """How often `Flaky` attempted the block with this write ROI."""
    return count_lines(Path(attempts_dir) / f"{block_key(write_roi)}.attempts")
