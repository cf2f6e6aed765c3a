"""A job that fits in one worker runs in the driver: no scheduler, no worker processes.

Only a few blocks of a known pure worker on Local compute with no timeout
(`voxblock.compute.runs_in_process`), or a small segmentation with a built-in
function (`segment.pipeline.fits_in_driver`); anything else starts worker
processes as before. The summary line says which.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from funlib.geometry import Roi
from funlib.persistence import open_ds

import voxblock
from voxblock import compute
from voxblock.workers import Worker
from voxblock_testing.volumes import random_raw, read_array, write_array

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


# -- a segmentation that fits in one worker: every pass in the driver ---------------------------------

SEGMENT_SHAPE = (32, 32, 32)
SEGMENT_BLOCK = Roi((0, 0, 0), (8, 8, 8))
PASSES = ("fragments", "solve/all", "relabel")


@pytest.fixture
def blobs(tmp_path: Path) -> str:
    """Blobs across many blocks, some touching only at edges and corners."""
    from scipy import ndimage

    rng = np.random.default_rng(11)
    data = ndimage.gaussian_filter(rng.random(SEGMENT_SHAPE), 1.2).astype(np.float32)
    return write_array(f"{tmp_path}/in.zarr/raw", data, chunk_shape=(8, 8, 8))


def segment(raw: str, output: str, stitch: str = "auto", **kwargs) -> bool:
    world = Roi((0, 0, 0), SEGMENT_SHAPE)
    return voxblock.segment_blockwise(
        "threshold-label",
        (1, 1, 1),
        world,
        SEGMENT_BLOCK,
        SEGMENT_BLOCK,
        num_workers=2,
        input=raw,
        output=output,
        parameters={"threshold": 0.53, "connectivity": 26},
        stitch=stitch,
        progress=False,
        **kwargs,
    )


def pass_reports(output: str) -> dict[str, dict]:
    """Each pass's report.json, less what differs between any two runs (times, where)."""
    container, dataset = output.split(".zarr/")
    root = Path(f"{container}.zarr.voxblock") / dataset
    varies = {"run_dir", "seconds", "in_process", "worker_setup_seconds", "serving_blocks_per_second"}
    reports = {}
    for name in PASSES:
        report = json.loads((root / name / "report.json").read_text())
        reports[name] = {k: v for k, v in report.items() if k not in varies} | {"where": report["in_process"]}
    return reports


@pytest.mark.parametrize("stitch", ["context", "faces"])
def test_a_small_segmentation_runs_in_the_driver_bit_identical_to_worker_processes(
    blobs, tmp_path, monkeypatch, stitch
):
    assert segment(blobs, f"{tmp_path}/a.zarr/seg", stitch)
    monkeypatch.setenv("VOXBLOCK_IN_PROCESS", "0")
    assert segment(blobs, f"{tmp_path}/b.zarr/seg", stitch)
    here, there = read_array(f"{tmp_path}/a.zarr/seg"), read_array(f"{tmp_path}/b.zarr/seg")
    assert here.dtype == there.dtype == np.uint64 and here.max() > 10
    np.testing.assert_array_equal(here, there)  # the same partition and the same IDs
    if stitch == "context":
        np.testing.assert_array_equal(
            read_array(f"{tmp_path}/a.zarr/seg_fragments"), read_array(f"{tmp_path}/b.zarr/seg_fragments")
        )
    in_driver, in_workers = pass_reports(f"{tmp_path}/a.zarr/seg"), pass_reports(f"{tmp_path}/b.zarr/seg")
    assert all(r.pop("where") for r in in_driver.values())
    assert not in_workers["fragments"].pop("where") and not in_workers["relabel"].pop("where")
    in_workers["solve/all"].pop("where")  # one unit: solved in the driver either way
    assert in_driver == in_workers
    assert in_driver["relabel"]["processed"] == 64 and in_driver["relabel"]["failed_blocks"] == []
    # no worker process ever started for a pass run in the driver
    root = tmp_path / "a.zarr.voxblock" / "seg"
    assert not list((root / "fragments" / "workers").glob("*.json"))
    assert not list((root / "relabel" / "workers").glob("*.json"))


def test_a_driver_segmentation_labels_each_block_once(blobs, tmp_path, monkeypatch):
    """At faces, pass 3 takes each block's labels from pass 1 (the function is built in: the same
    labels); a rerun after pass 1 has nothing kept and labels the blocks of pass 3 again."""
    from voxblock.segment import passes

    labelled, seen = passes.own_labels, []
    monkeypatch.setattr(
        passes, "own_labels", lambda *args: seen.append(str(args[2].write_roi)) or labelled(*args)
    )
    assert segment(blobs, f"{tmp_path}/a.zarr/seg", "faces")
    assert len(seen) == len(set(seen)) == 64  # pass 1's blocks, once each
    seen.clear()
    shutil.rmtree(tmp_path / "a.zarr.voxblock" / "seg" / "relabel")
    assert segment(blobs, f"{tmp_path}/a.zarr/seg", "faces")
    assert len(seen) == 64  # pass 1 done already: pass 3 labels every block itself
    assert segment(blobs, f"{tmp_path}/b.zarr/seg", "faces")
    np.testing.assert_array_equal(read_array(f"{tmp_path}/a.zarr/seg"), read_array(f"{tmp_path}/b.zarr/seg"))


