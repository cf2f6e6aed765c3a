"""Resuming: a run killed partway, restarted, skips the blocks it finished and
ends with the output of an uninterrupted run; `fresh=True` starts over; a run
with other options on the same output is refused unless `overwrite=True`."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from funlib.geometry import Roi

import voxblock
from voxblock_testing.properties import check_resume, run_task
from voxblock_testing.volumes import random_raw, read_array
from voxblock_testing.workers import Flaky, attempts

TOTAL = Roi((0, 0), (64, 64))
BLOCK = Roi((0, 0), (16, 16))
NUM_BLOCKS = 16

# the driver of a run, in its own process (group): SIGKILL-ed by the test
DRIVER = """
import sys
import voxblock
from funlib.geometry import Roi
from voxblock_testing.workers import Flaky

source, output, attempts_dir, sleep = sys.argv[1:5]
worker = Flaky(input=source, output=output, attempts_dir=attempts_dir, fail_times=0, sleep=float(sleep))
block = Roi((0, 0), (16, 16))
ok = voxblock.run_blockwise(worker, Roi((0, 0), (64, 64)), block, block, num_workers=2, progress=False)
sys.exit(0 if ok else 1)
"""


def start_driver(source: str, output: str, attempts_dir: Path, sleep: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, source, output, str(attempts_dir), str(sleep)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_for(condition, limit: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def started_blocks(attempts_dir: Path) -> int:
    return len(attempts(attempts_dir)) if attempts_dir.exists() else 0


def test_a_killed_run_resumes_to_the_output_of_an_uninterrupted_run(tmp_path):
    source = random_raw(str(tmp_path / "v.zarr/raw"), (64, 64), seed=7, chunk_shape=(16, 16))
    output = str(tmp_path / "v.zarr/out")
    attempts_dir = tmp_path / "attempts"

    reference = run_task(
        Flaky(
            input=source,
            output=str(tmp_path / "v.zarr/reference"),
            attempts_dir=str(tmp_path / "a-ref"),
            fail_times=0,
        ),
        TOTAL,
        BLOCK,
        BLOCK,
        num_workers=2,
    )
    assert reference.succeeded

    driver = start_driver(source, output, attempts_dir, sleep=0.3)
    try:
        wait_for(lambda: started_blocks(attempts_dir) >= 7, what="the first blocks")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert driver.returncode == -signal.SIGKILL
    before = started_blocks(attempts_dir)
    assert 7 <= before < NUM_BLOCKS, "the run was not caught partway"

    run_dir = Path(str(tmp_path / "v.zarr") + ".voxblock") / "out"
    lock = json.loads((run_dir / "lock").read_text())
    assert lock["pid"] == driver.pid  # the dead driver still holds the lock...

    worker = Flaky(input=source, output=output, attempts_dir=str(attempts_dir), fail_times=0, sleep=0.3)
    report = run_task(worker, TOTAL, BLOCK, BLOCK, num_workers=2)  # ...which the restart takes over
    (task,) = report.tasks
    assert report.succeeded, report.summary()
    assert task.run_dir == str(run_dir)
    assert task.skipped > 0 and task.processed + task.skipped == NUM_BLOCKS
    assert not (run_dir / "lock").exists()
    # blocks finished before the kill ran once; the restart ran only the rest
    tries = attempts(attempts_dir)
    assert len(tries) == NUM_BLOCKS
    assert sum(1 for n in tries.values() if n == 1) >= task.skipped
    assert sum(tries.values()) <= NUM_BLOCKS + 2  # only the 2 blocks in flight at the kill ran twice
    np.testing.assert_array_equal(read_array(output), read_array(str(tmp_path / "v.zarr/reference")))
    np.testing.assert_array_equal(read_array(output), read_array(source))

    # fresh=True forgets what was done
    again = run_task(worker, TOTAL, BLOCK, BLOCK, num_workers=2, fresh=True)
    assert again.succeeded and again.tasks[0].skipped == 0 and again.tasks[0].processed == NUM_BLOCKS
    np.testing.assert_array_equal(read_array(output), read_array(source))


def test_rerun_of_a_failed_run_and_fresh(tmp_path):
    first, second, third = check_resume(tmp_path, max_retries=1)
    assert (first["processed"], second["processed"], third["processed"]) == (3, 1, 4)
    assert second["skipped"] == 3 and third["skipped"] == 0


def run_scale(source: str, output: str, factor: float, **options):
    task = voxblock.BlockwiseTask(
        "scale",
        Roi((0, 0), (32, 32)),
        BLOCK,
        BLOCK,
        num_workers=2,
        input=source,
        output=output,
        factor=factor,
        **options,
    )
    return voxblock.run_tasks([task], progress=False, out=io.StringIO())


def test_other_options_on_the_same_output_are_refused_unless_overwrite(tmp_path):
    source = random_raw(str(tmp_path / "v.zarr/raw"), (32, 32), seed=2, chunk_shape=(16, 16))
    output = str(tmp_path / "v.zarr/out")

    def run(factor: float, **options):
        return run_scale(source, output, factor, **options)

    assert run(2.0).succeeded
    before = {str(p): p.read_bytes() if p.is_file() else None for p in sorted(tmp_path.rglob("*"))}
    with pytest.raises(voxblock.VoxblockError, match="refusing to overwrite"):
        run(3.0)
    # nothing changed: not the output, not the run directory (task record, done markers, lock)
    assert {str(p): p.read_bytes() if p.is_file() else None for p in sorted(tmp_path.rglob("*"))} == before
    # the refused run did not disturb the first run's record: a rerun still resumes
    rerun = run(2.0)
    assert rerun.tasks[0].skipped == 4 and rerun.tasks[0].processed == 0

    replaced = run(3.0, overwrite=True)
    assert replaced.succeeded and replaced.tasks[0].processed == 4 and replaced.tasks[0].skipped == 0
    np.testing.assert_allclose(read_array(output), 3.0 * read_array(source))
    # and now the factor-3 task owns the output: factor 2 is refused in turn
    with pytest.raises(voxblock.VoxblockError, match="refusing to overwrite"):
        run(2.0)


# takes and releases one run directory's lock as fast as it can, until SIGKILL-ed
LOCKER = """
import sys
from pathlib import Path
from voxblock.rundir import RunDirectory

run_dir = RunDirectory(Path(sys.argv[1]))
print("ready", flush=True)
while True:
    run_dir.acquire_lock("a stress test")
    run_dir.release_lock()
"""


def test_a_run_killed_while_taking_its_lock_never_blocks_the_next_run(tmp_path):
    """SIGKILL at any moment of acquire/release leaves no lock, or one naming a dead process:
    never an empty one, which no later run could tell from a live run's."""
    from voxblock.rundir import RunDirectory

    run_dir = RunDirectory(tmp_path / "run")
    rng = np.random.default_rng(0)
    for _ in range(40):
        locker = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(run_dir.path)], stdout=subprocess.PIPE, text=True
        )
        assert locker.stdout is not None and locker.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.0, 0.02)))
        locker.kill()
        locker.wait()
        if run_dir.lock_file.exists():
            assert run_dir.lock_holder() is not None, "an empty or torn lock file"
        run_dir.acquire_lock("the next run")  # the dead holder's lock is stale: taken over
        run_dir.release_lock()
        assert not run_dir.lock_file.exists()
    assert sorted(path.name for path in run_dir.path.iterdir()) == []  # no private files left
