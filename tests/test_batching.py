"""Batching (`batch=k`): the scheduler hands out one block per k^d blocks, and each is run as
the blocks the unbatched run would have handed out inside it, so the output is the same."""

from __future__ import annotations

import functools
import io
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import daisy.v2 as daisy
import numpy as np
import pytest
import zarr
from funlib.geometry import Roi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import voxblock
from voxblock import Blocking, RunReport, VoxblockError
from voxblock.geometry import FITS, Batching, check_batch
from voxblock.status import task_status
from voxblock_testing.properties import check_fit_mode, load_report, run_task
from voxblock_testing.strategies import blockings
from voxblock_testing.volumes import random_raw, read_array, write_array
from voxblock_testing.workers import Flaky, Recorder, attempts, block_key, read_records, record_rois


def scheduler_blocks(blocking: Blocking) -> list[tuple[int, tuple, tuple]]:
    """(id, read ROI, write ROI) of every block daisy's scheduler hands out for `blocking`."""
    task = daisy.Task(
        "t",
        blocking.total_roi,
        blocking.read_roi,
        blocking.write_roi,
        process_function=lambda block: None,
        fit=blocking.fit,
        read_write_conflict=False,
    )
    scheduler = daisy.Scheduler(task)
    handed = []
    while (block := scheduler.acquire_block("t")) is not None:
        handed.append((int(block.block_id[1]), _key(block.read_roi), _key(block.write_roi)))
        block.status = daisy.BlockStatus.SUCCESS
        scheduler.release_block(block)
    return handed


def _key(roi) -> tuple:
    return tuple(int(v) for v in roi.offset), tuple(int(v) for v in roi.shape)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=blockings(max_blocks=7), k=st.integers(1, 3), data=st.data())
def test_batches_expand_to_exactly_the_unbatched_blocks(case, k, data):
    blocking = case.blocking
    batch = check_batch(
        data.draw(st.one_of(st.just(k), st.tuples(*[st.integers(1, 3)] * blocking.total_roi.dims))),
        blocking.total_roi.dims,
    )
    batching = Batching(blocking, batch)
    scheduled = batching.scheduled
    batches = scheduler_blocks(scheduled)
    assert len(batches) == batching.num_batches
    expanded = []
    for _, _, (offset, shape) in batches:
        inside = batching.blocks_in(Roi(offset, shape))
        assert inside, f"batch {offset}/{shape} holds no block"
        expanded += [(b.block_id, _key(b.read_roi), _key(b.write_roi)) for b in inside]
    unbatched = scheduler_blocks(blocking)
    assert len(expanded) == len(set(expanded)) == blocking.num_blocks
    assert sorted(expanded) == sorted(unbatched)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=blockings(max_blocks=6, max_context_voxels=5, max_write_voxels=2), k=st.integers(2, 3))
