"""Fault injection through the real scheduler and real worker processes.

Every test adds its figures (faults injected, runs that survived, blocks
lost) to the session's tally, which `tests/conftest.py` prints and, with
VOXBLOCK_FAULTS_REPORT set, writes for the README. `VOXBLOCK_FAULTS=full`
(what `nox -s faults` sets) injects many more faults than the CI size.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from funlib.geometry import Roi

import voxblock
from voxblock_testing.volumes import random_raw, read_array
from voxblock_testing.workers import Flaky, attempts, block_key, completed_blocks

pytestmark = pytest.mark.faults

FULL = os.environ.get("VOXBLOCK_FAULTS") == "full"
SEEDS = range(15) if FULL else range(2)
TOTAL = Roi((0, 0, 0), (32, 32, 32))
BLOCK = Roi((0, 0, 0), (8, 8, 8))
BLOCKS = [
    Roi((z, y, x), (8, 8, 8)) for z in range(0, 32, 8) for y in range(0, 32, 8) for x in range(0, 32, 8)
]


@pytest.fixture
def source(tmp_path: Path) -> tuple[str, np.ndarray]:
    name = random_raw(f"{tmp_path}/in.zarr/raw", (32, 32, 32), chunk_shape=(8, 8, 8), seed=11)
    return name, read_array(name)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children first."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        children = [p for p, parent in parents.items() if parent == current]
        found.extend(children)
        frontier.extend(children)
    return found


def worker_processes(root: int) -> list[int]:
    pids = []
    for pid in descendants(root):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"daisy._subprocess_worker" in command:
            pids.append(pid)
    return pids


def done_markers(run_dir: Path) -> set[str]:
    """Block keys that daisy has marked done in a run directory."""
    try:
        done = np.asarray(zarr.open_group(str(run_dir / "tracking"), mode="r")["done"][...])
    except Exception:
        return set()
    keys = set()
    for index in zip(*np.nonzero(done)):
        offset = tuple(int(i) * 8 for i in index)
        keys.add(block_key(Roi(offset, (8, 8, 8))))
    return keys


def flaky(tmp_path: Path, source: str, output: str, **options) -> Flaky:
    return Flaky(
        input=source,
        output=output,
        attempts_dir=str(tmp_path / "attempts"),
        done_dir=str(tmp_path / "done"),
        **{"fail_times": 0, **options},
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_workers_killed_at_random_moments(tmp_path, source, fault_tally, seed):
    name, data = source
    worker = flaky(tmp_path, name, f"{tmp_path}/out.zarr/copy", sleep=0.08)
    task = voxblock.BlockwiseTask(worker, TOTAL, BLOCK, BLOCK, 2, 4, max_worker_restarts=50)
    rng = random.Random(seed)
    kills, stop = [], threading.Event()

    def killer() -> None:
        # a kill every 0.8-2 s: longer than a worker takes to start and import
        while not stop.wait(rng.uniform(0.8, 2.0)):
            pids = worker_processes(os.getpid())
            if pids:
                victim = rng.choice(pids)
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills.append(victim)
                except ProcessLookupError:
                    pass

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        report = voxblock.run_tasks([task], progress=False)
    finally:
        stop.set()
        thread.join()
    output = read_array(f"{tmp_path}/out.zarr/copy")
    lost = sum(not np.array_equal(output[_slices(b)], data[_slices(b)]) for b in BLOCKS)
    fault_tally.add(
        "worker killed (SIGKILL mid-run)", injected=len(kills), survived=report.succeeded, lost=lost
    )
    assert kills, "the killer found no worker to kill"
    assert report.succeeded
    assert lost == 0
    np.testing.assert_array_equal(output, data)
    assert done_markers(task.run_dir.path) == {block_key(b) for b in BLOCKS}
    assert set(completed_blocks(tmp_path / "done")) == {block_key(b) for b in BLOCKS}
    # daisy also counts blocks killed before the worker logged its attempt
    retried = sum(n > 1 for n in attempts(tmp_path / "attempts").values())
    assert report.tasks[0].retried_blocks >= retried


DRIVER = """
import sys, voxblock
from funlib.geometry import Roi
from voxblock_testing.workers import Flaky

source, output, tmp, layout = sys.argv[1:5]
worker = Flaky(input=source, output=output, attempts_dir=tmp + "/attempts", done_dir=tmp + "/done",
               fail_times=0, sleep=0.08)
