"""Bad input is refused through the API with a VoxblockError before any block
runs: existing arrays stay byte-for-byte unchanged and nothing is created
(no output, no run directory, no logs)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from funlib.geometry import Roi

import voxblock
from voxblock_testing.volumes import random_raw, read_array, write_array
from voxblock_testing.workers import Flaky

TOTAL = Roi((0, 0, 0), (32, 32, 32))
BLOCK = Roi((0, 0, 0), (16, 16, 16))


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory under `root`."""
    return {
        str(path.relative_to(root)): (path.read_bytes() if path.is_file() else None)
        for path in sorted(root.rglob("*"))
    }


@pytest.fixture
def volume(tmp_path, monkeypatch):
    """An input, and existing arrays a bad run must not touch. Runs happen in tmp_path."""
    monkeypatch.chdir(tmp_path)
    container = tmp_path / "v.zarr"
    paths = {
        "raw": random_raw(str(container / "raw"), (32, 32, 32), seed=0, chunk_shape=(16, 16, 16)),
        "coarse": random_raw(
            str(container / "coarse"), (16, 16, 16), voxel_size=(2, 2, 2), chunk_shape=(8, 8, 8)
        ),
        "int32": write_array(
            str(container / "int32"), np.ones((32, 32, 32), np.int32), chunk_shape=(16, 16, 16)
        ),
        "voxel2": write_array(
            str(container / "voxel2"),
            np.ones((16, 16, 16), np.float32),
            voxel_size=(2, 2, 2),
            chunk_shape=(8, 8, 8),
        ),
        "foreign": write_array(
            str(container / "foreign"), np.full((32, 32, 32), 5, np.float32), chunk_shape=(16, 16, 16)
        ),
        "chunky": write_array(
            str(container / "chunky"), np.full((32, 32, 32), 7, np.float32), chunk_shape=(24, 24, 24)
        ),
        "out": str(container / "out"),
        "missing_container": str(tmp_path / "missing.zarr/raw"),
        "missing_dataset": str(container / "nothing"),
    }
    return tmp_path, paths


def run(worker: Any = "scale", total=TOTAL, read=BLOCK, write=BLOCK, **kwargs: Any) -> bool:
    kwargs.setdefault("num_workers", 2)
    return voxblock.run_blockwise(worker, total, read, write, progress=False, **kwargs)