def test_what_does_not_fit_in_one_worker_starts_worker_processes(blobs, tmp_path, monkeypatch):
    from voxblock.segment import pipeline

    monkeypatch.setattr(pipeline, "IN_DRIVER_BLOCKS", 63)  # 64 blocks: one too many
    assert segment(blobs, f"{tmp_path}/a.zarr/seg")
    reports = pass_reports(f"{tmp_path}/a.zarr/seg")
    assert not reports["fragments"]["where"] and not reports["relabel"]["where"]
    monkeypatch.undo()
    assert segment(blobs, f"{tmp_path}/b.zarr/seg", timeout=60)  # only a worker process can time out
    assert not pass_reports(f"{tmp_path}/b.zarr/seg")["fragments"]["where"]


def chunk_file(array: str, index: tuple[int, ...]) -> Path:
    """The file of one chunk of an unsharded array (zarr v3 or v2)."""
    path = Path(array)
    for candidate in (path / "c" / Path(*map(str, index)), path / ".".join(map(str, index))):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"chunk {index} of {array}")


def test_a_failing_block_in_a_driver_segmentation_is_retried_and_reported_by_roi(
    blobs, tmp_path, monkeypatch
):
    """An unreadable input chunk fails its block in pass 1 on every attempt: recorded, retried
    (max_retries), reported with its write ROI, the run False, never raised, as in worker
    processes; once the chunk is whole again a rerun does what is left and ends as an
    uninterrupted run."""
    assert segment(blobs, f"{tmp_path}/clean.zarr/seg")
    chunk = chunk_file(blobs, (1, 2, 3))
    whole = chunk.read_bytes()
    chunk.write_bytes(b"not a chunk")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert not segment(blobs, f"{tmp_path}/out.zarr/seg", stitch="faces", max_retries=1)
    printed = out.getvalue()
    assert "in this process, no worker processes" in printed
    assert "write ROI offset=(8, 16, 24) shape=(8, 8, 8): 2 attempt(s), last error: BlockIOError" in printed
    root = tmp_path / "out.zarr.voxblock" / "seg"
    report = json.loads((root / "fragments" / "report.json").read_text())
    (failed,) = report["failed_blocks"]
    assert failed["write_roi"] == {"offset": [8, 16, 24], "shape": [8, 8, 8]} and failed["attempts"] == 2
    # blocks after it (read_write_conflict) are not run, as in worker processes; pass 3 never starts
    assert report["processed"] + report["orphaned"] == 63 and not (root / "relabel").exists()
    monkeypatch.setenv("VOXBLOCK_IN_PROCESS", "0")
    with contextlib.redirect_stdout(io.StringIO()):
        assert not segment(blobs, f"{tmp_path}/workers.zarr/seg", stitch="faces", max_retries=1)
    in_workers = json.loads((tmp_path / "workers.zarr.voxblock/seg/fragments/report.json").read_text())
    assert not in_workers["in_process"]
    same = (
        "total_blocks",
        "processed",
        "skipped",
        "orphaned",
        "failed_blocks",
        "never_run",
        "retried_blocks",
    )
    assert {k: report[k] for k in same} == {k: in_workers[k] for k in same}
    monkeypatch.delenv("VOXBLOCK_IN_PROCESS")
    chunk.write_bytes(whole)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert segment(blobs, f"{tmp_path}/out.zarr/seg", stitch="faces", max_retries=1)
    left = 64 - report["processed"]
    assert f"fragments: done - {left} blocks processed, {64 - left} already done" in out.getvalue()
    np.testing.assert_array_equal(
        read_array(f"{tmp_path}/out.zarr/seg"), read_array(f"{tmp_path}/clean.zarr/seg")
    )


KILLED_DRIVER = """
import sys, time
from funlib.geometry import Roi
import voxblock
from voxblock.segment import passes

# every block of both passes slowed down, so that the driver is killed in the middle of one
labelled, looked_up = passes.own_labels, passes.block_segments
passes.own_labels = lambda *args: (time.sleep(0.03), labelled(*args))[1]
passes.block_segments = lambda *args: (time.sleep(0.03), looked_up(*args))[1]
block = Roi((0, 0, 0), (8, 8, 8))
ok = voxblock.segment_blockwise("threshold-label", (1, 1, 1), Roi((0, 0, 0), (32, 32, 32)), block, block,
                                num_workers=2, input=sys.argv[1], output=sys.argv[2], stitch=sys.argv[3],
                                parameters={"threshold": 0.53, "connectivity": 26}, progress=False)
sys.exit(0 if ok else 1)
"""


@pytest.mark.parametrize("stitch", ["context", "faces"])
@pytest.mark.parametrize("phase", ["fragments", "relabel"])
def test_a_driver_segmentation_killed_in_a_pass_resumes_to_the_same_result(blobs, tmp_path, phase, stitch):
    """SIGKILL in the middle of pass 1 or pass 3 run in the driver (the labels it kept between
    the passes are lost with it), then run again: blocks marked done are not done again, and
    the result is an uninterrupted run's, bit for bit."""
    from voxblock.rundir import RunDirectory

    assert segment(blobs, f"{tmp_path}/clean.zarr/seg", stitch)
    output = f"{tmp_path}/out.zarr/seg"
    run_dir = RunDirectory(tmp_path / "out.zarr.voxblock" / "seg" / phase)
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_DRIVER, blobs, output, stitch], stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while run_dir.done_blocks() < 10 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    running = process.poll() is None
    process.kill()
    process.wait()
    assert running, process.stderr.read().decode()[-2000:] if process.stderr else ""
    done = run_dir.done_blocks()
    assert 10 <= done < 64, f"killed with {done} of 64 blocks of {phase} done"
    assert segment(blobs, output, stitch)
    report = json.loads((run_dir.path / "report.json").read_text())
    assert report["in_process"] and report["skipped"] == done and report["processed"] == 64 - done
    np.testing.assert_array_equal(read_array(output), read_array(f"{tmp_path}/clean.zarr/seg"))