block = Roi((0, 0, 0), (8, 8, 8))
shards = {"shard_shape": (8, 8, 8), "chunk_shape": (4, 4, 4)} if layout == "shards" else {}
ok = voxblock.run_blockwise(worker, Roi((0, 0, 0), (32, 32, 32)), block, block, 2, progress=False, **shards)
sys.exit(0 if ok else 1)
"""


def start(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


@pytest.mark.parametrize("seed", SEEDS)
def test_the_whole_run_killed_at_random_moments_and_restarted(tmp_path, source, fault_tally, seed):
    kill_and_restart(tmp_path, source, fault_tally, seed, "chunks")


@pytest.mark.parametrize("seed", SEEDS[:5])
def test_a_run_writing_shards_killed_at_random_moments_and_restarted(tmp_path, source, fault_tally, seed):
    """A shard file is replaced whole: a killed writer leaves the old shard or the new, never half."""
    kill_and_restart(tmp_path, source, fault_tally, seed, "shards")
    assert zarr.open_array(f"{tmp_path}/out.zarr/copy", mode="r").shards == (8, 8, 8)


def kill_and_restart(
    tmp_path: Path, source: tuple[str, np.ndarray], fault_tally, seed: int, layout: str
) -> None:
    name, data = source
    output = f"{tmp_path}/out.zarr/copy"
    run_dir = tmp_path / "out.zarr.voxblock" / "copy"
    rng = random.Random(seed)
    kills, redone, marked = 0, set(), set()
    for round_ in range(4):
        round_start = time.time()
        process = start(DRIVER, name, output, str(tmp_path), layout)
        if round_ < 3:
            time.sleep(rng.uniform(0.8, 2.5))
        finished = process.poll() is not None
        if not finished and round_ < 3:
            kill_group(process)
            kills += 1
            time.sleep(0.2)
            assert not group_members(process.pid), "processes outlived the killed run"
        else:
            assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-2000:]
        # a block finished in this round must not have been marked done before it
        redone |= set(completed_blocks(tmp_path / "done", since=round_start)) & marked
        marked = done_markers(run_dir)
        if process.returncode == 0:
            break
    result = read_array(output)
    lost = sum(not np.array_equal(result[_slices(b)], data[_slices(b)]) for b in BLOCKS)
    what = "whole run killed (SIGKILL) and restarted" + (", sharded output" if layout == "shards" else "")
    fault_tally.add(what, injected=kills, survived=lost == 0, lost=lost)
    assert kills > 0
    assert not redone, f"blocks redone although marked done: {sorted(redone)}"
    np.testing.assert_array_equal(result, data)
    assert marked == {block_key(b) for b in BLOCKS}


def _slices(roi: Roi) -> tuple[slice, ...]:
    return tuple(slice(b, e) for b, e in zip(roi.begin, roi.end))


SEGMENT_DRIVER = """
import sys, voxblock
from funlib.geometry import Roi

source, output, halo, stitch = sys.argv[1:5]
block = Roi((0, 0, 0), (8, 8, 8))
ok = voxblock.segment_blockwise("threshold-label", (1, 1, 1), Roi((0, 0, 0), (32, 32, 32)), block, block,
                                num_workers=2, input=source, output=output,
                                parameters={"threshold": 0.6, "connectivity": 26}, progress=False,
                                halo=halo == "halo", stitch=stitch)
