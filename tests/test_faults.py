"""Fault injection through the real scheduler and real worker processes.

Every test adds its figures (faults injected, runs that survived, blocks
lost) to the session's tally, which `tests/conftest.py` prints and, with
VOXBLOCK_FAULTS_REPORT set, writes for the README. `VOXBLOCK_FAULTS=full`
(what `nox -s faults` sets) injects many more faults than the CI size.
"""

from __future__ import annotations

import contextlib
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


@pytest.mark.parametrize("where", ["driver", "workers"])
@pytest.mark.parametrize("stitch", ["context", "faces"])
@pytest.mark.parametrize("phase", ["fragments", "solve", "relabel"])
def test_segment_blockwise_killed_in_each_pass(
    tmp_path, source, fault_tally, monkeypatch, phase, stitch, where
):
    """This small segmentation runs in the driver (`fits_in_driver`); "workers" makes it use
    worker processes as a large one does (VOXBLOCK_IN_PROCESS=0)."""
    name, _ = source
    if where == "workers":
        monkeypatch.setenv("VOXBLOCK_IN_PROCESS", "0")
    # the clean run reads whole chunks; the killed one keeps and reads chunk face slabs (halo)
    clean = start(SEGMENT_DRIVER, name, f"{tmp_path}/clean.zarr/seg", "no-halo", stitch)
    assert clean.wait(timeout=300) == 0, clean.stderr.read().decode()[-2000:]
    expected = read_array(f"{tmp_path}/clean.zarr/seg")

    output = f"{tmp_path}/out.zarr/seg"
    run_dir = tmp_path / "out.zarr.voxblock" / "seg"
    process = start(SEGMENT_DRIVER, name, output, "halo", stitch)
    # kill as soon as the pass has taken its lock (the pass is running); a grid of one unit
    # solves in one step (solve/all)
    lock = run_dir / ("solve/all" if phase == "solve" else phase) / "lock"
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


SOLVE_LEVELS = ["up-1", "up-2", "down-2", "down-1", "labels", "export"]


@pytest.mark.parametrize("stitch", ["context", "faces"])
@pytest.mark.parametrize("step", SOLVE_LEVELS)
def test_segment_blockwise_killed_at_each_level_of_the_solve(
    tmp_path, source, fault_tally, monkeypatch, step, stitch
):
    """The driver killed while one step of the hierarchical solve runs (2 x 2 x 2 blocks per
    unit: two levels over the 4 x 4 x 4 blocks, each step a task with two workers), then run
    again: the segmentation of an uninterrupted run of the whole-graph layout (one unit), bit
    for bit: the same partition and the same IDs."""
    name, _ = source
    clean = start(SEGMENT_DRIVER, name, f"{tmp_path}/clean.zarr/seg", "no-halo", stitch)
    assert clean.wait(timeout=300) == 0, clean.stderr.read().decode()[-2000:]
    expected = read_array(f"{tmp_path}/clean.zarr/seg")

    monkeypatch.setenv("VOXBLOCK_SOLVE_FANOUT", "2")
    output = f"{tmp_path}/out.zarr/seg"
    run_dir = tmp_path / "out.zarr.voxblock" / "seg"
    process = start(SEGMENT_DRIVER, name, output, "no-halo", stitch)
    lock = run_dir / "solve" / step / "lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    injected = process.poll() is None
    if injected:
        kill_group(process)
    again = start(SEGMENT_DRIVER, name, output, "no-halo", stitch)
    assert again.wait(timeout=300) == 0, again.stderr.read().decode()[-2000:]
    assert (run_dir / "solve" / "up-2" / "report.json").exists()  # two levels ran
    result = read_array(output)
    same = np.array_equal(result, expected)
    fault_tally.add(
        "segment_blockwise killed at a level of the solve",
        injected=int(injected),
        survived=same,
        lost=0 if same else len(BLOCKS),
    )
    assert injected, f"the solve's {step} step ended before it could be killed"
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


# -- agglomerate_blockwise: faults in each of its passes -------------------------------------------
#
# The standard workers (watershed, rag, relabel) have no fault hook, so faults come from outside:
# a `ChunkGate` puts a named pipe where one input chunk was, and every process that opens the
# chunk blocks in the middle of its block until the test answers it: SIGKILL (a worker killed
# mid-block, provably: it is inside its block's read), bytes that are no chunk (the block raises,
# as on a corrupt chunk) or the real bytes. The reader's pass is told by its standard error, the
# log file in that pass's run directory.

