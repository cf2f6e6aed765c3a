"""Users' own conventions, through the real CLI and scheduler: dacapo-style worker files (what
their spawn_worker takes, dacapo's container + dataset names), errors in the CLI's words (voxels,
flags), outputs that are not zarr containers, and a scheduler that local runs keep off the network."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from funlib.geometry import Coordinate, Roi
from funlib.persistence import prepare_ds

import voxblock
from voxblock.cli import cli_wording
from voxblock.compat import WorkerFile
from voxblock_testing.volumes import random_raw, read_array, write_array

DATA = Path(__file__).parent / "data"
SHAPE = (16, 24, 24)
VOXEL = (4, 2, 2)
CHUNK = (8, 8, 8)

# dacapo's naming: a container and a dataset per array, as in its threshold_worker.py
DACAPO_PAIRS = """
import daisy
import numpy as np
from funlib.persistence import open_ds

read_write_conflict = False
fit = "valid"
path = __file__


def start_worker(input_container, input_dataset, output_container, output_dataset, threshold=0.0,
                 return_io_loop=False):
    def io_loop():
        source = open_ds(f"{input_container}/{input_dataset}")
        target = open_ds(f"{output_container}/{output_dataset}", mode="r+")
        client = daisy.Client()
        while True:
            with client.acquire_block() as block:
                if block is None:
                    break
                target[block.write_roi] = (source[block.write_roi] > threshold).astype(np.uint8)

    return io_loop if return_io_loop else io_loop()


def spawn_worker(input_container, input_dataset, output_container, output_dataset, threshold=0.0):
    return start_worker(input_container, input_dataset, output_container, output_dataset, threshold,
                        return_io_loop=True)
"""

# records where the scheduler listens (from /proc/net/tcp) and the address it gave this worker
LISTENER = """
import json
import os

import daisy

fit = "valid"
read_write_conflict = False


def listening(port):
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, local_port = local.rsplit(":", 1)
            if state == "0A" and int(local_port, 16) == port:
                found.append(address)
    return found


def spawn_worker(record):
    def serve():
        context = dict(daisy.Context.from_env().items())
        client = daisy.Client()
        while True:
            with client.acquire_block() as block:
                if block is None:
                    break
                # while a block is out, the scheduler is certainly listening
                seen = {"hostname": context["hostname"], "listening": listening(int(context["port"]))}
                with open(os.path.join(record, f"{os.getpid()}.json"), "w") as out:
                    json.dump(seen, out)

    return serve