def test_done_blocks_count_the_blocks_of_the_batches_daisy_marked_done(case, k, tmp_path_factory):
    """daisy's done markers are per batch, in cells offset by the context: the count weighs each
    marked batch by its blocks. Odd batches fail, so some are marked and some not."""
    batching = Batching(case.blocking, check_batch(k, case.blocking.total_roi.dims))
    scheduled = batching.scheduled
    tracking = tmp_path_factory.mktemp("tracking")
    done: list[int] = []

    def process(block) -> None:
        if block.block_id[1] % 2:
            block.status = daisy.BlockStatus.FAILED
            return
        done.append(len(batching.blocks_in(block.write_roi)))

    task = daisy.Task(
        "t",
        scheduled.total_roi,
        scheduled.read_roi,
        scheduled.write_roi,
        process_function=process,
        fit=scheduled.fit,
        read_write_conflict=False,
        max_retries=0,
        tracking_path=str(tracking),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        daisy.run_blockwise(daisy.Pipeline([task], []), multiprocessing=False, progress=False, summary=False)
    store = zarr.open_group(str(tracking), mode="r") if (tracking / "zarr.json").exists() else None
    markers = (
        np.asarray(store["done"][...]) if store is not None else np.zeros((1,) * scheduled.total_roi.dims)
    )
    assert batching.done_blocks(markers) == sum(done)


# -- through the scheduler and worker processes ---------------------------------------------------

# 2-D, context 2 below / 1 above, partial last blocks on both axes (tests/test_fit_modes.py)
PARTIAL = (Roi((-2, 0), (16, 12)), Roi((0, 0), (7, 7)), Roi((2, 2), (4, 4)))


@pytest.mark.parametrize("batch", [2, 3, (1, 2)])
@pytest.mark.parametrize("fit", FITS)
def test_workers_are_handed_exactly_the_unbatched_blocks(fit, batch, tmp_path):
    """Real worker processes see each block the unbatched run hands out once, with its ROIs and
    its id; the report counts blocks, not batches."""
    blocking = Blocking(*PARTIAL, fit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fit='valid' leaves part of the region unwritten
        seen = check_fit_mode(blocking, tmp_path, num_workers=2, run=functools.partial(run_task, batch=batch))
    assert len(seen) == blocking.num_blocks
    ids = sorted(
        (r["block_id"], _key(r0), _key(w0))
        for r in read_records(tmp_path / "records")
        for r0, w0 in [record_rois(r)]
    )
    assert ids == sorted(scheduler_blocks(blocking))
    report = load_report(tmp_path / "run")
    batches = Batching(blocking, check_batch(batch, 2))
    assert report["batches"] == batches.num_batches < blocking.num_blocks
    assert report["batch"] == list(batches.batch)


def watershed_input(tmp_path: Path) -> str:
    rng = np.random.default_rng(4)
    affs = rng.uniform(0, 1, (3, 18, 14, 16)).astype(np.float32)
    return write_array(
        f"{tmp_path}/v.zarr/affs",
        affs,
        voxel_size=(2, 1, 1),
        offset=(4, -2, 0),
        channel_dims=1,
        attrs={"offsets": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]},
    )


def run_watershed(source: str, output: str, fit: str, serial: bool = False, **options) -> RunReport:
    """Mutex watershed (context 1 voxel a side, fragment ids from the block's id) over the input
    less 1 voxel, in blocks of 4x3x5 voxels that leave partial blocks at the end."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fit='valid' leaves part of the region unwritten
        task = voxblock.BlockwiseTask(
            "watershed",
            Roi((6, -1, 1), (32, 12, 14)),
            Roi((4, -2, 0), (12, 5, 7)),
            Roi((6, -1, 1), (8, 3, 5)),
            fit=fit,
            input=source,
            output=output,
            bias=-0.4,
            num_workers=2,
            **options,
        )
        return voxblock.run_tasks([task], progress=False, out=io.StringIO(), serial=serial)


@pytest.mark.parametrize("fit", FITS)
def test_a_batched_run_writes_what_an_unbatched_run_writes(fit, tmp_path):
    source = watershed_input(tmp_path)
    reference = run_watershed(source, f"{tmp_path}/v.zarr/one", fit, serial=False)
    assert reference.succeeded, reference.summary()
    expected = read_array(f"{tmp_path}/v.zarr/one")
    assert expected.any()
    for batch, serial in ((2, False), (3, False), ((1, 2, 3), True)):
        name = f"{tmp_path}/v.zarr/batch{batch}{serial}"
        report = run_watershed(source, name, fit, batch=batch, serial=serial)
        (task,) = report.tasks
        assert report.succeeded, report.summary()
        assert task.processed == task.total_blocks == reference.tasks[0].total_blocks
        assert task.batches < task.total_blocks
        np.testing.assert_array_equal(read_array(name), expected)


def test_a_failing_block_fails_its_batch_and_is_reported_by_its_own_roi(tmp_path):
    """One block of 16 fails every attempt: its batch of 2x2 is retried, then failed; the report
    names that block, not the batch. The rerun does that batch only and ends as the input."""
    data = np.random.default_rng(2).integers(0, 200, (64, 64)).astype(np.uint8)
    source = write_array(f"{tmp_path}/v.zarr/raw", data, chunk_shape=(16, 16))
    block = Roi((0, 0), (16, 16))
    failing = Roi((16, 48), (16, 16))  # the second block of the batch at (0, 32)

    def worker(fail_times: int) -> Flaky:
        return Flaky(
            input=source,
            output=f"{tmp_path}/v.zarr/out",
            attempts_dir=str(tmp_path / "attempts"),
            fail_times=fail_times,
            fail_at=list(failing.begin),
        )

    first = run_task(worker(2), Roi((0, 0), (64, 64)), block, block, batch=2, max_retries=1, num_workers=2)
    (task,) = first.tasks
    assert not first.succeeded
    assert [(f.write_roi["offset"], f.write_roi["shape"], f.attempts) for f in task.failed_blocks] == [
        ([16, 48], [16, 16], 2)
    ]
    assert "write ROI offset=(16, 48) shape=(16, 16): 2 attempt(s)" in first.summary()
    assert "FlakyFailure" in task.failed_blocks[0].error
    assert (task.total_blocks, task.batches, task.processed) == (16, 4, 12)
    tries = attempts(tmp_path / "attempts")
    assert tries[block_key(failing)] == 2
    # the batch's block before the failing one ran at each attempt, the one after it never
    assert tries[block_key(Roi((16, 32), (16, 16)))] == 2
    assert block_key(Roi((0, 48), (16, 16))) in tries

    status = task_status(task.run_dir)
    assert (status.done, status.total) == (12, 16)
    assert [(b.write_roi["offset"], b.attempts) for b in status.failed_blocks] == [([16, 48], 2)]

    second = run_task(worker(2), Roi((0, 0), (64, 64)), block, block, batch=2, max_retries=1, num_workers=2)
    (task,) = second.tasks
    assert second.succeeded, second.summary()
    assert (task.skipped, task.processed) == (12, 4)
    np.testing.assert_array_equal(read_array(f"{tmp_path}/v.zarr/out"), data)
    assert task_status(task.run_dir).done == 16


DRIVER = """
import sys
import voxblock
from funlib.geometry import Roi
from voxblock_testing.workers import Flaky

source, output, attempts_dir = sys.argv[1:4]
worker = Flaky(input=source, output=output, attempts_dir=attempts_dir, fail_times=0, sleep=0.15)
block = Roi((0, 0), (8, 8))
ok = voxblock.run_blockwise(worker, Roi((0, 0), (64, 64)), block, block, 2, batch=2, progress=False)
sys.exit(0 if ok else 1)
"""


def test_a_killed_batched_run_resumes_to_the_same_output(tmp_path):
    data = np.random.default_rng(5).integers(0, 200, (64, 64)).astype(np.uint8)
    source = write_array(f"{tmp_path}/v.zarr/raw", data, chunk_shape=(8, 8))
    output, attempts_dir = f"{tmp_path}/v.zarr/out", tmp_path / "attempts"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, source, output, str(attempts_dir)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run_dir = Path(f"{tmp_path}/v.zarr.voxblock/out")
    try:
        deadline = time.monotonic() + 120
        while (
            voxblock.BlockwiseTask(
                Flaky(input=source, output=output, attempts_dir=str(attempts_dir)),
                Roi((0, 0), (64, 64)),
                Roi((0, 0), (8, 8)),
                Roi((0, 0), (8, 8)),
                batch=2,
            ).done_blocks()
            < 12
        ):
            assert time.monotonic() < deadline, "the batched run did not get going"
            time.sleep(0.05)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert (run_dir / "lock").exists()

    worker = Flaky(input=source, output=output, attempts_dir=str(attempts_dir), fail_times=0, sleep=0.15)
    block = Roi((0, 0), (8, 8))
    report = run_task(worker, Roi((0, 0), (64, 64)), block, block, batch=2, num_workers=2)
    (task,) = report.tasks
    assert report.succeeded, report.summary()
    assert 12 <= task.skipped < 64 and task.skipped % 4 == 0 and task.processed + task.skipped == 64
    np.testing.assert_array_equal(read_array(output), data)
    tries = attempts(attempts_dir)
    assert len(tries) == 64 and sum(1 for n in tries.values() if n == 1) >= task.skipped

    # another batch starts the tracking afresh: said, every block runs again, the same output
    with pytest.warns(UserWarning, match="start afresh"):
        again = run_task(worker, Roi((0, 0), (64, 64)), block, block, batch=4, num_workers=2)
    assert again.succeeded and again.tasks[0].processed == 64 and again.tasks[0].batches == 4
    np.testing.assert_array_equal(read_array(output), data)
    assert run_task(worker, Roi((0, 0), (64, 64)), block, block, batch=4).tasks[0].skipped == 64


def test_the_timeout_is_per_block(tmp_path):
    """daisy's timeout is per batch: the task's per block, times the blocks of a batch."""
    block = Roi((0, 0), (4, 4))
    task = voxblock.BlockwiseTask(
        Recorder(directory=str(tmp_path / "r")),
        Roi((0, 0), (40, 12)),
        block,
        block,
        timeout=2.0,
        batch=(4, 5),
        run_dir=str(tmp_path / "run"),
    )
    task.prepare()
    try:
        daisy_task = task.daisy_task("t")
    finally:
        task.release()
    assert daisy_task.timeout_secs == 2.0 * 4 * 3  # 3 blocks along the second axis
    assert list(daisy_task.write_roi.shape) == [16, 20]


@pytest.mark.bad_input
def test_what_cannot_be_batched_is_refused(tmp_path):
    block = Roi((0, 0, 0), (8, 8, 8))
    worker_file = Path(__file__).parent / "data" / "dacapo_style_worker.py"
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(voxblock.VoxblockError, match="serves daisy's blocks itself"):
        voxblock.BlockwiseTask(
            worker_file,
            Roi((0, 0, 0), (32, 32, 32)),
            block,
            block,
            input_path=str(tmp_path / "v.zarr/raw"),
            output_path=str(tmp_path / "v.zarr/out"),
            fit="shrink",
            batch=2,
        )
    with pytest.raises(voxblock.VoxblockError, match="read_write_conflict"):
        voxblock.BlockwiseTask(
            Recorder(directory=str(tmp_path)),
            Roi((0, 0, 0), (32, 32, 32)),
            block,
            block,
            batch=2,
            read_write_conflict=True,
        )
    for bad in (0, (2, 2), "2", 1.5, True):
        with pytest.raises(voxblock.VoxblockError, match="batch must be"):
            voxblock.BlockwiseTask(
                Recorder(directory=str(tmp_path)), Roi((0, 0, 0), (32, 32, 32)), block, block, batch=bad
            )
    assert sorted(tmp_path.rglob("*")) == before


def voxblock_command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "voxblock", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_the_batch_flag(tmp_path):
    random_raw(f"{tmp_path}/v.zarr/raw", (20, 24, 24), seed=3, voxel_size=(4, 2, 2), chunk_shape=(8, 8, 8))
    outputs = {}
    for batch in ("1", "2"):
        result = voxblock_command(
            "run",
            "scale",
            "--input",
            "v.zarr/raw",
            "--output",
            f"v.zarr/out{batch}",
            "--block-size",
            "8",
            "--context",
            "1,2,0",
            "--factor",
            "3",
            "--workers",
            "2",
            "--no-progress",
            "--batch",
            batch,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        assert "27 blocks processed" in result.stdout
        outputs[batch] = read_array(f"{tmp_path}/v.zarr/out{batch}")
    assert "in 8 batches of 2x2x2" in result.stdout
    np.testing.assert_array_equal(outputs["1"], outputs["2"])
    helped = voxblock_command("run", "scale", "--help", cwd=tmp_path)
    assert "--batch" in helped.stdout and "10^5 blocks" in helped.stdout
    status = voxblock_command("status", "v.zarr/out2", cwd=tmp_path)
    assert status.returncode == 0 and "27" in status.stdout, status.stdout
    plan = voxblock_command(
        "run",
        "scale",
        "--input",
        "v.zarr/raw",
        "--output",
        "v.zarr/out3",
        "--block-size",
        "8",
        "--factor",
        "3",
        "--batch",
        "2",
        "--plan",
        cwd=tmp_path,
    )
    assert plan.returncode == 0, plan.stderr
    assert "handed out in 8 batches of 2x2x2" in plan.stdout
    refused = voxblock_command(
        "run",
        "scale",
        "--input",
        "v.zarr/raw",
        "--output",
        "v.zarr/out4",
        "--block-size",
        "8",
        "--batch",
        "0",
        cwd=tmp_path,
    )
    assert refused.returncode != 0 and "batch" in refused.stderr and "Traceback" not in refused.stderr


def done_in_the_first_half(block) -> bool:
    """A pre-check: blocks of the first half of the first axis are done, and the block at (8, 8)."""
    return block.write_roi.begin[0] < 8 or tuple(block.write_roi.begin) == (8, 8)


def test_a_batch_is_skipped_when_the_pre_check_calls_each_of_its_blocks_done(tmp_path):
    """16 blocks in 4 batches of 2x2: the pre-check sees blocks, not batches; the two batches
    whose blocks are all done are skipped, the one with a single done block runs whole."""
    block = Roi((0, 0), (4, 4))
    report = run_task(
        Recorder(directory=str(tmp_path / "records")),
        Roi((0, 0), (16, 16)),
        block,
        block,
        batch=2,
        num_workers=2,
        check_function=(done_in_the_first_half, None),
        run_dir=str(tmp_path / "run"),
    )
    (task,) = report.tasks
    assert report.succeeded, report.summary()
    assert (task.skipped, task.processed, task.total_blocks, task.batches) == (8, 8, 16, 4)
    ran = sorted(tuple(w.begin) for _, w in map(record_rois, read_records(tmp_path / "records")))
    assert ran == [(x, y) for x in (8, 12) for y in (0, 4, 8, 12)]


def test_segment_blockwise_refuses_batch_before_any_work(tmp_path):
    """Its passes are not batched: batch would be ignored, so it is refused, and nothing is made."""
    source = random_raw(str(tmp_path / "v.zarr/raw"), (32, 32, 32), seed=1, chunk_shape=(8, 8, 8))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    block = Roi((0, 0, 0), (8, 8, 8))
    with pytest.raises(VoxblockError, match="does not batch"):
        voxblock.segment_blockwise(
            "threshold-label", (1, 1, 1), Roi((0, 0, 0), (32, 32, 32)), block, block,
            input=source, output=str(tmp_path / "v.zarr/seg"), batch=2, progress=False,
        )  # fmt: skip
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