AGG_SHAPE = (96, 128, 128) if FULL else (48, 64, 64)
AGG_BLOCK = (16, 32, 32)
AGG_OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [4, 0, 0], [0, 4, 0], [0, 0, 4]]
AGG_BLOCKS = [
    Roi((z, y, x), AGG_BLOCK)
    for z in range(0, AGG_SHAPE[0], AGG_BLOCK[0])
    for y in range(0, AGG_SHAPE[1], AGG_BLOCK[1])
    for x in range(0, AGG_SHAPE[2], AGG_BLOCK[2])
]
AGG_SEEDS = range(4) if FULL else range(2)


def make_agglomerate_inputs(root: Path) -> dict[str, str]:
    """Noisy affinities of labels (chunks = blocks), and where a run of them puts what."""
    from voxblock_testing.volumes import affinities_from_labels, labels_data, write_array

    labels = labels_data(AGG_SHAPE, num_labels=40, cell=(12, 16, 16), seed=1)
    noise = np.random.default_rng(0).normal(0.1, 0.15, (len(AGG_OFFSETS), *AGG_SHAPE))
    affs = np.clip(affinities_from_labels(labels, AGG_OFFSETS) * 0.8 + noise, 0, 1).astype(np.float32)
    write_array(f"{root}/v.zarr/affs", affs, voxel_size=(1, 1, 1), chunk_shape=AGG_BLOCK, channel_dims=1)
    return {
        "affs": f"{root}/v.zarr/affs",
        "frags": f"{root}/v.zarr/frags",
        "seg": f"{root}/v.zarr/seg",
        "db": f"{root}/rag.sqlite",
    }


def agglomerate(paths: dict[str, str], **options) -> voxblock.AgglomerateReport:
    return voxblock.agglomerate_blockwise(
        paths["affs"],
        paths["frags"],
        paths["seg"],
        paths["db"],
        AGG_BLOCK,
        offsets=AGG_OFFSETS,
        progress=False,
        **options,
    )


def graph_tables(db: str) -> tuple[list[tuple], list[tuple]]:
    """funlib's nodes and edges tables, ordered."""
    import sqlite3

    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        nodes = connection.execute("SELECT * FROM nodes ORDER BY id").fetchall()
        edges = connection.execute("SELECT * FROM edges ORDER BY u, v").fetchall()
    finally:
        connection.close()
    return nodes, edges


@pytest.fixture(scope="module")
def agglomerated(tmp_path_factory) -> dict[str, object]:
    """An uninterrupted run: what every run with faults must end with."""
    root = tmp_path_factory.mktemp("agglomerate_reference")
    paths = make_agglomerate_inputs(root)
    report = agglomerate(paths)
    assert report.fragments == "made" and report.graph.blocks == len(AGG_BLOCKS)
    nodes, edges = graph_tables(paths["db"])
    return {
        "paths": paths,
        "seconds": sum(report.seconds.values()),
        "fragments": read_array(paths["frags"]),
        "segmentation": read_array(paths["seg"]),
        "nodes": nodes,
        "edges": edges,
    }


def lost_blocks(result: np.ndarray, expected: np.ndarray) -> int:
    return sum(not np.array_equal(result[_slices(b)], expected[_slices(b)]) for b in AGG_BLOCKS)


def check_same_as_uninterrupted(paths: dict[str, str], reference: dict[str, object]) -> int:
    """Fragments, graph and segmentation identical to the uninterrupted run's: the blocks lost."""
    segmentation = read_array(paths["seg"])
    lost = lost_blocks(segmentation, reference["segmentation"])
    np.testing.assert_array_equal(read_array(paths["frags"]), reference["fragments"])
    np.testing.assert_array_equal(segmentation, reference["segmentation"])
    nodes, edges = graph_tables(paths["db"])
    assert nodes == reference["nodes"]
    assert edges == reference["edges"]
    return lost


def pass_run_dirs(root: Path) -> dict[str, Path]:
    return {
        "relabel": root / "v.zarr.voxblock" / "seg" / "relabel",
        "fragments": root / "v.zarr.voxblock" / "frags",
        "graph": root / "rag.sqlite.voxblock",
    }


def pass_report(root: Path, name: str) -> dict:
    import json

    return json.loads((pass_run_dirs(root)[name] / "report.json").read_text())


