"""A job that fits in one worker runs in the driver: no scheduler, no worker processes.

Only a few blocks of a known pure worker on Local compute with no timeout
(`voxblock.compute.runs_in_process`); anything else starts worker processes as
before. The summary line says which.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from funlib.geometry import Roi
from funlib.persistence import open_ds

import voxblock
from voxblock import compute
from voxblock.workers import Worker
from voxblock_testing.volumes import random_raw, read_array

SHAPE = (32, 32, 32)
WORLD = Roi((0, 0, 0), SHAPE)


@pytest.fixture
def raw(tmp_path: Path) -> str:
    return random_raw(f"{tmp_path}/v.zarr/raw", SHAPE, seed=3, chunk_shape=(16, 16, 16))


def threshold_task(raw: str, tmp_path: Path, block: int = 32, **kwargs) -> voxblock.BlockwiseTask:
    write = Roi((0, 0, 0), (block,) * 3)
    options = {"input": raw, "output": f"{tmp_path}/v.zarr/mask", "threshold": 0.5}
    return voxblock.BlockwiseTask("threshold", WORLD, write, write, worker_options=options, **kwargs)


def run(task: voxblock.BlockwiseTask, **kwargs) -> tuple[voxblock.RunReport, str]:
    out = io.StringIO()
    report = voxblock.run_tasks([task], progress=False, out=out, **kwargs)
    return report, out.getvalue()


def worker_records(task: voxblock.BlockwiseTask) -> list[Path]:
    return list((task.run_dir.path / "workers").glob("*.json"))


def test_one_block_of_a_pure_worker_runs_in_the_driver(raw, tmp_path):
    task = threshold_task(raw, tmp_path)
    report, printed = run(task)
    assert report.succeeded and report.tasks[0].in_process
    assert "in this process, no worker processes" in printed.splitlines()[0]
    assert worker_records(task) == []  # no worker process ever started
    np.testing.assert_array_equal(open_ds(f"{tmp_path}/v.zarr/mask")[WORLD], read_array(raw) > 0.5)
    again, printed = run(threshold_task(raw, tmp_path))  # resumed: nothing to do, as before
    assert again.succeeded and "0 blocks processed, 1 already done" in printed


@pytest.mark.parametrize(
    "kwargs, run_kwargs",
    [
        ({"timeout": 60}, {}),  # nothing could stop a block past its timeout in the driver
        ({}, {"serial": False}),  # asked for worker processes
        ({"block": 8}, {}),  # 64 blocks: worth a server and worker processes
    ],
)
def test_anything_else_starts_worker_processes(raw, tmp_path, kwargs, run_kwargs):
    block = kwargs.pop("block", 32)
    task = threshold_task(raw, tmp_path, block=block, **kwargs)
    report, printed = run(task, **run_kwargs)
    assert report.succeeded and not report.tasks[0].in_process
    assert "in this process" not in printed
    assert worker_records(task)


def test_the_environment_can_turn_it_off(raw, tmp_path, monkeypatch):
    monkeypatch.setenv("VOXBLOCK_IN_PROCESS", "0")
    task = threshold_task(raw, tmp_path)
    report, _ = run(task)
    assert report.succeeded and not report.tasks[0].in_process and worker_records(task)


@dataclass
class Unknown(Worker):
    """Not a known pure worker: it might crash, hang, or change the process."""

    name = "unknown"

    def process(self, block) -> None:
        pass


def test_a_worker_not_known_to_be_pure_runs_in_a_worker_process(tmp_path):
    block = Roi((0, 0, 0), (32, 32, 32))
    task = voxblock.BlockwiseTask(Unknown(), WORLD, block, block, run_dir=tmp_path / "run")
    report, _ = run(task)
    assert report.succeeded and not report.tasks[0].in_process and worker_records(task)


def test_several_workers_share_only_blocks_worth_sharing(raw, tmp_path, monkeypatch):
    # 8 blocks of 16^3, 2 workers: in the driver while they read few voxels
    task = threshold_task(raw, tmp_path, block=16, num_workers=2)
    assert compute.runs_in_process([task])
    monkeypatch.setattr(compute, "IN_PROCESS_VOXELS", 8 * 16**3 - 1)
    assert not compute.runs_in_process([task])
    one = threshold_task(raw, tmp_path, block=16, num_workers=1)
    assert compute.runs_in_process([one])  # one worker would do them one by one anyway


def test_the_cli_guesses_from_the_metadata_alone(raw, tmp_path):
    threshold = voxblock.workers.worker_class("threshold")
    local = voxblock.Local()
    assert compute.may_run_in_process(threshold, local, None, raw, "32")
    assert compute.may_run_in_process(threshold, local, None, raw, "16,16,16")  # 8 blocks
    assert not compute.may_run_in_process(threshold, local, None, raw, "8")  # 64 blocks
    assert not compute.may_run_in_process(threshold, local, 60.0, raw, "32")
    assert not compute.may_run_in_process(threshold, voxblock.Slurm(), None, raw, "32")
    assert not compute.may_run_in_process(Unknown, local, None, raw, "32")
    assert not compute.may_run_in_process(threshold, local, None, f"{tmp_path}/nothing.zarr/x", "32")


@dataclass
class FailsOnce(Worker):
    """Fails each block's first attempt (a marker file per block says it was tried)."""

    name = "fails-once"
    marker_dir: str = ""

    def process(self, block) -> None:
        marker = Path(self.marker_dir, str(block.block_id[1]))
        if not marker.exists():
            marker.write_text("tried")
            raise RuntimeError("first attempt fails")


