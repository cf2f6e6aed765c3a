"""`--plan`: a run's checks, counts and estimate, with nothing written (voxblock.plan)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from funlib.geometry import Roi

from voxblock import plan as planning
from voxblock.geometry import Blocking

VOXBLOCK = [sys.executable, "-m", "voxblock"]


def make_volume(directory: Path, size: int = 192, chunk: int = 64) -> Path:
    from scipy import ndimage

    rng = np.random.default_rng(0)
    data = ndimage.gaussian_filter(rng.random((size,) * 3).astype(np.float32), 3)
    data = (data - data.min()) / (data.max() - data.min())
    group = zarr.open_group(str(directory / "v.zarr"), mode="w")
    array = group.create_array("fg", shape=data.shape, chunks=(chunk,) * 3, dtype="float32")
    array[:] = data
    array.attrs.update({"voxel_size": [1, 1, 1], "offset": [0, 0, 0], "axis_names": ["z", "y", "x"]})
    return directory


def voxblock(directory: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VOXBLOCK, *args], cwd=directory, capture_output=True, text=True, check=False)


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every path under `directory` with its size and mtime (ns)."""
    return {
        str(p.relative_to(directory)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in directory.rglob("*")
    } | {".": (-1, directory.stat().st_mtime_ns)}


THRESHOLD = ["run", "threshold", "--input", "v.zarr/fg", "--output", "v.zarr/mask", "--threshold", "0.5"]
SEGMENT = ["segment", "threshold-label", "--input", "v.zarr/fg", "--output", "v.zarr/cells"]
SEGMENT += ["-p", "threshold=0.5"]


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_volume(tmp_path_factory.mktemp("plan"))


def estimated_seconds(output: str) -> float:
    match = re.search(r"estimated ([\d.]+) s wall", output)
    assert match, output
    return float(match.group(1))


# -- pure counts ---------------------------------------------------------------------------------


def test_counts_by_axis_match_the_blocks() -> None:
    total = Roi((0, 0, 0), (100, 70, 64))
    blocking = Blocking(total, Roi((0, 0, 0), (36, 36, 36)), Roi((2, 2, 2), (32, 32, 32)), "overhang")
    blocks = blocking.blocks()
    assert len(blocks) == 3 * 3 * 2 and planning.border_blocks(blocking) == len(blocks)  # none inside
    big = Blocking(
        Roi((0, 0, 0), (160, 160, 160)), Roi((0, 0, 0), (32, 32, 32)), Roi((0, 0, 0), (32, 32, 32))
    )
    assert planning.border_blocks(big) == 5**3 - 3**3
    roi = Roi((0, 0, 0), (100, 70, 64))
    by_block = sum(r.intersect(roi).size for r, _ in blocks)
    assert planning.covered_voxels(blocking, roi, (1, 1, 1), "read") == by_block
    target = blocking.target_roi
    assert planning.covered_voxels(blocking, target, (1, 1, 1), "write") == target.size
    assert planning.units_touched(blocking, target, (32, 32, 32), target.begin) == len(blocks)
    assert planning.units_touched(blocking, target, (16, 16, 16), target.begin) == 6 * 5 * 4
    assert planning.solve_levels([20, 3, 3], 8) == [3, 1]
    assert planning.estimate_wall(0, 1.0, 4, 1.0) == planning.TASK_OVERHEAD_SECONDS


# -- nothing written -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        [*THRESHOLD, "--block-size", "32", "--workers", "2"],
        [*SEGMENT, "--block-size", "32", "--workers", "2"],
        ["downsample", "v.zarr/fg", "--output", "v.zarr/pyramid", "--levels", "2", "--block-size", "32"],
    ],
    ids=["run", "segment", "downsample"],
)
def test_plan_writes_nothing(volume: Path, command: list[str]) -> None:
    before = snapshot(volume)
    time.sleep(0.01)
    done = voxblock(volume, *command, "--plan")
    assert done.returncode == 0, done.stderr
    assert "nothing was written" in done.stdout and "blocks to run" in done.stdout
    assert snapshot(volume) == before


# -- the same refusals ---------------------------------------------------------------------------


def test_plan_refuses_what_the_run_refuses(tmp_path: Path) -> None:
    make_volume(tmp_path, size=64, chunk=32)
    other = zarr.open_group(str(tmp_path / "v.zarr"), mode="a")
    mask = other.create_array("mask", shape=(64, 64, 64), chunks=(48, 48, 48), dtype="uint8")
    mask[:] = 1
    mask.attrs.update({"voxel_size": [1, 1, 1], "offset": [0, 0, 0]})
    cases = [
        # an output of someone else's
        [*THRESHOLD, "--block-size", "32"],
        # blocks sharing the existing output's chunks, with two workers (with --overwrite)
        [*THRESHOLD, "--block-size", "32", "--workers", "2", "--overwrite"],
        # segment's own checks: no context
        [*SEGMENT, "--block-size", "32", "--context", "0"],
    ]
    for command in cases:
        before = snapshot(tmp_path)
        planned = voxblock(tmp_path, *command, "--plan")
        assert snapshot(tmp_path) == before
        real = voxblock(tmp_path, *command, "--no-progress")
        assert planned.returncode == real.returncode == 1, (planned.stdout, real.stdout)
        assert planned.stderr == real.stderr and "Error:" in real.stderr