CASES: dict[str, tuple[Callable[[dict[str, str]], dict[str, Any]], str]] = {
    "unknown worker": (
        lambda p: {"worker": "no-such-worker", "input": p["raw"], "output": p["out"]},
        "unknown worker 'no-such-worker'",
    ),
    "unknown option": (
        lambda p: {"input": p["raw"], "output": p["out"], "factr": 2.0},
        "has no option factr",
    ),
    "missing container": (
        lambda p: {"input": p["missing_container"], "output": p["out"]},
        "missing.zarr does not exist",
    ),
    "missing dataset": (
        lambda p: {"input": p["missing_dataset"], "output": p["out"]},
        "no dataset 'nothing'",
    ),
    "read ROI not containing write ROI": (
        lambda p: {
            "input": p["raw"],
            "output": p["out"],
            "read": Roi((0, 0, 0), (16, 16, 16)),
            "write": Roi((8, 8, 8), (16, 16, 16)),
        },
        "must contain the write ROI",
    ),
    "block shape off the voxel grid": (
        lambda p: {
            "input": p["coarse"],
            "output": p["out"],
            "read": Roi((0, 0, 0), (15, 16, 16)),
            "write": Roi((0, 0, 0), (15, 16, 16)),
        },
        "off the voxel grid",
    ),
    "total ROI offset off the voxel grid": (
        lambda p: {"input": p["coarse"], "output": p["out"], "total": Roi((1, 0, 0), (30, 32, 32))},
        "off the voxel grid",
    ),
    "write block not on the output chunk grid": (
        lambda p: {"input": p["raw"], "output": p["chunky"], "overwrite": True},
        "is not a multiple of",
    ),
    "total ROI outside the input": (
        lambda p: {"input": p["raw"], "output": p["out"], "total": Roi((64, 64, 64), (32, 32, 32))},
        "not inside the input",
    ),
    "total ROI partly outside the input": (
        lambda p: {"input": p["raw"], "output": p["out"], "total": Roi((16, 0, 0), (32, 32, 32))},
        "not inside the input",
    ),
    "num_workers 0": (
        lambda p: {"input": p["raw"], "output": p["out"], "num_workers": 0},
        "num_workers must be an integer >= 1",
    ),
    "negative max_retries": (
        lambda p: {"input": p["raw"], "output": p["out"], "max_retries": -1},
        "max_retries must be an integer >= 0",
    ),
    "negative timeout": (
        lambda p: {"input": p["raw"], "output": p["out"], "timeout": -1.0},
        "timeout must be a number of seconds > 0",
    ),
    "existing output with another dtype": (
        lambda p: {"input": p["raw"], "output": p["int32"]},
        "different dtype int32",
    ),
    "existing output with another dtype, even with overwrite": (
        lambda p: {"input": p["raw"], "output": p["int32"], "overwrite": True},
        "different dtype int32",
    ),
    "existing output with another voxel size": (
        lambda p: {"input": p["raw"], "output": p["voxel2"]},
        "different voxel size",
    ),
    "existing output not made by voxblock": (
        lambda p: {"input": p["raw"], "output": p["foreign"]},
        "written by something other than voxblock; refusing to overwrite",
    ),
    "input is the output": (
        lambda p: {"input": p["raw"], "output": p["raw"]},
        "input and output are the same array",
    ),
    "unknown fit": (
        lambda p: {"input": p["raw"], "output": p["out"], "fit": "clip"},
        "fit must be one of",
    ),
    "ROIs with fewer axes than the data": (
        lambda p: {
            "input": p["raw"],
            "output": p["out"],
            "total": Roi((0, 0), (32, 32)),
            "read": Roi((0, 0), (16, 16)),
            "write": Roi((0, 0), (16, 16)),
        },
        "has 2 axes; the data has 3 spatial axes",
    ),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_anything_runs(case, volume):
    root, paths = volume
    make_kwargs, message = CASES[case]
    before = snapshot(root)
    with pytest.raises(voxblock.VoxblockError, match=message):
        run(**make_kwargs(paths))
    assert snapshot(root) == before


def test_existing_foreign_output_is_replaced_with_overwrite(volume):
    _, paths = volume
    assert run(input=paths["raw"], output=paths["foreign"], overwrite=True, factor=2.0)
    np.testing.assert_allclose(read_array(paths["foreign"]), 2.0 * read_array(paths["raw"]))


DRIVER = """
import sys
import voxblock
from funlib.geometry import Roi
from voxblock_testing.workers import Flaky

source, output, attempts_dir = sys.argv[1:4]
worker = Flaky(input=source, output=output, attempts_dir=attempts_dir, fail_times=0, sleep=0.5)
block = Roi((0, 0, 0), (16, 16, 16))
ok = voxblock.run_blockwise(worker, Roi((0, 0, 0), (32, 32, 32)), block, block, num_workers=2, progress=False)
sys.exit(0 if ok else 1)
"""


@pytest.mark.bad_input
def test_a_second_run_on_an_output_being_written_is_refused(volume):
    root, paths = volume
    attempts_dir = root / "attempts"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, paths["raw"], paths["out"], str(attempts_dir)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lock = root / "v.zarr.voxblock" / "out" / "lock"
    try:
        deadline = time.monotonic() + 60
        while not (attempts_dir.exists() and any(attempts_dir.iterdir())):
            assert driver.poll() is None, "the first run ended early"
            assert time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.05)
        assert json.loads(lock.read_text())["pid"] == driver.pid
        same = Flaky(
            input=paths["raw"], output=paths["out"], attempts_dir=str(attempts_dir), fail_times=0, sleep=0.5
        )
        for worker, options in (
            (same, {}),  # the same run started twice
            ("scale", {"input": paths["raw"], "output": paths["out"], "factor": 3.0}),  # another task
        ):
            task = voxblock.BlockwiseTask(worker, TOTAL, BLOCK, BLOCK, num_workers=2, **options)
            with pytest.raises(voxblock.VoxblockError, match=f"another run \\(process {driver.pid} "):
                voxblock.run_tasks([task], progress=False, out=io.StringIO())
            assert json.loads(lock.read_text())["pid"] == driver.pid  # the refused run left the lock alone
        assert driver.wait(timeout=120) == 0  # and the first run finished undisturbed
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert not lock.exists()
    np.testing.assert_array_equal(read_array(paths["out"]), read_array(paths["raw"]))