"""


def voxblock_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "voxblock", *args, "--no-progress"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def raw(tmp_path: Path) -> np.ndarray:
    """v.zarr/raw, and an empty uint8 v.zarr/mask for worker files to write into."""
    name = random_raw(f"{tmp_path}/v.zarr/raw", SHAPE, seed=5, voxel_size=VOXEL, chunk_shape=CHUNK)
    prepare_ds(
        str(tmp_path / "v.zarr" / "mask"),
        shape=SHAPE,
        offset=(0, 0, 0),
        voxel_size=VOXEL,
        chunk_shape=CHUNK,
        dtype=np.uint8,
    )
    (tmp_path / "worker.py").write_text((DATA / "dacapo_style_worker.py").read_text())
    (tmp_path / "pairs.py").write_text(DACAPO_PAIRS)
    return read_array(name)


# -- (7) what spawn_worker takes -----------------------------------------------------------------


def test_the_readme_worker_file_example_runs(raw, tmp_path):
    """README: `voxblock run w.py --input ... -o input_path=... -o output_path=...`: --input gives
    the geometry and is not passed to a spawn_worker that does not take it."""
    result = voxblock_cli(
        "run",
        "worker.py",
        "--input",
        "v.zarr/raw",
        "--block-size",
        "8",
        "-o",
        "input_path=v.zarr/raw",
        "-o",
        "output_path=v.zarr/mask",
        "-o",
        "threshold=0.3",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(read_array(f"{tmp_path}/v.zarr/mask"), (raw > 0.3).astype(np.uint8))
    # output_path is tracked as the output: the run directory sits beside it
    assert (tmp_path / "v.zarr.voxblock" / "mask" / "report.json").exists()


def test_input_and_output_reach_dacapo_container_and_dataset_parameters(raw, tmp_path):
    result = voxblock_cli(
        "run",
        "pairs.py",
        "--input",
        "v.zarr/raw",
        "--output",
        "v.zarr/mask",
        "--block-size",
        "8",
        "-o",
        "threshold=0.6",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(read_array(f"{tmp_path}/v.zarr/mask"), (raw > 0.6).astype(np.uint8))
    assert (tmp_path / "v.zarr.voxblock" / "mask" / "report.json").exists()


def test_input_and_output_reach_dacapo_array_identifiers(raw, tmp_path):
    """dacapo's own worker files: identifiers with .container and .dataset, a compute context, no
    **kwargs (as threshold_worker.py)."""
    (tmp_path / "identifiers.py").write_text(
        DACAPO_PAIRS
        + "\n\ndef spawn_worker(input_array_identifier, output_array_identifier, threshold=0.0,"
        + " compute_context=None):\n"
        + "    i, o = input_array_identifier, output_array_identifier\n"
        + "    return start_worker(i.container, i.dataset, o.container, o.dataset, threshold, True)\n"
    )
    args = ("--input", "v.zarr/raw", "--output", "v.zarr/mask", "--block-size", "8", "-o", "threshold=0.4")
    result = voxblock_cli("run", "identifiers.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(read_array(f"{tmp_path}/v.zarr/mask"), (raw > 0.4).astype(np.uint8))
    assert (tmp_path / "v.zarr.voxblock" / "mask" / "report.json").exists()


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("file", "extra", "message"),
    [
        ("worker.py", ("-o", "output_path=v.zarr/mask"), "needs input_path: give it as -o input_path=VALUE"),
        (
            "worker.py",
            ("-o", "input_path=v.zarr/raw", "-o", "output_path=v.zarr/mask", "-o", "treshold=0.3"),
            "takes no parameter treshold; it takes: input_path, output_path, threshold",
        ),
        (
            "worker.py",
            ("--output", "v.zarr/other", "-o", "input_path=v.zarr/raw", "-o", "output_path=v.zarr/mask"),
            "takes no output, so --output would not be written",
        ),
        ("pairs.py", (), "needs output_container, output_dataset"),
    ],
)
def test_worker_file_arguments_it_cannot_take_are_refused_before_any_work(
    raw, tmp_path, file, extra, message
):
    before = snapshot(tmp_path)
    result = voxblock_cli("run", file, "--input", "v.zarr/raw", "--block-size", "8", *extra, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.bad_input
def test_a_worker_file_missing_an_argument_is_refused_through_the_api(raw, tmp_path):
    before = snapshot(tmp_path)
    with pytest.raises(voxblock.VoxblockError, match="needs output_path"):
        voxblock.run_blockwise(
            str(tmp_path / "worker.py"),
            Roi((0, 0, 0), (64, 48, 48)),
            Roi((0, 0, 0), (32, 16, 16)),
            Roi((0, 0, 0), (32, 16, 16)),
            input_path=f"{tmp_path}/v.zarr/raw",
            progress=False,
        )
    assert snapshot(tmp_path) == before


# -- (8) dacapo's container + dataset names are one array -----------------------------------------


class Identifier:
    """Like dacapo's LocalArrayIdentifier: a container path and a dataset name."""

    def __init__(self, container: str, dataset: str) -> None:
        self.container, self.dataset = Path(container), dataset