# -- counts and warnings -------------------------------------------------------------------------


def test_counts_after_a_partial_run(tmp_path: Path) -> None:
    make_volume(tmp_path, size=64, chunk=32)
    command = [*THRESHOLD, "--block-size", "16", "--workers", "1"]
    assert voxblock(tmp_path, *command, "--no-progress").returncode == 0
    tracking = zarr.open_group(str(next((tmp_path / "v.zarr.voxblock").rglob("tracking*"))), mode="r+")
    done = tracking["done"]
    flat = np.asarray(done[...]).reshape(-1)
    flat[:20] = 0  # 20 blocks not done
    done[...] = flat.reshape(done.shape)
    planned = voxblock(tmp_path, *command, "--plan")
    assert planned.returncode == 0, planned.stderr
    row = next(line for line in planned.stdout.splitlines() if line.strip().startswith("threshold "))
    assert row.split()[1:4] == ["64", "44", "20"]
    assert "total: 20 blocks to run" in planned.stdout
    assert "are small (< 32^3)" in planned.stdout  # 16^3 blocks
    real = voxblock(tmp_path, *command, "--no-progress")
    assert "20 blocks processed, 44 already done" in real.stdout


def test_warns_of_misaligned_output_with_one_worker(tmp_path: Path) -> None:
    make_volume(tmp_path, size=64, chunk=32)
    group = zarr.open_group(str(tmp_path / "v.zarr"), mode="a")
    mask = group.create_array("mask", shape=(64, 64, 64), chunks=(48, 48, 48), dtype="uint8")
    mask.attrs.update({"voxel_size": [1, 1, 1], "offset": [0, 0, 0]})
    planned = voxblock(tmp_path, *THRESHOLD, "--block-size", "32", "--workers", "1", "--plan")
    assert planned.returncode == 0, planned.stderr
    assert "blocks share them, so this run must keep to one worker" in planned.stdout


# -- the estimate --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [THRESHOLD, SEGMENT], ids=["threshold", "segment"])
def test_estimate_within_twice_the_real_run(tmp_path: Path, command: list[str]) -> None:
    make_volume(tmp_path)
    args = [*command, "--block-size", "32", "--workers", "2"]
    planned = voxblock(tmp_path, *args, "--plan")
    assert planned.returncode == 0, planned.stderr
    estimate = estimated_seconds(planned.stdout)
    started = time.perf_counter()
    real = voxblock(tmp_path, *args, "--no-progress")
    seconds = time.perf_counter() - started
    assert real.returncode == 0, real.stderr
    print(f"{command[1]}: estimated {estimate:.2f} s, real {seconds:.2f} s")
    assert seconds / 2 <= estimate <= seconds * 2


def test_plan_blockwise_api(tmp_path: Path) -> None:
    make_volume(tmp_path, size=64, chunk=32)
    before = snapshot(tmp_path)
    block = Roi((0, 0, 0), (32, 32, 32))
    found = planning.plan_blockwise(
        "threshold",
        Roi((0, 0, 0), (64, 64, 64)),
        block,
        block,
        num_workers=2,
        input=str(tmp_path / "v.zarr/fg"),
        output=str(tmp_path / "v.zarr/mask"),
        threshold=0.5,
    )
    assert snapshot(tmp_path) == before
    (only,) = found.passes
    assert (only.blocks, only.done, only.to_run, only.files) == (8, 0, 8, 8)
    assert only.bytes_read == 64**3 * 4 and only.bytes_written == 64**3
    assert only.seconds_per_block is not None and found.wall_seconds is not None
    assert found.to_json()["passes"][0]["to_run"] == 8


# -- agglomerate: all four passes ----------------------------------------------------------------

AGGLOMERATE = ["agglomerate", "--affinities", "v.zarr/affs", "--fragments", "o.zarr/frags"]
AGGLOMERATE += ["--output", "o.zarr/seg", "--db", "rag.sqlite", "--block-size", "8,16,16", "--workers", "2"]
AGGLOMERATE_PASSES = ["fragments", "graph", "solve", "relabel"]


