"""Bad input is refused through the API with a VoxblockError before any block
runs: existing arrays stay byte-for-byte unchanged and nothing is created
(no output, no run directory, no logs)."""

from __future__ import annotations

import io
import json
import os
import re
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


# -- agglomerate_blockwise and `voxblock agglomerate` ---------------------------------------------

AGG_SHAPE = (16, 32, 32)
AGG_OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
AGG_BLOCK = (8, 16, 16)


@pytest.fixture(scope="module")
def agglomerated(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Affinities, one finished agglomeration (fragments, graph, segmentation) and arrays a bad run
    must refuse. Shared by the module's tests: each checks that its bad run changed nothing."""
    from voxblock_testing.volumes import affinities_from_labels, labels_data

    root = tmp_path_factory.mktemp("agglomerate")
    labels = labels_data(AGG_SHAPE, num_labels=8, cell=(4, 8, 8), seed=3)
    affs = affinities_from_labels(labels, AGG_OFFSETS)
    container = root / "v.zarr"
    chunks = {"chunk_shape": AGG_BLOCK}
    p = {
        "affs": write_array(str(container / "affs"), affs, channel_dims=1, **chunks),
        "affs_no_channels": write_array(str(container / "affs_no_channels"), affs[0], **chunks),
        "affs_voxel2": write_array(
            str(container / "affs_voxel2"), affs, voxel_size=(2, 2, 2), channel_dims=1, **chunks
        ),
        "frags_int32": write_array(str(container / "frags_int32"), labels.astype(np.int32), **chunks),
        "frags_float": write_array(str(container / "frags_float"), labels.astype(np.float32), **chunks),
        "frags_given": write_array(str(container / "frags_given"), labels.astype(np.uint64), **chunks),
        "foreign": write_array(str(container / "foreign"), labels.astype(np.uint64), **chunks),
        "frags": str(container / "frags"),
        "seg": str(container / "seg"),
        "new": str(container / "new"),
        "new_frags": str(container / "new_frags"),
        "db": str(root / "rag.sqlite"),
        "new_db": str(root / "new.sqlite"),
    }
    report = voxblock.agglomerate_blockwise(
        p["affs"], p["frags"], p["seg"], p["db"], AGG_BLOCK, offsets=AGG_OFFSETS, progress=False
    )
    assert report.fragments == "made" and report.segments > 1
    return root, p


def _closed_port() -> int:
    import socket

    with socket.socket() as listener:  # a port nobody listens on once this socket is closed
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


# name: (arguments changed from a good run, what the error says); every run writes `new` from
# `affs` into `new_db` with `new_frags` unless the case says otherwise
AGG_CASES: dict[str, tuple[Callable[[dict[str, str]], dict[str, Any]], str]] = {
    "affinities without a channel axis": (
        lambda p: {"affinities": p["affs_no_channels"]},
        "must have one channel axis",
    ),
    "fewer offsets than channels": (
        lambda p: {"offsets": AGG_OFFSETS[:2]},
        "2 offsets for 3 affinity channels",
    ),
    "more offsets than channels": (
        lambda p: {"offsets": [*AGG_OFFSETS, [2, 0, 0]]},
        "4 offsets for 3 affinity channels",
    ),
    "int32 fragments": (
        lambda p: {"fragments": p["frags_int32"]},
        "dtype int32; fragments must be unsigned integers",
    ),
    "float fragments": (
        lambda p: {"fragments": p["frags_float"]},
        "dtype float32; fragments must be unsigned integers",
    ),
    "database in a folder that does not exist": (
        lambda p: {"db": p["new_db"].replace("new.sqlite", "no-such-folder/rag.sqlite")},
        "no-such-folder does not exist",
    ),
    "database path that is a folder": (
        lambda p: {"db": str(Path(p["new_db"]).parent / "v.zarr")},
        "is not a file",
    ),
    "PostgreSQL database on a closed port": (
        lambda p: {"db": f"postgresql://voxblock:secret@127.0.0.1:{_closed_port()}/voxblock"},
        "cannot be reached",
    ),
    "database holding the graph of other fragments": (
        lambda p: {"fragments": p["frags_given"], "db": p["db"]},
        "already holds another graph",
    ),
    "threshold above 1": (lambda p: {"threshold": 1.5}, r"threshold must be in \[0, 1\]"),
    "threshold below 0": (lambda p: {"threshold": -0.1}, r"threshold must be in \[0, 1\]"),
    "threshold NaN": (lambda p: {"threshold": float("nan")}, r"threshold must be in \[0, 1\]"),
    "unknown method": (lambda p: {"method": "kruskal"}, "kruskal"),
    "block shape off the voxel size": (
        lambda p: {"affinities": p["affs_voxel2"], "block_shape": (15, 16, 16)},
        r"must be a multiple of the voxel size \(2, 2, 2\)",
    ),
    "fragments made by voxblock with another bias": (
        lambda p: {"fragments": p["frags"], "bias": -0.3},
        r"made by an earlier voxblock run with other settings \(bias",
    ),
    "output holding data agglomerate did not write": (
        lambda p: {"output": p["foreign"]},
        "data agglomerate did not write",
    ),
}


def agglomerate_arguments(p: dict[str, str], case: str | None) -> dict[str, Any]:
    return {
        "affinities": p["affs"],
        "fragments": p["new_frags"],
        "output": p["new"],
        "db": p["new_db"],
        "block_shape": AGG_BLOCK,
        "offsets": AGG_OFFSETS,
        **(AGG_CASES[case][0](p) if case else {}),
    }


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(AGG_CASES))
def test_agglomerate_bad_input_is_refused_before_anything_runs(case, agglomerated, monkeypatch):
    root, p = agglomerated
    monkeypatch.chdir(root)
    before = snapshot(root)
    with pytest.raises(voxblock.VoxblockError, match=AGG_CASES[case][1]):
        voxblock.agglomerate_blockwise(**agglomerate_arguments(p, case), progress=False)
    assert snapshot(root) == before