sys.exit(0 if ok else 1)
"""


@pytest.mark.parametrize("stitch", ["context", "faces"])
@pytest.mark.parametrize("phase", ["fragments", "solve", "relabel"])
def test_segment_blockwise_killed_in_each_pass(tmp_path, source, fault_tally, phase, stitch):
    name, _ = source
    # the clean run reads whole chunks; the killed one keeps and reads chunk face slabs (halo)
    clean = start(SEGMENT_DRIVER, name, f"{tmp_path}/clean.zarr/seg", "no-halo", stitch)
    assert clean.wait(timeout=300) == 0, clean.stderr.read().decode()[-2000:]
    expected = read_array(f"{tmp_path}/clean.zarr/seg")

    output = f"{tmp_path}/out.zarr/seg"
    run_dir = tmp_path / "out.zarr.voxblock" / "seg"
    process = start(SEGMENT_DRIVER, name, output, "halo", stitch)
    # kill as soon as the pass has taken its lock (the pass is running)
    lock = run_dir / phase / "lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    injected = process.poll() is None
    if injected:
        if phase != "solve":
            time.sleep(0.5)  # let some blocks finish
        kill_group(process)
    again = start(SEGMENT_DRIVER, name, output, "halo", stitch)
    assert again.wait(timeout=300) == 0, again.stderr.read().decode()[-2000:]
    if stitch == "context":
        assert any((run_dir / "fragments" / "halo").rglob("*.bin")), "the halo was not used"
    else:  # blocks labelled alone: no context to read, and no fragments stored
        assert not (tmp_path / "out.zarr" / "seg_fragments").exists()
    result = read_array(output)
    same = np.array_equal(result, expected)
    fault_tally.add(
        "segment_blockwise killed in one of its passes",
        injected=int(injected),
        survived=same,
        lost=0 if same else len(BLOCKS),
    )
    assert injected, f"the {phase} pass ended before it could be killed"
    np.testing.assert_array_equal(result, expected)


def test_a_hung_block_is_killed_and_retried(tmp_path, source, fault_tally):
    name, data = source
    worker = flaky(
        tmp_path, name, f"{tmp_path}/out.zarr/copy", mode="hang", fail_at=[4, 12, 20], fail_times=1
    )
    report = voxblock.run_tasks(
        [voxblock.BlockwiseTask(worker, TOTAL, BLOCK, BLOCK, 2, 2, 2)], progress=False
    )
    output = read_array(f"{tmp_path}/out.zarr/copy")
    lost = sum(not np.array_equal(output[_slices(b)], data[_slices(b)]) for b in BLOCKS)
    fault_tally.add("block hung past its timeout", injected=1, survived=report.succeeded, lost=lost)
    assert report.succeeded and report.tasks[0].timeouts == 1
    np.testing.assert_array_equal(output, data)


def test_a_half_written_block_is_not_marked_done_and_is_rewritten(tmp_path, source, fault_tally):
    name, data = source
    worker = flaky(
        tmp_path,
        name,
        f"{tmp_path}/out.zarr/copy",
        mode="kill",
        half_write=True,
        fail_at=[9, 9, 9],
        fail_times=1,
    )
    first = voxblock.run_tasks([voxblock.BlockwiseTask(worker, TOTAL, BLOCK, BLOCK, 2, 0)], progress=False)
    torn = Roi((8, 8, 8), (8, 8, 8))
    assert not first.succeeded
    assert [f.write_roi["offset"] for f in first.tasks[0].failed_blocks] == [[8, 8, 8]]
    run_dir = tmp_path / "out.zarr.voxblock" / "copy"
    assert block_key(torn) not in done_markers(run_dir)
    half = read_array(f"{tmp_path}/out.zarr/copy")[8:12, 8:16, 8:16]
    assert np.allclose(half, data[8:12, 8:16, 8:16] + 1000)  # the torn write is there
    second = voxblock.run_tasks([voxblock.BlockwiseTask(worker, TOTAL, BLOCK, BLOCK, 2, 0)], progress=False)
    output = read_array(f"{tmp_path}/out.zarr/copy")
    lost = sum(not np.array_equal(output[_slices(b)], data[_slices(b)]) for b in BLOCKS)
    fault_tally.add("worker killed while writing a block", injected=1, survived=second.succeeded, lost=lost)
    assert second.succeeded and second.tasks[0].processed == 1 and second.tasks[0].skipped == len(BLOCKS) - 1
    np.testing.assert_array_equal(output, data)


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 96 KiB tmpfs: room for the output's metadata and a few chunks only."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        message = f"cannot mount a tmpfs here: {result.stderr.decode().strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_the_blocks_it_hits_with_a_clear_error(tmp_path, source, tiny_disk, fault_tally):
    name, data = source
    output = f"{tiny_disk}/out.zarr/copy"
    worker = flaky(tmp_path, name, output)
    task = voxblock.BlockwiseTask(worker, TOTAL, BLOCK, BLOCK, 2, 1, run_dir=tmp_path / "run")
    report = voxblock.run_tasks([task], progress=False)
    failed = report.tasks[0].failed_blocks
    written = read_array(output)
    done = done_markers(tmp_path / "run")
    wrong_but_marked = [
        b
        for b in BLOCKS
        if block_key(b) in done and not np.array_equal(written[_slices(b)], data[_slices(b)])
    ]
    fault_tally.add(
        "disk full while writing",
        injected=1,
        survived=bool(failed) and not wrong_but_marked,
        lost=len(wrong_but_marked),
    )
    assert not report.succeeded and failed
    assert all("No space left on device" in f.error and "out.zarr/copy" in f.error for f in failed)
    assert all("chunks" in f.error for f in failed)
    assert not wrong_but_marked
    assert len(done) + len(failed) + report.tasks[0].orphaned == len(BLOCKS)


def test_a_read_only_output_location_is_refused_before_any_block(tmp_path, source, tiny_disk, fault_tally):
    name, _ = source
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    with pytest.raises(voxblock.VoxblockError, match=r"not writable|cannot be created|Read-only"):
        voxblock.run_blockwise(
            flaky(tmp_path, name, f"{tiny_disk}/out.zarr/copy"), TOTAL, BLOCK, BLOCK, 2, progress=False
        )
    fault_tally.add("output location read-only", injected=1, survived=True, lost=0)


def test_a_corrupt_input_chunk_fails_only_its_block_and_names_it(tmp_path, source, fault_tally):
    name, data = source
    chunk = Path(f"{tmp_path}/in.zarr/raw/c/1/2/3")
    assert chunk.exists()
    chunk.write_bytes(b"this is not a zstd frame" * 10)
    report = voxblock.run_tasks(
        [
            voxblock.BlockwiseTask(
                flaky(tmp_path, name, f"{tmp_path}/out.zarr/copy"), TOTAL, BLOCK, BLOCK, 2, 1
            )
        ],
        progress=False,
    )
    failed = report.tasks[0].failed_blocks
    output = read_array(f"{tmp_path}/out.zarr/copy")
    others = [b for b in BLOCKS if tuple(b.offset) != (8, 16, 24)]
    lost = sum(not np.array_equal(output[_slices(b)], data[_slices(b)]) for b in others)
    fault_tally.add("corrupt input chunk", injected=1, survived=len(failed) == 1 and lost == 0, lost=lost)
    assert [f.write_roi["offset"] for f in failed] == [[8, 16, 24]]
    assert "in.zarr/raw" in failed[0].error and "chunks 1-1, 2-2, 3-3" in failed[0].error
    assert failed[0].attempts == 2
    assert lost == 0