class ChunkGate:
    """A named pipe in place of one chunk file. Each process that opens it is held inside its block
    until `answer(pass, n)` (the n-th reader of that pass, 0-based) says what it gets: "kill"
    (SIGKILL, mid-block), "garbage" (bytes that are no chunk: the block raises) or "serve" (the
    chunk). As soon as a reader holds the pipe the real file is put back, so that later readers
    read it undisturbed; the pipe comes back while `armed(counts)` (answers given so far, by pass).
    Readers that opened the pipe together can't share its bytes: each gets "kill" rather than
    "serve". `close` puts the file back for good."""

    def __init__(self, root: Path, chunk: Path, answer, armed=lambda counts: True) -> None:
        self.root, self.chunk, self.answer, self.armed = root, chunk, answer, armed
        self.data = chunk.read_bytes()
        self.counts: dict[str, int] = {}
        self.given: dict[str, list[str]] = {}
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._inode = self._install()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _install(self) -> int:
        fifo = self.chunk.with_name(self.chunk.name + ".fifo")
        os.mkfifo(fifo)
        inode = os.stat(fifo).st_ino
        os.replace(fifo, self.chunk)  # a reader gets the file or the pipe, never nothing
        return inode

    def _restore(self) -> None:
        restored = self.chunk.with_name(self.chunk.name + ".restored")
        restored.write_bytes(self.data)
        os.replace(restored, self.chunk)

    def readers(self) -> list[int]:
        """The processes (below this one) holding the pipe open for reading."""
        found: list[int] = []
        for _ in range(5):  # until two looks agree: a woken reader's open may still be returning
            time.sleep(0.01)
            pids = []
            for pid in descendants(os.getpid()):
                try:
                    if any(os.stat(fd).st_ino == self._inode for fd in Path(f"/proc/{pid}/fd").iterdir()):
                        pids.append(pid)
                except OSError:
                    continue
            if pids and pids == found:
                break
            found = pids
        return found

    def pass_of(self, pid: int) -> str:
        try:
            log = os.readlink(f"/proc/{pid}/fd/2")
        except OSError:
            return "?"
        for name, run_dir in pass_run_dirs(self.root).items():
            if log.startswith(f"{run_dir}/"):
                return name
        return "?"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.chunk, os.O_WRONLY)  # blocks until a reader opens the pipe
            except OSError as error:
                self.errors.append(error)
                return
            try:
                if self._stop.is_set():
                    continue
                self._restore()
                readers = self.readers()
                actions = []
                for pid in readers:
                    name = self.pass_of(pid)
                    n = self.counts.get(name, 0)
                    self.counts[name] = n + 1
                    action = self.answer(name, n) if name != "?" else "serve"
                    if action == "serve" and len(readers) > 1:
                        action = "kill"
                    self.given.setdefault(name, []).append(action)
                    actions.append((pid, action))
                for pid, action in actions:
                    if action == "kill":
                        os.kill(pid, signal.SIGKILL)
                if any(action == "garbage" for _, action in actions):
                    os.write(fd, b"this is not a zstd frame" * 10)
                elif any(action == "serve" for _, action in actions):
                    view = memoryview(self.data)
                    while view:
                        view = view[os.write(fd, view) :]
                if not self.armed(self.counts) or self._stop.is_set():
                    return  # the real file stays
                self._inode = self._install()
            except BrokenPipeError:
                pass
            except BaseException as error:  # reported by close()
                self.errors.append(error)
            finally:
                os.close(fd)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):  # ends a pending open, if the pipe is still there
            os.close(os.open(self.chunk, os.O_RDONLY | os.O_NONBLOCK))
        self._thread.join(timeout=10)
        self._restore()
        assert not self._thread.is_alive(), "the chunk gate did not stop"
        assert not self.errors, self.errors


def affinities_chunk(paths: dict[str, str]) -> Path:
    """An inner chunk of the affinities: read by many fragments and graph blocks."""
    return Path(paths["affs"]) / "c" / "0" / "1" / "1" / "1"


def last_affinities_chunk(paths: dict[str, str]) -> Path:
    """The last chunk of the affinities: read by the last blocks of a pass."""
    last = [s // b - 1 for s, b in zip(AGG_SHAPE, AGG_BLOCK)]
    return Path(paths["affs"]).joinpath("c", "0", *map(str, last))


def fragments_chunk(paths: dict[str, str]) -> Path:
    return Path(paths["frags"]) / "c" / "1" / "1" / "0"


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.005)


def gate_later(root: Path, after: str, *args, **kwargs) -> tuple[threading.Thread, list[ChunkGate]]:
    """A ChunkGate installed once the pass `after` has ended (its report written), from a thread."""
    gates: list[ChunkGate] = []

    def install() -> None:
        wait_for(pass_run_dirs(root)[after] / "report.json")
        gates.append(ChunkGate(root, *args, **kwargs))

    thread = threading.Thread(target=install, daemon=True)
    thread.start()
    return thread, gates


