"""The public API through the real scheduler: worker files, callbacks, checks, compute, chains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from funlib.geometry import Roi
from funlib.persistence import open_ds, prepare_ds

import voxblock
from voxblock_testing.volumes import random_raw, read_array

DATA = Path(__file__).parent / "data"
VOXEL = (2, 2, 2)
SHAPE = (24, 24, 24)
WORLD = Roi((0, 0, 0), tuple(s * v for s, v in zip(SHAPE, VOXEL)))
BLOCK = Roi((0, 0, 0), (16, 16, 16))


@pytest.fixture
def volume(tmp_path: Path) -> tuple[str, np.ndarray]:
    name = random_raw(f"{tmp_path}/v.zarr/raw", SHAPE, seed=1, voxel_size=VOXEL, chunk_shape=(8, 8, 8))
    return name, read_array(name)


def read_all(name: str) -> np.ndarray:
    return open_ds(name)[WORLD]


def test_the_worker_loop_loads_no_array_library_until_a_worker_needs_one():
    """A worker process pays for numpy and zarr only when its worker reads arrays: the no-op
    benchmark row starts its workers as fast as bare daisy does."""
    code = (
        "import sys, voxblock.compute, voxblock.workers, voxblock.rundir\n"
        "print(sorted(m for m in ('numpy', 'zarr', 'funlib.persistence') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_dacapo_style_worker_file_runs_unchanged(volume, tmp_path):
    raw, data = volume
    out = prepare_ds(
        str(tmp_path / "v.zarr" / "mask"),
        shape=SHAPE,
        offset=(0, 0, 0),
        voxel_size=VOXEL,
        chunk_shape=(8, 8, 8),
        dtype=np.uint8,
    )
    assert out[WORLD].sum() == 0
    ok = voxblock.run_blockwise(
        str(DATA / "dacapo_style_worker.py"),
        WORLD,
        BLOCK,
        BLOCK,
        2,
        1,
        None,
        None,
        raw,
        f"{tmp_path}/v.zarr/mask",
        threshold=0.3,
        run_dir=tmp_path / "run",
        progress=False,
    )
    assert ok
    np.testing.assert_array_equal(open_ds(f"{tmp_path}/v.zarr/mask")[WORLD], (data > 0.3).astype(np.uint8))
    assert (tmp_path / "run" / "report.json").exists()


def record_init(context) -> None:
    path = Path(os.environ["VOXBLOCK_TEST_INIT"])
    path.write_text(json.dumps({"pid": os.getpid(), "context": dict(context.items())}))


def test_init_callback_runs_once_in_the_driver_before_any_block(volume, tmp_path, monkeypatch):
    raw, data = volume
    marker = tmp_path / "init.json"
    monkeypatch.setenv("VOXBLOCK_TEST_INIT", str(marker))
    ok = voxblock.run_blockwise(
        "scale",
        WORLD,
        BLOCK,
        BLOCK,
        2,
        input=raw,
        output=f"{tmp_path}/v.zarr/out",
        factor=2.0,
        init_callback_fn=record_init,
        progress=False,
    )
    assert ok
    record = json.loads(marker.read_text())
    assert record["pid"] == os.getpid()
    assert {"hostname", "port", "task_id"} <= set(record["context"])
    init_time = marker.stat().st_mtime
    chunks = [p for p in (tmp_path / "v.zarr" / "out" / "c").rglob("*") if p.is_file()]
    assert chunks and min(p.stat().st_mtime for p in chunks) >= init_time
    np.testing.assert_allclose(read_all(f"{tmp_path}/v.zarr/out"), data * 2)


def skip_first_block(block) -> bool:
    return tuple(block.write_roi.offset) == (0, 0, 0)


def reject_last_block(block) -> bool:
    return tuple(block.write_roi.offset) != (32, 32, 32)


def test_check_function_pair_skips_before_and_fails_after(volume, tmp_path):
    raw, data = volume
    task = voxblock.BlockwiseTask(
        "scale",
        WORLD,
        BLOCK,
        BLOCK,
        2,
        1,
        input=raw,
        output=f"{tmp_path}/v.zarr/out",
        factor=2.0,
        check_function=(skip_first_block, reject_last_block),
    )
    report = voxblock.run_tasks([task], progress=False)
    assert not report.succeeded
    (result,) = report.tasks
    assert result.skipped == 1
    assert [f.write_roi["offset"] for f in result.failed_blocks] == [[32, 32, 32]]
    assert result.failed_blocks[0].attempts == 2
    assert "check_function" in result.failed_blocks[0].error
    out = read_all(f"{tmp_path}/v.zarr/out")
    assert np.all(out[:8, :8, :8] == 0)  # skipped by the pre-check
    np.testing.assert_allclose(out[8:16], data[8:16] * 2)


def test_command_compute_starts_workers_through_a_command(volume, tmp_path):
    raw, data = volume
    ok = voxblock.run_blockwise(
        "scale",
        WORLD,
        BLOCK,
        BLOCK,
        2,
        input=raw,
        output=f"{tmp_path}/v.zarr/out",
        shift=1.0,
        compute=voxblock.Command(template=("env", "STARTED_BY=voxblock-test")),
        progress=False,
    )
    assert ok
    np.testing.assert_allclose(read_all(f"{tmp_path}/v.zarr/out"), data + 1)
    assert (Path(f"{tmp_path}/v.zarr.voxblock/out") / "worker.pkl").exists()


def test_upstream_tasks_run_first_as_one_pipeline(volume, tmp_path):
    raw, data = volume
    first = voxblock.BlockwiseTask(
        "scale", WORLD, BLOCK, BLOCK, 2, input=raw, output=f"{tmp_path}/v.zarr/a", factor=2.0
    )
    second = voxblock.BlockwiseTask(
        "scale",
        WORLD,
        BLOCK,
        BLOCK,
        2,
        2,
        None,
        [first],
        input=f"{tmp_path}/v.zarr/a",
        output=f"{tmp_path}/v.zarr/b",
        shift=-1.0,
    )
    report = voxblock.run_tasks([second], progress=False)
    assert report.succeeded
    assert [t.task_id for t in report.tasks] == ["scale", "scale-2"]
    np.testing.assert_allclose(read_all(f"{tmp_path}/v.zarr/b"), data * 2 - 1, rtol=1e-6)


def test_context_reads_zeros_past_the_input_and_writes_only_the_region(volume, tmp_path):
    raw, data = volume
    context = (4, 4, 4)
    ok = voxblock.run_blockwise(
        "scale",
        WORLD.grow(context, context),
        BLOCK.grow(context, context),
        BLOCK,
        2,
        input=raw,
        output=f"{tmp_path}/v.zarr/out",
        factor=-1.0,
        progress=False,
    )
    assert ok
    out = open_ds(f"{tmp_path}/v.zarr/out")
    assert out.roi == WORLD
    np.testing.assert_allclose(out[WORLD], -data)


def test_an_empty_output_without_provenance_is_taken_one_with_data_is_not(volume, tmp_path):
    """An output array with no chunk written holds nothing to lose (e.g. a run killed right
    after creating it); one with data is refused."""
    raw, data = volume
    for name in ("empty", "full"):
        made = prepare_ds(
            str(tmp_path / "v.zarr" / name),
            shape=SHAPE,
            offset=(0, 0, 0),
            voxel_size=VOXEL,
            chunk_shape=(8, 8, 8),
            dtype=np.float32,
        )
        if name == "full":
            made._source_data[:8, :8, :8] = 5.0
    assert voxblock.run_blockwise(
        "scale", WORLD, BLOCK, BLOCK, 2, input=raw, output=f"{tmp_path}/v.zarr/empty", progress=False
    )
    np.testing.assert_allclose(read_all(f"{tmp_path}/v.zarr/empty"), data)
    with pytest.raises(voxblock.VoxblockError, match="something other than voxblock"):
        voxblock.run_blockwise(
            "scale", WORLD, BLOCK, BLOCK, 2, input=raw, output=f"{tmp_path}/v.zarr/full", progress=False
        )
    assert np.all(read_all(f"{tmp_path}/v.zarr/full")[:8, :8, :8] == 5.0)