def cli_arguments(arguments: dict[str, Any]) -> list[str]:
    """`voxblock agglomerate` flags for agglomerate_blockwise's arguments (block shape in voxels)."""
    voxel_size = 2 if arguments["affinities"].endswith("affs_voxel2") else 1
    flags = ["agglomerate", "--no-progress", "--workers", "2"]
    for key, value in arguments.items():
        if key == "block_shape":
            flags += ["--block-size", ",".join(str(v // voxel_size) for v in value)]
        elif key in ("offsets", "bias"):
            flags += [f"--{key}", json.dumps(value)]
        else:
            flags += [f"--{key}", str(value)]
    return flags


# the CLI takes the block size in voxels: it cannot be off the voxel size
CLI_CASES = [case for case in AGG_CASES if case != "block shape off the voxel size"]


@pytest.mark.bad_input
def test_agglomerate_refuses_batch_before_anything_runs(agglomerated, monkeypatch):
    """Its passes are not batched (`voxblock agglomerate` has no --batch)."""
    root, p = agglomerated
    monkeypatch.chdir(root)
    before = snapshot(root)
    with pytest.raises(voxblock.VoxblockError, match="does not batch its passes"):
        voxblock.agglomerate_blockwise(**agglomerate_arguments(p, None), batch=2, progress=False)
    assert snapshot(root) == before


@pytest.mark.bad_input
@pytest.mark.parametrize("case", CLI_CASES)
def test_voxblock_agglomerate_refuses_bad_input_before_anything_runs(case, agglomerated, monkeypatch):
    from click.testing import CliRunner

    from voxblock.cli import main

    root, p = agglomerated
    monkeypatch.chdir(root)
    before = snapshot(root)
    result = CliRunner().invoke(main, cli_arguments(agglomerate_arguments(p, case)))
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    message = AGG_CASES[case][1] if case != "unknown method" else "'kruskal' is not one of"
    assert re.search(message, " ".join(result.output.split())), result.output
    assert snapshot(root) == before


def test_agglomerate_replaces_an_output_it_did_not_write_with_overwrite(agglomerated, tmp_path):
    _, p = agglomerated
    output = write_array(
        str(tmp_path / "o.zarr/seg"), np.full(AGG_SHAPE, 9, np.uint64), chunk_shape=AGG_BLOCK
    )
    report = voxblock.agglomerate_blockwise(
        p["affs"], p["frags"], output, p["db"], AGG_BLOCK, offsets=AGG_OFFSETS, overwrite=True, progress=False
    )
    assert report.fragments == "resumed"
    np.testing.assert_array_equal(read_array(output), read_array(p["seg"]))
