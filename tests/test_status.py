"""`voxblock status`: where a run stands, read from its run directory alone, by another process
while the run goes on (a driver in a subprocess), after it ends, after it failed a block, after
its driver was killed, and for every pass of segment_blockwise."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from funlib.geometry import Roi

import voxblock
from voxblock.cli import main
from voxblock.errors import VoxblockError
from voxblock.status import read_status, render
from voxblock_testing.volumes import random_raw, write_array
from voxblock_testing.workers import Flaky

TOTAL = Roi((0, 0), (64, 64))
BLOCK = Roi((0, 0), (16, 16))
NUM_BLOCKS = 16

# the driver of a run, in its own process group: slow blocks, so the test sees it mid-run
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


@pytest.fixture
def source(tmp_path: Path) -> str:
    return random_raw(str(tmp_path / "v.zarr/raw"), (64, 64), seed=3, chunk_shape=(16, 16))


def start_driver(tmp_path: Path, source: str, output: str, sleep: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, source, output, str(tmp_path / "attempts"), str(sleep)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def status(*args: str) -> str:
    result = CliRunner().invoke(main, ["status", *args])
    assert result.exit_code == 0, result.output
    return result.output


def snapshot(target: str) -> dict:
    return json.loads(status(target, "--json"))


def task_now(target: str):
    """The first task's status, or None before the run has made its run directory."""
    try:
        return read_status(target).tasks[0]
    except VoxblockError:
        return None


