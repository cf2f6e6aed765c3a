"""Reusable property checks for blockwise runs, for voxblock's tests and other projects'.

Each check runs real workers through the real scheduler and asserts (plain
`assert`, so pytest shows the values). The `run` argument is how a run is
started: a callable

    run(worker, total_roi, read_roi, write_roi, **task_options) -> RunReport | bool | Any

that runs `worker` blockwise with the task options it is given (`fit`,
`num_workers`, `max_retries`, `timeout`, `run_dir`, `fresh`, ...), e.g. a
project's own wrapper around `voxblock.run_blockwise`. The checks read
the outcome from `<run_dir>/report.json`, which every voxblock run writes,
so a `run` that returns only a bool works too. The default is `run_task`.

- `check_blocks(blocking, blocks)`: the pure geometric properties of a
  list of (read ROI, write ROI) pairs under a fit mode.
- `check_fit_mode(blocking, workdir)`: the blocks the scheduler hands out
  (seen by the `Recorder`) are exactly `blocking.blocks()`, each once.
- `check_retries(workdir, fail_times, max_retries)`: a block failing k
  times succeeds iff k <= max_retries; the report names it otherwise.
- `check_resume(workdir)`: a rerun finishes a failed run without redoing
  done blocks; `fresh=True` redoes all.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from funlib.geometry import Coordinate, Roi

from voxblock import Blocking, BlockwiseTask, RunReport, Worker, run_tasks
from voxblock_testing.strategies import BlockingCase
from voxblock_testing.volumes import random_raw, read_array
from voxblock_testing.workers import Flaky, Recorder, attempts_of, read_records, record_rois

RunFunction = Callable[..., Any]

__all__ = [
    "RunFunction",
    "check_blocks",
    "check_fit_mode",
    "check_resume",
    "check_retries",
    "load_report",
    "run_task",
]


def run_task(worker: Worker, total_roi: Roi, read_roi: Roi, write_roi: Roi, **options: Any) -> RunReport:
    """The default `run`: one `BlockwiseTask` through `voxblock.run_tasks`, summary kept quiet."""
    task = BlockwiseTask(worker, total_roi, read_roi, write_roi, **options)
    return run_tasks([task], progress=False, out=io.StringIO())


def load_report(run_dir: str | Path) -> dict[str, Any]:
    """The task report a run left in `run_dir/report.json` (see `voxblock.run.TaskReport`)."""
    path = Path(run_dir) / "report.json"
    assert path.exists(), f"the run left no report in {path}"
    return json.loads(path.read_text())


def _run(run: RunFunction, worker: Worker, blocking: Blocking, run_dir: Path, **options: Any) -> dict:
    (Path(run_dir) / "report.json").unlink(missing_ok=True)
    result = run(
        worker,
        blocking.total_roi,
        blocking.read_roi,
        blocking.write_roi,
        fit=blocking.fit,
        run_dir=str(run_dir),
        **options,
    )
    report = load_report(run_dir)
    succeeded = (
        report["processed"] + report["skipped"] == report["total_blocks"]
        and not report["failed_blocks"]
        and report["abandoned"] is None
    )
    if isinstance(result, bool):
        assert result == succeeded, f"run returned {result} but its report says succeeded={succeeded}"
    elif isinstance(result, RunReport):
        assert result.succeeded == succeeded
    report["succeeded"] = succeeded
    return report


def _key(roi: Roi) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(int(v) for v in roi.offset), tuple(int(v) for v in roi.shape)


def _volume(roi: Roi) -> int:
    return 0 if roi.empty else int(np.prod(roi.shape))


def _as_blocking(blocking: Blocking | BlockingCase) -> Blocking:
    return blocking.blocking if isinstance(blocking, BlockingCase) else blocking


# -- pure geometry --------------------------------------------------------------------------------


def check_blocks(blocking: Blocking | BlockingCase, blocks: Sequence[tuple[Roi, Roi]]) -> None:
    """Assert the fit-mode properties of `blocks` (read ROI, write ROI pairs) for `blocking`.

    All modes: every read ROI contains its write ROI, write ROIs are
    pairwise disjoint, non-empty, start on the write-block grid anchored at
    the target region, and meet the target region. `valid`: every read ROI
    lies inside the total ROI and blocks keep their full shape. `overhang`:
    blocks keep their full shape and the write ROIs cover the target
    region. `shrink`: read ROIs are clipped into the total ROI, write ROIs
    into the target region, every write ROI is its read ROI less the
    context, and the write ROIs cover the target region.
    """
    blocking = _as_blocking(blocking)
    total, target, fit = blocking.total_roi, blocking.target_roi, blocking.fit
    below, above = blocking.context
    stride = blocking.write_roi.shape
    keys = [(_key(r), _key(w)) for r, w in blocks]
    assert len(set(keys)) == len(keys), f"a block appears more than once: {sorted(keys)}"
    writes = [w for _, w in blocks]
    for i, a in enumerate(writes):
        for b in writes[i + 1 :]:
            assert not a.intersects(b), f"write ROIs {a} and {b} overlap"
    for read, write in blocks:
        assert not write.empty, f"empty write ROI {write}"
        assert read.contains(write), f"read ROI {read} does not contain write ROI {write}"
        assert write.intersects(target), f"write ROI {write} misses the target region {target}"
        offset = write.begin - target.begin
        assert all(o % s == 0 for o, s in zip(offset, stride)), (
            f"write ROI {write} is off the block grid (origin {target.begin}, stride {stride})"
        )
        if fit in ("valid", "overhang"):
            assert read.shape == blocking.read_roi.shape and write.shape == stride, (
                f"fit={fit}: block {read} / {write} does not have the configured shape"
            )
            assert write.begin - read.begin == below, f"fit={fit}: block {read} / {write} moved its context"
        if fit == "valid":
            assert total.contains(read), f"fit=valid: read ROI {read} leaves the total ROI {total}"
        if fit == "shrink":
            assert total.contains(read), f"fit=shrink: read ROI {read} leaves the total ROI {total}"
            assert target.contains(write), f"fit=shrink: write ROI {write} leaves the target {target}"
            assert read.grow(-below, -above) == write, (
                f"fit=shrink: write ROI {write} is not read ROI {read} less the context {below}/{above}"
            )
    if fit in ("overhang", "shrink"):
        covered = sum(_volume(w.intersect(target)) for w in writes)  # disjoint, so sums are unions
        assert covered == _volume(target), (
            f"fit={fit}: the write ROIs cover {covered} of the {_volume(target)} units of the target {target}"
        )


# -- through the scheduler ------------------------------------------------------------------------


def check_fit_mode(
    blocking: Blocking | BlockingCase,
    workdir: str | Path,
    *,
    num_workers: int = 2,
    run: RunFunction = run_task,
    make_worker: Callable[[Path], Worker] | None = None,
) -> list[tuple[Roi, Roi]]:
    """Run a `Recorder` through the real scheduler: the blocks it is handed are
    exactly `blocking.blocks()` (each once), and they have the fit mode's
    properties (`check_blocks`). Returns the recorded blocks.

    `make_worker(records_dir)` may supply another worker that writes
    `Recorder`-style records into `records_dir`.
    """
    blocking = _as_blocking(blocking)
    workdir = Path(workdir)
    records_dir = workdir / "records"
    worker = make_worker(records_dir) if make_worker is not None else Recorder(directory=str(records_dir))
    expected = blocking.blocks()
    report = _run(run, worker, blocking, workdir / "run", num_workers=num_workers, max_retries=0)
    assert report["succeeded"], f"the recorder run failed: {report}"
    assert report["total_blocks"] == len(expected), (
        f"the scheduler has {report['total_blocks']} blocks; Blocking.blocks() has {len(expected)}"
    )
    assert report["processed"] == len(expected) and report["skipped"] == 0
    records = read_records(records_dir) if records_dir.exists() else []
    seen = [record_rois(r) for r in records]
    seen_keys = sorted((_key(r), _key(w)) for r, w in seen)
    expected_keys = sorted((_key(r), _key(w)) for r, w in expected)
    assert seen_keys == expected_keys, (
        f"fit={blocking.fit}: the scheduler handed out {len(seen_keys)} blocks that differ from "
        f"Blocking.blocks() ({len(expected_keys)}): only seen {sorted(set(seen_keys) - set(expected_keys))}, "
        f"only expected {sorted(set(expected_keys) - set(seen_keys))}"
    )
    check_blocks(blocking, seen)
    if expected:
        assert len({r["pid"] for r in records}) <= num_workers
    return seen


def _flaky_setup(
    workdir: Path, shape: Sequence[int], block: Sequence[int], seed: int
) -> tuple[str, str, Blocking, np.ndarray]:
    source = random_raw(str(workdir / "volume.zarr/raw"), shape, seed=seed, chunk_shape=block)
    total = Roi((0,) * len(shape), tuple(shape))
    block_roi = Roi((0,) * len(shape), tuple(block))
    return source, str(workdir / "volume.zarr/out"), Blocking(total, block_roi, block_roi), read_array(source)


def _failing_block(blocking: Blocking, fail_at: Sequence[int]) -> Roi:
    matches = [w for _, w in blocking.blocks() if w.contains(Coordinate(fail_at))]
    assert len(matches) == 1
    return matches[0]


def check_retries(
    workdir: str | Path,
    fail_times: int,
    max_retries: int,
    *,
    mode: str = "raise",
    timeout: float | None = None,
    num_workers: int = 2,
    shape: Sequence[int] = (32, 32),
    block: Sequence[int] = (16, 16),
    fail_at: Sequence[int] | None = None,
    seed: int = 0,
    run: RunFunction = run_task,
    **options: Any,
) -> dict[str, Any]:
    """A `Flaky` copy fails one block `fail_times` times (by `mode`): the run
    succeeds iff fail_times <= max_retries. On success the output equals the
    input; on failure every other block is written, the failing block is
    not, it was attempted max_retries + 1 times, and the report names its
    ROIs, attempts and error. Returns the task report (a dict).
    """
    workdir = Path(workdir)
    source, output, blocking, data = _flaky_setup(workdir, shape, block, seed)
    if fail_at is None:  # the middle of the second block on every axis that has one
        fail_at = tuple(b + b // 2 if 2 * b <= s else b // 2 for s, b in zip(shape, block))
    failing = _failing_block(blocking, fail_at)
    attempts_dir = workdir / "attempts"
    worker = Flaky(
        input=source,
        output=output,
        attempts_dir=str(attempts_dir),
        fail_times=fail_times,
        fail_at=list(fail_at),
        mode=mode,
    )
    report = _run(
        run,
        worker,
        blocking,
        workdir / "run",
        num_workers=num_workers,
        max_retries=max_retries,
        timeout=timeout,
        **options,
    )
    should_succeed = fail_times <= max_retries
    assert report["succeeded"] == should_succeed, (
        f"a block failing {fail_times} times with max_retries={max_retries}: "
        f"succeeded={report['succeeded']}; report {report}"
    )
    written = read_array(output)
    expected = data.copy()
    for _, write in blocking.blocks():
        tries = attempts_of(attempts_dir, write)
        if write == failing:
            assert tries == min(fail_times, max_retries) + 1, (
                f"the failing block {write} was attempted {tries} times; expected "
                f"{min(fail_times, max_retries) + 1} (fail_times={fail_times}, max_retries={max_retries})"
            )
        else:
            assert tries == 1, f"block {write} was attempted {tries} times"
    if should_succeed:
        assert report["failed_blocks"] == []
        assert report["processed"] == len(blocking.blocks())
    else:
        spatial = tuple(slice(b, e) for b, e in zip(failing.begin, failing.end))
        expected[spatial] = 0
        assert report["processed"] == len(blocking.blocks()) - 1
        assert len(report["failed_blocks"]) == 1, report["failed_blocks"]
        failed = report["failed_blocks"][0]
        assert failed["write_roi"] == {"offset": list(failing.offset), "shape": list(failing.shape)}
        assert failed["read_roi"] == {"offset": list(failing.offset), "shape": list(failing.shape)}
        assert failed["attempts"] == max_retries + 1, failed
        if mode == "raise":
            assert "FlakyFailure" in failed["error"] and "flaky failure" in failed["error"], failed
        else:
            assert failed["error"], failed
    np.testing.assert_array_equal(written, expected)
    if mode == "kill" and fail_times > 0:  # the scheduler saw a worker die (it need not restart it)
        assert "-9" in (report["last_worker_error"] or ""), report
    if mode == "hang" and fail_times > 0:
        assert report["timeouts"] >= 1, report
    return report


def check_resume(
    workdir: str | Path,
    *,
    max_retries: int = 1,
    num_workers: int = 2,
    shape: Sequence[int] = (32, 32),
    block: Sequence[int] = (16, 16),
    seed: int = 0,
    run: RunFunction = run_task,
) -> list[dict[str, Any]]:
    """A run whose one block fails every attempt, rerun unchanged, finishes
    only that block (the others are skipped as done) and the output equals
    the input; a third run with `fresh=True` processes every block again.
    Returns the three task reports.
    """
    workdir = Path(workdir)
    source, output, blocking, data = _flaky_setup(workdir, shape, block, seed)
    blocks = blocking.blocks()
    failing = blocks[-1][1]
    attempts_dir = workdir / "attempts"
    worker = Flaky(
        input=source,
        output=output,
        attempts_dir=str(attempts_dir),
        fail_times=max_retries + 1,  # every attempt of the first run, none of the second
        fail_at=list(failing.begin),
        mode="raise",
    )
    options = {"num_workers": num_workers, "max_retries": max_retries}
    run_dir = workdir / "run"

    first = _run(run, worker, blocking, run_dir, **options)
    assert not first["succeeded"], first
    assert [f["write_roi"]["offset"] for f in first["failed_blocks"]] == [list(failing.offset)]
    assert first["processed"] == len(blocks) - 1

    second = _run(run, worker, blocking, run_dir, **options)
    assert second["succeeded"], second
    assert second["skipped"] == len(blocks) - 1 and second["processed"] == 1, second
    np.testing.assert_array_equal(read_array(output), data)
    for _, write in blocks:
        expected_tries = max_retries + 2 if write == failing else 1
        assert attempts_of(attempts_dir, write) == expected_tries, (write, attempts_of(attempts_dir, write))

    third = _run(run, worker, blocking, run_dir, fresh=True, **options)
    assert third["succeeded"] and third["skipped"] == 0 and third["processed"] == len(blocks), third
    for _, write in blocks:
        expected_tries = max_retries + 3 if write == failing else 2
        assert attempts_of(attempts_dir, write) == expected_tries
    np.testing.assert_array_equal(read_array(output), data)
    return [first, second, third]