@pytest.mark.parametrize("phase", ["fragments", "graph"])
def test_agglomerate_worker_killed_mid_block(tmp_path, agglomerated, fault_tally, phase):
    """Workers SIGKILLed inside a block of the fragments or the graph pass: the block is retried
    and the fragments, graph and segmentation are the uninterrupted run's, bit for bit."""
    paths = make_agglomerate_inputs(tmp_path)
    kills = 4 if FULL else 2
    gate_options = {
        "answer": lambda name, n: "kill" if name == phase else "serve",
        "armed": lambda counts: counts.get(phase, 0) < kills,
    }
    if phase == "fragments":
        thread, gates = None, [ChunkGate(tmp_path, affinities_chunk(paths), **gate_options)]
    else:  # the graph pass reads the affinities after the fragments pass
        thread, gates = gate_later(tmp_path, "fragments", last_affinities_chunk(paths), **gate_options)
    try:
        agglomerate(paths, max_retries=kills + 1)
    finally:
        if thread is not None:
            thread.join(timeout=60)
        for gate in gates:
            gate.close()
    given = gates[0].given if gates else {}
    killed = sum(actions.count("kill") for actions in given.values())
    report = pass_report(tmp_path, phase)
    lost = check_same_as_uninterrupted(paths, agglomerated)
    fault_tally.add(
        f"agglomerate: worker killed mid-block ({phase} pass)", injected=killed, survived=True, lost=lost
    )
    assert set(given) == {phase} and given[phase].count("kill") >= kills, given
    assert report["worker_restarts"] >= kills and report["retried_blocks"] >= 1, report
    assert report["failed_blocks"] == []


def test_agglomerate_relabel_block_raising_on_its_first_attempts(tmp_path, agglomerated, fault_tally):
    """A relabel block that raises on its first attempts (its fragments chunk unreadable) is retried."""
    paths = make_agglomerate_inputs(tmp_path)
    failures = 3 if FULL else 2
    thread, gates = gate_later(
        tmp_path,
        "graph",  # only the relabel pass reads the fragments then
        fragments_chunk(paths),
        answer=lambda name, n: "garbage" if name == "relabel" else "serve",
        armed=lambda counts: counts.get("relabel", 0) < failures,
    )
    try:
        agglomerate(paths, max_retries=failures)
    finally:
        thread.join(timeout=60)
        for gate in gates:
            gate.close()
    given = gates[0].given if gates else {}
    report = pass_report(tmp_path, "relabel")
    lost = check_same_as_uninterrupted(paths, agglomerated)
    fault_tally.add(
        "agglomerate: relabel block raising on its first attempts",
        injected=given.get("relabel", []).count("garbage"),
        survived=True,
        lost=lost,
    )
    assert given == {"relabel": ["garbage"] * failures}, given
    assert report["retried_blocks"] == 1 and report["failed_blocks"] == [], report


FAILED_PASS = {
    "fragments": "agglomerate: fragments failed",
    "graph": "agglomerate: the region graph was not built",
    "relabel": "agglomerate: the relabel pass failed",
}


@pytest.mark.parametrize("phase", ["fragments", "graph", "relabel"])
def test_agglomerate_block_that_keeps_failing_is_reported_then_rerun(
    tmp_path, agglomerated, fault_tally, phase
):
    """A block failing every attempt: VoxblockError naming the pass, the block's ROI and its error;
    once the chunk is readable again, a rerun ends with the uninterrupted run's result."""
    paths = make_agglomerate_inputs(tmp_path)

    def answer(name: str, n: int) -> str:
        return "garbage" if name == phase else "serve"

    if phase == "fragments":
        thread, gates = None, [ChunkGate(tmp_path, affinities_chunk(paths), answer)]
    elif phase == "graph":
        thread, gates = gate_later(tmp_path, "fragments", last_affinities_chunk(paths), answer)
    else:
        thread, gates = gate_later(tmp_path, "graph", fragments_chunk(paths), answer)
    try:
        with pytest.raises(voxblock.VoxblockError) as raised:
            agglomerate(paths, max_retries=1)
    finally:
        if thread is not None:
            thread.join(timeout=60)
        for gate in gates:
            gate.close()
    message = str(raised.value)
    failed = pass_report(tmp_path, phase)["failed_blocks"]
    assert message.startswith(FAILED_PASS[phase]), message
    assert failed and all(f["attempts"] == 2 for f in failed), failed
    array = "frags" if phase == "relabel" else "affs"
    for block in failed:
        assert (
            str(tuple(block["write_roi"]["offset"])) in message
            or str(block["write_roi"]["offset"]) in message
        )
        assert f"v.zarr/{array}" in block["error"], block["error"]
    assert f"v.zarr/{array}" in message, message
    if phase == "relabel":  # relabel blocks read no context: only the block of that chunk
        assert len(failed) == 1
    report = agglomerate(paths)
    lost = check_same_as_uninterrupted(paths, agglomerated)
    fault_tally.add(
        f"agglomerate: block failing every attempt ({phase} pass), reported then rerun",
        injected=len(failed),
        survived=True,
        lost=lost,
    )
    assert report.fragments == "resumed"  # the fragments pass of the failed run made them, or some