def test_outputs_pair_dacapo_container_and_dataset(tmp_path):
    (tmp_path / "pairs.py").write_text(DACAPO_PAIRS)
    given = {"input_container": "in.zarr", "input_dataset": "raw", "output_dataset": "seg/cells"}
    pairs = WorkerFile.load(tmp_path / "pairs.py", (), {**given, "output_container": "out.zarr"})
    assert pairs.outputs() == ["out.zarr/seg/cells"]
    positional = WorkerFile.load(tmp_path / "pairs.py", ("in.zarr", "raw", "o.zarr", "seg"), {})
    assert positional.outputs() == ["o.zarr/seg"]
    (tmp_path / "identifiers.py").write_text(
        "def spawn_worker(input_array_identifier, output_array_identifier, threshold=0.0):\n"
        "    return lambda: None\n"
    )
    identifiers = WorkerFile.load(
        tmp_path / "identifiers.py", (Identifier("in.zarr", "raw"), Identifier("out.zarr", "mask")), {}
    )
    assert identifiers.outputs() == ["out.zarr/mask"]
    # a lone container or dataset is not an array name
    (tmp_path / "loose.py").write_text(
        "def spawn_worker(output_container, output, **kwargs):\n    return None\n"
    )
    loose = WorkerFile.load(tmp_path / "loose.py", (), {"output_container": "o.zarr", "output": 3})
    assert loose.outputs() == []


def test_a_run_with_dacapo_names_tracks_its_output(raw, tmp_path):
    ok = voxblock.run_blockwise(
        str(tmp_path / "pairs.py"),
        Roi((0, 0, 0), (64, 48, 48)),
        Roi((0, 0, 0), (32, 16, 16)),
        Roi((0, 0, 0), (32, 16, 16)),
        2,
        input_container=str(tmp_path / "v.zarr"),
        input_dataset="raw",
        output_container=str(tmp_path / "v.zarr"),
        output_dataset="mask",
        threshold=0.5,
        progress=False,
    )
    assert ok
    np.testing.assert_array_equal(read_array(f"{tmp_path}/v.zarr/mask"), (raw > 0.5).astype(np.uint8))
    assert (tmp_path / "v.zarr.voxblock" / "mask" / "report.json").exists()
    assert not (tmp_path / "voxblock_runs").exists()


# -- (11) errors in the CLI's words; outputs that are not zarr containers -------------------------


def test_cli_wording_speaks_voxels_and_flags():
    voxel = Coordinate(4, 2, 2)
    roi = Roi((0, 0, 0), (32, 16, 16))
    assert (
        cli_wording(f"no block fits in the total ROI {roi} with fit='valid': nothing", voxel)
        == "no block fits in the total ROI 0,0,0:8,8,8 (voxels, OFFSET:SHAPE) with --fit valid: nothing"
    )
    assert cli_wording(
        "the write block (16, 16, 16) is not a multiple of (32, 16, 16) (world units): use "
        "a multiple of (8, 8, 8) voxels, or one worker (num_workers=1, --workers 1)",
        voxel,
    ) == (
        "the write block (4, 8, 8) is not a multiple of (8, 8, 8) (voxels): use "
        "a multiple of (8, 8, 8) voxels, or one worker (--workers 1)"
    )
    assert cli_wording("refusing (pass overwrite=True / --overwrite to replace it)", voxel) == (
        "refusing (pass --overwrite to replace it)"
    )
    assert (
        cli_wording("num_workers must be >= 1; max_retries=-1", None)
        == "--workers must be >= 1; --max-retries -1"
    )
    # numbers that are not world units, or off the voxel grid, are left as they are
    kept = "a different voxel size (4, 2, 2) (the input has (2, 2, 2)) and ROI [1:9, 0:8, 0:8] (8, 8, 8)"
    assert cli_wording(kept, voxel) == kept + " (world units)"
    off_grid = "the block (3, 2, 2) is not a multiple of (8, 4, 4) (world units)"
    assert cli_wording(off_grid, voxel) == off_grid
    assert cli_wording("input and output are the same array (input=a.zarr/b)", voxel) == (
        "input and output are the same array (--input a.zarr/b)"
    )