def wait_until(condition, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_running_run_is_seen_from_another_process_until_it_ends(tmp_path, source):
    output = str(tmp_path / "v.zarr/out")
    driver = start_driver(tmp_path, source, output, sleep=0.25)
    try:
        # the run has taken its lock and its workers have finished blocks
        wait_until(lambda: (s := task_now(output)) is not None and s.state == "running" and s.done >= 2)
        shown = snapshot(output)
        assert shown["running"] is True
        (task,) = shown["tasks"]
        assert task["state"] == "running"
        assert 2 <= task["done"] < task["total"] == NUM_BLOCKS
        assert task["failed"] == 0
        assert task["driver"]["pid"] == driver.pid and task["driver"]["alive"] is True
        assert task["run_dir"] == str(tmp_path / "v.zarr.voxblock" / "out")
        text = status(output)
        assert "RUNNING" in text and f"/{NUM_BLOCKS} blocks done" in text
        assert f"driver: pid {driver.pid}" in text
        # workers say they are alive once they serve; the rate comes from the driver's record
        wait_until(lambda: sum(w.alive is True for w in read_status(output).tasks[0].workers) == 2, 20)
        wait_until(lambda: read_status(output).tasks[0].blocks_per_second, 20)
        running = read_status(output).tasks[0]
        assert running.blocks_per_second > 0 and running.eta_seconds is not None
        assert "blocks/s, ETA" in render(read_status(output)) or running.state != "running"

        # --watch (seconds after the target) refreshes until the run ends; --json: one line each
        lines = status(output, "--watch", "0.3", "--json").splitlines()
        assert driver.wait(timeout=60) == 0
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    watched = [json.loads(line) for line in lines]
    assert len(watched) >= 2 and watched[0]["running"] and not watched[-1]["running"]
    assert watched[-1]["tasks"][0]["state"] == "finished"

    (task,) = snapshot(output)["tasks"]
    assert task["state"] == "finished"
    assert task["done"] == task["total"] == NUM_BLOCKS
    assert task["driver"] is None and not any(w["alive"] for w in task["workers"])
    text = status(output)
    assert "FINISHED" in text and f"{NUM_BLOCKS}/{NUM_BLOCKS} blocks done" in text and "100.0%" in text
    # the run directory names the same task; so does the directory holding it
    assert status(str(tmp_path / "v.zarr.voxblock" / "out")) == text
    assert snapshot(str(tmp_path / "v.zarr"))["tasks"][0]["done"] == NUM_BLOCKS


def test_a_killed_driver_shows_stopped(tmp_path, source):
    output = str(tmp_path / "v.zarr/out")
    driver = start_driver(tmp_path, source, output, sleep=0.3)
    try:
        wait_until(lambda: (s := task_now(output)) is not None and s.done >= 1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    (task,) = snapshot(output)["tasks"]
    assert task["state"] == "stopped"
    assert 1 <= task["done"] < NUM_BLOCKS
    assert task["driver"]["pid"] == driver.pid and task["driver"]["alive"] is False
    assert task["blocks_per_second"] is None and task["eta_seconds"] is None
    text = status(output)
    assert "STOPPED" in text and "killed" in text and "resume" in text


def test_a_failing_block_is_shown_with_its_roi_and_error(tmp_path, source):
    output = str(tmp_path / "v.zarr/out")
    worker = Flaky(
        input=source, output=output, attempts_dir=str(tmp_path / "attempts"), fail_times=99, fail_at=[20, 40]
    )
    ok = voxblock.run_blockwise(worker, TOTAL, BLOCK, BLOCK, num_workers=2, max_retries=1, progress=False)
    assert not ok
    (task,) = snapshot(output)["tasks"]
    assert task["state"] == "failed"
    assert task["done"] == NUM_BLOCKS - 1 and task["failed"] == 1
    (block,) = task["failed_blocks"]
    assert block["write_roi"] == {"offset": [16, 32], "shape": [16, 16]}
    assert block["attempts"] == 2 and not block["retrying"]
    assert block["error"].startswith("FlakyFailure: flaky failure 2 of 99")
    text = status(output)
    assert "FAILED" in text and "1 failed" in text
    assert "write ROI offset=(16, 32) shape=(16, 16): 2 attempt(s), last error: FlakyFailure" in text


@pytest.mark.parametrize("context", [16, 40])
def test_a_failing_block_with_a_context_of_a_block_or_more_is_shown_once(tmp_path, context):
    """daisy's tracking cells are offset from the block grid by context // write block: a
    failure must be looked up in its own cell, not shown again as a phantom at the next."""
    source = random_raw(str(tmp_path / "v.zarr/raw"), (128, 128), seed=3, chunk_shape=(16, 16))
    output = str(tmp_path / "v.zarr/out")
    failing = [context + 16, context + 32]  # the write ROI offset of the block that fails
    worker = Flaky(
        input=source,
        output=output,
        attempts_dir=str(tmp_path / "attempts"),
        fail_times=99,
        fail_at=[failing[0] + 4, failing[1] + 8],
    )
    read = Roi((-context, -context), (16 + 2 * context, 16 + 2 * context))
    ok = voxblock.run_blockwise(
        worker, Roi((0, 0), (128, 128)), read, BLOCK, num_workers=2, max_retries=1, progress=False
    )
    assert not ok
    (task,) = snapshot(output)["tasks"]
    blocks = ((128 - 2 * context) // 16) ** 2
    assert task["done"] == blocks - 1 and task["failed"] == 1, task
    (block,) = task["failed_blocks"]
    assert block["write_roi"] == {"offset": failing, "shape": [16, 16]}
    assert block["attempts"] == 2


def test_segment_blockwise_shows_each_pass(tmp_path):
    rng = np.random.default_rng(1)
    data = (rng.random((24, 24, 24)) > 0.6).astype(np.float32)
    raw = write_array(f"{tmp_path}/v.zarr/raw", data, voxel_size=(1, 1, 1), chunk_shape=(8, 8, 8))
    world, write = Roi((0, 0, 0), data.shape), Roi((0, 0, 0), (8, 8, 8))
    assert voxblock.segment_blockwise(
        "threshold-label",
        (1, 1, 1),
        world,
        write,
        write,
        num_workers=2,
        input=raw,
        output=f"{tmp_path}/v.zarr/seg",
        parameters={"threshold": 0.5},
        progress=False,
    )
    shown = snapshot(f"{tmp_path}/v.zarr/seg")
    passes = [Path(t["run_dir"]).name for t in shown["tasks"]]
    assert passes[0] == "fragments" and "relabel" in passes and len(passes) >= 2
    assert all(t["state"] == "finished" and t["done"] == t["total"] > 0 for t in shown["tasks"])
    text = status(f"{tmp_path}/v.zarr/seg")
    assert all(f"/{name})" in text for name in passes)


def test_nothing_to_show_is_an_error(tmp_path):
    result = CliRunner().invoke(main, ["status", str(tmp_path / "v.zarr/none")])
    assert result.exit_code != 0 and "no run directory found" in result.output