AGG_DRIVER = """
import json, sys, voxblock
affs, frags, seg, db, block, offsets = sys.argv[1:7]
voxblock.agglomerate_blockwise(affs, frags, seg, db, tuple(json.loads(block)), offsets=json.loads(offsets),
                               progress=False)
"""


def start_agglomerate(paths: dict[str, str]) -> subprocess.Popen:
    import json

    arguments = [paths[k] for k in ("affs", "frags", "seg", "db")]
    return start(AGG_DRIVER, *arguments, json.dumps(AGG_BLOCK), json.dumps(AGG_OFFSETS))


def running_pass(root: Path) -> str:
    """Which pass holds its lock now (none: between passes, in the solve, or before the first)."""
    locks = [name for name, run_dir in pass_run_dirs(root).items() if (run_dir / "lock").exists()]
    return locks[0] if locks else "between passes"


def kill_driver(process: subprocess.Popen) -> None:
    kill_group(process)
    time.sleep(0.2)
    assert not group_members(process.pid), "processes outlived the killed run"


def finish(process: subprocess.Popen) -> None:
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-3000:]


# when the driver is killed: once this file exists (a pass has begun, or the graph pass has ended:
# the driver is finalizing the graph and solving), and that much later
KILL_AT = {
    "fragments": ("fragments", "lock", 0.3),
    "graph": ("graph", "lock", 0.2),
    "solve": ("graph", "report.json", 0.0),
    "relabel": ("relabel", "lock", 0.1),
}


@pytest.mark.parametrize("phase", list(KILL_AT))
def test_agglomerate_driver_killed_in_each_pass(tmp_path, agglomerated, fault_tally, phase):
    paths = make_agglomerate_inputs(tmp_path)
    pass_name, marker, delay = KILL_AT[phase]
    process = start_agglomerate(paths)
    path = pass_run_dirs(tmp_path)[pass_name] / marker
    deadline = time.monotonic() + 120
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    injected = process.poll() is None
    solved = any((tmp_path / "v.zarr.voxblock" / "seg" / "luts").glob("*.npz"))
    if injected:
        kill_driver(process)
    finish(start_agglomerate(paths))
    lost = check_same_as_uninterrupted(paths, agglomerated)
    fault_tally.add(
        "agglomerate: driver killed (SIGKILL) in one of its passes, rerun", int(injected), True, lost
    )
    assert injected, f"the run ended before it could be killed in its {phase} pass"
    if phase == "solve":
        assert not solved, "the solve was over when the driver was killed"


@pytest.mark.parametrize("seed", AGG_SEEDS)
def test_agglomerate_driver_killed_at_random_moments_and_rerun(tmp_path, agglomerated, fault_tally, seed):
    paths = make_agglomerate_inputs(tmp_path)
    rng = random.Random(seed)
    kills: list[str] = []
    # a driver starts in about a second, then runs about as long as the (cold) uninterrupted run
    longest = 0.7 * (1.0 + float(agglomerated["seconds"]))
    for _ in range(5 if FULL else 3):
        process = start_agglomerate(paths)
        time.sleep(rng.uniform(0.3, longest))
        if process.poll() is not None:
            break
        where = running_pass(tmp_path)
        kill_driver(process)
        kills.append(where)
    if process.poll() is None or process.returncode != 0 or kills:
        finish(start_agglomerate(paths))
    lost = check_same_as_uninterrupted(paths, agglomerated)
    fault_tally.add("agglomerate: driver killed (SIGKILL) at random moments, rerun", len(kills), True, lost)
    print("driver killed in:", kills)
    assert kills, "every run ended before it was killed"