def test_a_failed_block_in_the_driver_is_retried_and_reported(tmp_path, monkeypatch):
    """As in a worker process: recorded, retried up to max_retries, reported, never raised."""
    monkeypatch.setattr(compute, "PURE_WORKERS", compute.PURE_WORKERS | {f"{__name__}.FailsOnce"})
    block = Roi((0, 0, 0), (16, 16, 16))
    (tmp_path / "m1").mkdir()
    task = voxblock.BlockwiseTask(
        FailsOnce(marker_dir=str(tmp_path / "m1")), WORLD, block, block, 1, 1, run_dir=tmp_path / "r1"
    )
    report, printed = run(task)
    assert report.succeeded and report.tasks[0].in_process and report.tasks[0].retried_blocks == 8
    (tmp_path / "m2").mkdir()
    task = voxblock.BlockwiseTask(
        FailsOnce(marker_dir=str(tmp_path / "m2")), WORLD, block, block, 1, 0, run_dir=tmp_path / "r2"
    )
    report, printed = run(task)
    assert not report.succeeded and report.tasks[0].in_process
    assert len(report.tasks[0].failed_blocks) == 8
    assert "last error: RuntimeError: first attempt fails" in printed
    assert "each attempt's error in" in printed and "worker logs" not in printed
    # asked for, a serial run raises instead (debugging)
    (tmp_path / "m3").mkdir()
    task = voxblock.BlockwiseTask(
        FailsOnce(marker_dir=str(tmp_path / "m3")), WORLD, block, block, 1, 0, run_dir=tmp_path / "r3"
    )
    with pytest.raises(RuntimeError, match="first attempt fails"):
        run(task, serial=True)


def test_the_command_reports_and_leaves_at_once(raw, tmp_path):
    """`voxblock run` of one block: in the driver, its summary printed (piped, buffered) before the
    process leaves without finalizing its modules, with the run's exit status."""
    command = [sys.executable, "-m", "voxblock", "run", "threshold", "--input", raw, "--block-size", "32"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        [*command, "--output", f"{tmp_path}/v.zarr/mask", "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "threshold: done - 1 blocks processed" in done.stdout and "in this process" in done.stdout
    chunk = next(p for p in Path(raw).rglob("*") if p.is_file() and p.parent.name != "raw" and "c" in p.parts)
    chunk.write_bytes(b"not a chunk")
    failed = subprocess.run(
        [*command, "--output", f"{tmp_path}/v.zarr/mask2", "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert failed.returncode == 1
    assert "threshold: FAILED" in failed.stdout and "each attempt's error in" in failed.stdout