@pytest.mark.bad_input
def test_a_cli_error_speaks_voxels_and_flags(raw, tmp_path):
    """An existing output chunked 8 voxels, written over in blocks of 4 by two workers."""
    write_array(
        f"{tmp_path}/v.zarr/chunky", np.full(SHAPE, 7, np.float32), voxel_size=VOXEL, chunk_shape=CHUNK
    )
    before = snapshot(tmp_path)
    args = ("--input", "v.zarr/raw", "--output", "v.zarr/chunky", "--block-size", "4", "--workers", "2")
    result = voxblock_cli("run", "scale", *args, "--overwrite", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "num_workers" not in result.stderr and "--workers 1" in result.stderr, result.stderr
    assert "world units" not in result.stderr, result.stderr
    assert "(4, 4, 4)" in result.stderr  # the write block, in voxels
    assert snapshot(tmp_path) == before
    # a block larger than the region: nothing fits, said in voxels
    result = voxblock_cli("run", "scale", *args[:4], "--block-size", "32", "--fit", "valid", cwd=tmp_path)
    assert result.returncode != 0
    assert "0,0,0:16,24,24 (voxels, OFFSET:SHAPE)" in result.stderr, result.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", ["plain directory", "file"])
def test_an_output_container_that_is_not_zarr_is_refused(raw, tmp_path, kind):
    if kind == "file":
        (tmp_path / "out.zarr").write_text("not a container")
    else:
        (tmp_path / "out.zarr" / "notes").mkdir(parents=True)
        (tmp_path / "out.zarr" / "notes" / "a.txt").write_text("mine")
    before = snapshot(tmp_path)
    result = voxblock_cli(
        "run", "scale", "--input", "v.zarr/raw", "--output", "out.zarr/o", "--block-size", "8", cwd=tmp_path
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert ("is a file, not a zarr container" if kind == "file" else "not a zarr container") in result.stderr
    assert snapshot(tmp_path) == before
    with pytest.raises(voxblock.VoxblockError, match="not a zarr container"):
        voxblock.run_blockwise(
            "scale",
            Roi((0, 0, 0), (64, 48, 48)),
            Roi((0, 0, 0), (32, 16, 16)),
            Roi((0, 0, 0), (32, 16, 16)),
            input=f"{tmp_path}/v.zarr/raw",
            output=f"{tmp_path}/out.zarr/o",
            progress=False,
        )
    assert snapshot(tmp_path) == before


def test_an_empty_directory_or_a_funlib_container_is_a_fine_output(raw, tmp_path):
    """An empty directory holds nothing to mix with; v.zarr has no root metadata (funlib), its arrays do."""
    (tmp_path / "empty.zarr").mkdir()
    for output in ("empty.zarr/o", "v.zarr/scaled"):
        result = voxblock_cli(
            "run", "scale", "--input", "v.zarr/raw", "--output", output, "--block-size", "8", cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
        np.testing.assert_allclose(read_array(f"{tmp_path}/{output}"), raw)


# -- (12) the scheduler listens on loopback when every worker is local ----------------------------


def routable_address() -> str:
    """An address of this machine other than loopback (where the default route leaves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the interface
            address = probe.getsockname()[0]
        except OSError:
            address = "127.0.0.1"
    if address.startswith("127."):
        pytest.skip("this machine has no address but loopback")
    return address


def run_listener(tmp_path: Path, record: Path, compute: voxblock.Compute) -> list[dict]:
    record.mkdir()
    (tmp_path / "listener.py").write_text(LISTENER)
    ok = voxblock.run_blockwise(
        str(tmp_path / "listener.py"),
        Roi((0,), (4,)),
        Roi((0,), (1,)),
        Roi((0,), (1,)),
        2,
        record=str(record),
        compute=compute,
        run_dir=tmp_path / f"run-{record.name}",
        progress=False,
    )
    assert ok
    return [json.loads(p.read_text()) for p in record.glob("*.json")]


def test_a_local_run_listens_on_loopback_only(tmp_path, monkeypatch):
    # not even an address given for cluster workers opens a local run to the network
    monkeypatch.setenv("DAISY_HOST", routable_address())
    seen = run_listener(tmp_path, tmp_path / "local", voxblock.Local())
    assert seen
    for worker in seen:
        assert worker["hostname"] == "127.0.0.1"
        assert worker["listening"] == ["0100007F"]  # 127.0.0.1, as /proc/net/tcp writes it


def test_workers_started_by_a_command_get_a_routable_address(tmp_path, monkeypatch):
    address = routable_address()
    monkeypatch.setenv("DAISY_HOST", address)
    seen = run_listener(tmp_path, tmp_path / "command", voxblock.Command(template=()))
    assert seen
    for worker in seen:
        assert worker["hostname"] == address
        assert worker["listening"] and "0100007F" not in worker["listening"]