def make_affinities(directory: Path) -> Path:
    """tests/test_agglomerate.py's volume: noisy affinities of random cells."""
    from voxblock_testing.volumes import affinities_from_labels, labels_data, write_array

    offsets = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 0], [0, 3, 0], [0, 0, 3]]
    shape = (24, 40, 40)
    labels = labels_data(shape, num_labels=30, cell=(8, 10, 10), seed=11)
    rng = np.random.default_rng(12)
    affs = affinities_from_labels(labels, offsets) * 0.8 + rng.normal(0.1, 0.12, (len(offsets), *shape))
    write_array(
        f"{directory}/v.zarr/affs",
        np.clip(affs, 0, 1).astype(np.float32),
        voxel_size=(4, 2, 2),
        offset=(8, 0, 4),
        chunk_shape=(8, 16, 16),
        channel_dims=1,
        attrs={"offsets": offsets},
    )
    return directory


def pass_rows(output: str) -> dict[str, list[str]]:
    """Each pass's row of the plan's table: blocks, done, to run, read, ..."""
    rows = {}
    for line in output.splitlines():
        words = line.split()
        if words and words[0] in AGGLOMERATE_PASSES and len(words) > 4 and words[1].isdigit():
            rows[words[0]] = words[1:]
    return rows


def test_agglomerate_plan_writes_nothing_and_plans_every_pass(tmp_path: Path) -> None:
    make_affinities(tmp_path)
    before = snapshot(tmp_path)
    time.sleep(0.01)
    done = voxblock(tmp_path, *AGGLOMERATE, "--plan")
    assert done.returncode == 0, done.stderr
    assert snapshot(tmp_path) == before  # no database, no fragments, no run directories
    assert not (tmp_path / "rag.sqlite").exists() and not (tmp_path / "o.zarr").exists()
    rows = pass_rows(done.stdout)
    assert list(rows) == AGGLOMERATE_PASSES, done.stdout
    assert rows["graph"][:3] == ["27", "0", "27"] and rows["relabel"][:3] == ["27", "0", "27"]
    assert rows["solve"][:3] == ["1", "0", "1"]
    assert "?" not in " ".join(" ".join(row) for row in rows.values()), done.stdout  # every pass timed
    assert "scratch SQLite database" in done.stdout and "a new table" in done.stdout
    estimated_seconds(done.stdout)


def test_agglomerate_plan_refuses_what_the_run_refuses(tmp_path: Path) -> None:
    from voxblock.agglomerate.graphdb import GraphSource, open_graph

    make_affinities(tmp_path)
    open_graph(tmp_path / "other.sqlite", GraphSource("/elsewhere/frags", (0, 0, 0), (1, 1, 1))).close()
    other = [*AGGLOMERATE[: AGGLOMERATE.index("--db")], "--db", "other.sqlite", *AGGLOMERATE[-4:]]
    for command in ([*AGGLOMERATE, "--threshold", "1.5"], other):
        before = snapshot(tmp_path)
        planned = voxblock(tmp_path, *command, "--plan")
        # the run's own check (graphdb.check_graph) opens the database in WAL mode: its -wal and
        # -shm come and go, so the folder's mtime moves; no file is written
        assert {k: v for k, v in snapshot(tmp_path).items() if k != "."} == {
            k: v for k, v in before.items() if k != "."
        }
        real = voxblock(tmp_path, *command, "--no-progress")
        assert planned.returncode == real.returncode == 1, (planned.stdout, real.stdout)
        assert planned.stderr == real.stderr and "Error:" in real.stderr


def test_agglomerate_estimate_and_the_plan_after_a_run(tmp_path: Path) -> None:
    make_affinities(tmp_path)
    planned = voxblock(tmp_path, *AGGLOMERATE, "--plan")
    assert planned.returncode == 0, planned.stderr
    estimate = estimated_seconds(planned.stdout)
    started = time.perf_counter()
    real = voxblock(tmp_path, *AGGLOMERATE, "--no-progress")
    seconds = time.perf_counter() - started
    assert real.returncode == 0, real.stderr
    print(f"agglomerate: estimated {estimate:.2f} s, real {seconds:.2f} s")
    assert seconds / 2 <= estimate <= seconds * 2
    # the same settings again: the solve only (it always runs), every block done
    again = pass_rows(voxblock(tmp_path, *AGGLOMERATE, "--plan").stdout)
    assert {name: row[:3] for name, row in again.items()} == {
        "fragments": ["27", "27", "0"],
        "graph": ["27", "27", "0"],
        "solve": ["1", "0", "1"],
        "relabel": ["27", "27", "0"],
    }
    # another threshold: a new table, so the solve and every relabel block
    other = voxblock(tmp_path, *AGGLOMERATE, "--threshold", "0.3", "--plan")
    rows = pass_rows(other.stdout)
    assert {name: row[2] for name, row in rows.items()} == {
        "fragments": "0",
        "graph": "0",
        "solve": "1",
        "relabel": "27",
    }, other.stdout
    assert "a new table" in other.stdout
