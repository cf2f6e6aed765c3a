"""Workers as cluster jobs: a real single-node SLURM (ci/slurm.sh), and LSF through a stand-in bsub.

SLURM is started once for the session by `ci/slurm.sh start` (it needs root and apt the first
time). Where it cannot start, the SLURM tests are skipped with the reason, except under CI=true,
where they fail: CI must not pass by skipping them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import cloudpickle
import numpy as np
import pytest
from funlib.geometry import Coordinate, Roi
from funlib.persistence import open_ds, prepare_ds

import voxblock
from voxblock import ArrayWorker, option
from voxblock.cluster import compute_from_config, megabytes
from voxblock.compute import Job
from voxblock.errors import VoxblockError

ROOT = Path(__file__).resolve().parents[1]
SLURM_SH = ROOT / "ci" / "slurm.sh"
SHAPE = (32, 32, 32)
WORLD = Roi((0, 0, 0), SHAPE)
BLOCK = Roi((0, 0, 0), (16, 16, 16))

# the test worker below is shipped to cluster workers by value: they cannot import this module
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass
class Where(ArrayWorker):
    """output = input * factor; one JSON line per attempt: the job it ran in and its options."""

    name: ClassVar[str] = "where"

    directory: str = option("")
    factor: float = option(1.0)
    sleep: float = option(0.0)

    def compute(self, data: np.ndarray, block: Any) -> np.ndarray:
        record = {
            "block": [int(v) for v in block.write_roi.offset],
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "lsf_job": os.environ.get("LSB_JOBID"),
            "factor": self.factor,
            "pid": os.getpid(),
            "time": time.time(),
        }
        with open(Path(self.directory) / f"{os.getpid()}.jsonl", "a") as out:
            out.write(json.dumps(record) + "\n")
        time.sleep(self.sleep)
        return data * self.factor


def records(directory: Path) -> list[dict[str, Any]]:
    """Every attempt `Where` recorded, in time order."""
    found = [json.loads(line) for path in directory.glob("*.jsonl") for line in path.read_text().splitlines()]
    return sorted(found, key=lambda r: r["time"])


# -- fixtures ---------------------------------------------------------------------------------------


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and SLURM is not available: {reason}")
    pytest.skip(f"SLURM is not available: {reason}")


@pytest.fixture(scope="session")
def slurm() -> Any:
    """A running single-node SLURM; stopped at the end if this session started it."""
    was_up = subprocess.run([str(SLURM_SH), "status"], capture_output=True).returncode == 0
    if not was_up:
        try:
            started = subprocess.run([str(SLURM_SH), "start"], capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as error:
            _unavailable(f"ci/slurm.sh start: {error}")
        if started.returncode != 0:
            _unavailable(f"ci/slurm.sh start exited {started.returncode}: {started.stderr.strip()[-500:]}")
    yield
    if not was_up:
        subprocess.run([str(SLURM_SH), "stop"], capture_output=True, timeout=120)


def squeue_empty(wait: float = 20.0) -> str:
    """squeue's listing once it is empty, or what is left after `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        listed = subprocess.run(["squeue", "-h"], capture_output=True, text=True, check=True).stdout.strip()
        if not listed or time.monotonic() > deadline:
            return listed
        time.sleep(0.2)


@pytest.fixture
def raw(tmp_path: Path) -> tuple[str, np.ndarray]:
    data = np.random.default_rng(7).random(SHAPE, dtype=np.float32)
    array = prepare_ds(
        str(tmp_path / "v.zarr" / "raw"),
        shape=SHAPE,
        offset=(0, 0, 0),
        voxel_size=(1, 1, 1),
        chunk_shape=(16, 16, 16),
        dtype=np.float32,
    )
    array._source_data[:] = data
    return f"{tmp_path}/v.zarr/raw", data


# -- SLURM ------------------------------------------------------------------------------------------


def test_threshold_on_slurm_workers_with_their_options_and_logs(slurm, raw, tmp_path):
    name, data = raw
    ok = voxblock.run_blockwise(
        "threshold",
        WORLD,
        BLOCK,
        BLOCK,
        2,
        input=name,
        output=f"{tmp_path}/v.zarr/mask",
        threshold=0.7,  # not the default: the option must reach the cluster workers
        compute=voxblock.Slurm(cpus=1, memory="500M", time_limit="5"),
        progress=False,
    )
    assert ok
    np.testing.assert_array_equal(open_ds(f"{tmp_path}/v.zarr/mask")[WORLD], data > 0.7)
    assert squeue_empty() == ""
    logs = Path(f"{tmp_path}/v.zarr.voxblock/mask/logs/threshold")
    errs = "".join(p.read_text() for p in sorted(logs.glob("worker_*.err")))
    assert "srun --job-name voxblock-threshold-" in errs
    assert "--cpus-per-task 1 --mem 500M --time 5" in errs


@pytest.mark.faults
def test_workers_run_inside_slurm_jobs_and_a_cancelled_job_is_retried(slurm, raw, tmp_path, fault_tally):
    name, data = raw
    seen = tmp_path / "seen"
    seen.mkdir()
    outcome: dict[str, Any] = {}

    def run() -> None:
        outcome["ok"] = voxblock.run_blockwise(
            Where(input=name, output=f"{tmp_path}/v.zarr/out", directory=str(seen), factor=3.0, sleep=1.5),
            WORLD,
            BLOCK,
            BLOCK,
            2,
            max_retries=2,
            compute=voxblock.Slurm(cpus=1, memory="500M"),
            progress=False,
        )

    import threading

    runner = threading.Thread(target=run)
    runner.start()
    deadline = time.monotonic() + 60
    while not records(seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    first = records(seen)
    assert first, "no block started within 60 s"
    victim = first[0]  # this job is inside this block right now (each block sleeps 1.5 s)
    subprocess.run(["scancel", victim["slurm_job"]], check=True)
    runner.join(180)
    assert not runner.is_alive()
    output = open_ds(f"{tmp_path}/v.zarr/out")[WORLD]
    correct = np.allclose(output, data * 3.0)
    fault_tally.add(
        "SLURM job cancelled (scancel) mid-block",
        injected=1,
        survived=bool(outcome.get("ok")) and correct and squeue_empty() == "",
        lost=0 if correct else 1,
    )
    assert outcome["ok"]
    np.testing.assert_allclose(output, data * 3.0)
    attempts = records(seen)
    driver_job = os.environ.get("SLURM_JOB_ID")
    assert all(r["slurm_job"] and r["slurm_job"] != driver_job for r in attempts)
    assert {r["factor"] for r in attempts} == {3.0}
    retried = [r for r in attempts if r["block"] == victim["block"]]
    assert len(retried) >= 2 and retried[-1]["slurm_job"] != victim["slurm_job"]
    report = json.loads(Path(f"{tmp_path}/v.zarr.voxblock/out/report.json").read_text())
    assert report["worker_restarts"] >= 1
    assert squeue_empty() == ""


def test_segment_on_slurm_equals_a_local_run(slurm, tmp_path):
    from scipy import ndimage

    data = ndimage.gaussian_filter(np.random.default_rng(3).random(SHAPE), 2).astype(np.float32)
    array = prepare_ds(
        str(tmp_path / "v.zarr" / "fg"),
        shape=SHAPE,
        offset=(0, 0, 0),
        voxel_size=(1, 1, 1),
        chunk_shape=(16, 16, 16),
        dtype=np.float32,
    )
    array._source_data[:] = data
    threshold = float(np.quantile(data, 0.6))
    results = {}
    for where, extra in (("local", {"serial": True}), ("slurm", {"compute": voxblock.Slurm(cpus=1)})):
        assert voxblock.segment_blockwise(
            "threshold-label",
            Coordinate((1, 1, 1)),
            WORLD,
            BLOCK,
            BLOCK,
            num_workers=2,
            input=f"{tmp_path}/v.zarr/fg",
            output=f"{tmp_path}/v.zarr/seg_{where}",
            parameters={"threshold": threshold, "connectivity": 6},
            progress=False,
            **extra,
        )
        results[where] = open_ds(f"{tmp_path}/v.zarr/seg_{where}")[WORLD]
    assert results["local"].max() > 1
    np.testing.assert_array_equal(results["slurm"], results["local"])
    assert squeue_empty() == ""


def test_cli_run_on_slurm_with_a_config_file(slurm, raw, tmp_path):
    _, data = raw
    (tmp_path / "voxblock.toml").write_text('[cluster]\nkind = "lsf"\nmemory = "500M"\ntime_limit = "5"\n')
    done = subprocess.run(
        [
            *(sys.executable, "-m", "voxblock", "run", "threshold", "--input", "v.zarr/raw"),
            *("--output", "v.zarr/mask", "--block-size", "16", "--threshold", "0.3", "--workers", "2"),
            *("--no-progress", "--cluster", "slurm", "--cpus", "1"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "VOXBLOCK_CONFIG"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    np.testing.assert_array_equal(open_ds(f"{tmp_path}/v.zarr/mask")[WORLD], data > 0.3)
    errs = "".join(p.read_text() for p in (tmp_path / "v.zarr.voxblock/mask/logs").rglob("worker_*.err"))
    # --cluster and --cpus from the command line, memory and time limit from voxblock.toml
    assert "srun --job-name voxblock-threshold-" in errs
    assert "--cpus-per-task 1 --mem 500M --time 5" in errs
    assert squeue_empty() == ""


# -- LSF, through a stand-in bsub -------------------------------------------------------------------

BSUB = """#!{python}
# stand-in for LSF's bsub: accepts what voxblock passes, runs the command here, blocks (-K)
import os, subprocess, sys
args, options, flags = sys.argv[1:], {{}}, []
with open({log!r}, "a") as log:
    log.write(" ".join(args) + "\\n")
while args and args[0].startswith("-"):
    key = args.pop(0)
    if key == "-K":
        flags.append(key)
    else:
        options.setdefault(key, []).append(args.pop(0))
if "-K" not in flags:
    sys.exit("stand-in bsub: only blocking (-K) submission is supported")
job = str(os.getpid())
env = dict(os.environ, LSB_JOBID=job, LSB_JOBNAME=options["-J"][0])
out = open(options["-o"][0].replace("%J", job), "a")
err = open(options["-e"][0].replace("%J", job), "a")
sys.exit(subprocess.run(args, env=env, stdout=out, stderr=err).returncode)
"""

BKILL = """#!/bin/sh
echo "$@" >> {log}
"""


def test_lsf_runs_workers_through_bsub_with_their_options(raw, tmp_path, monkeypatch):
    name, data = raw
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "bsub").write_text(BSUB.format(python=sys.executable, log=str(tmp_path / "bsub.log")))
    (bin_dir / "bkill").write_text(BKILL.format(log=tmp_path / "bkill.log"))
    for tool in ("bsub", "bkill"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    seen = tmp_path / "seen"
    seen.mkdir()
    compute = voxblock.Lsf(cpus=2, memory="1G", queue="short", time_limit="10", flags=("-P", "lab"))
    ok = voxblock.run_blockwise(
        Where(input=name, output=f"{tmp_path}/v.zarr/out", directory=str(seen), factor=-2.0),
        WORLD,
        BLOCK,
        BLOCK,
        2,
        compute=compute,
        progress=False,
    )
    assert ok
    np.testing.assert_allclose(open_ds(f"{tmp_path}/v.zarr/out")[WORLD], data * -2.0)
    attempts = records(seen)
    assert len(attempts) == 8
    assert all(r["lsf_job"] for r in attempts) and {r["factor"] for r in attempts} == {-2.0}
    submitted = (tmp_path / "bsub.log").read_text().splitlines()
    assert submitted
    for line in submitted:
        assert line.startswith("-K -J voxblock-where-")
        assert "-n 2 -R span[hosts=1]" in line and "-R rusage[mem=1024]" in line
        assert "-q short -W 10 -P lab" in line and "-m voxblock.compute" in line
    logs = Path(f"{tmp_path}/v.zarr.voxblock/out/logs/where")
    assert list(logs.glob("worker_*.lsf.out")) and list(logs.glob("worker_*.lsf.err"))
    # after the run, anything left of the run's jobs is killed by job-name pattern
    # (a launcher whose job was still starting when the run ended kills it by its own name first)
    killed = [line.split() for line in (tmp_path / "bkill.log").read_text().splitlines()]
    assert any(
        k[0] == "-J" and k[1].startswith("voxblock-where-") and k[1].endswith("-w*") and k[2] == "0"
        for k in killed
    ), killed


# -- configuration and command lines (no scheduler needed) ------------------------------------------


def test_config_file_sets_resources_and_options_override_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VOXBLOCK_CONFIG", raising=False)
    assert compute_from_config() == (voxblock.Local(), None)
    (tmp_path / "voxblock.toml").write_text(
        '[cluster]\nkind = "slurm"\ncpus = 4\nmemory = "16G"\npartition = "gpu"\n'
        'flags = ["--account=lab"]\nhost = "10.1.2.3"\n'
    )
    compute, host = compute_from_config()
    assert compute == voxblock.Slurm(cpus=4, memory="16G", partition="gpu", flags=("--account=lab",))
    assert host == "10.1.2.3"
    compute, _ = compute_from_config(cpus=8, gpus=1)
    assert (compute.cpus, compute.gpus, compute.memory) == (8, 1, "16G")
    # another kind keeps the resources that apply to it (partition -> queue for LSF)
    compute, _ = compute_from_config(kind="lsf")
    assert compute == voxblock.Lsf(cpus=4, memory="16G", queue="gpu", flags=("--account=lab",))
    other = tmp_path / "other.toml"
    other.write_text('[cluster]\nkind = "command"\ntemplate = ["ssh", "node7"]\n')
    monkeypatch.setenv("VOXBLOCK_CONFIG", str(other))
    assert compute_from_config()[0] == voxblock.Command(template=("ssh", "node7"))
    other.write_text('[cluster]\nkind = "slurm"\ncores = 4\n')
    with pytest.raises(VoxblockError, match="takes no cores"):
        compute_from_config()
    with pytest.raises(VoxblockError, match="takes no cpus"):
        compute_from_config(kind="local", cpus=2)
    with pytest.raises(VoxblockError, match="memory must look like"):
        voxblock.Slurm(memory="lots")
    assert megabytes("500M") == 500 and megabytes("4G") == 4096 and megabytes(2048) == 2048


def test_srun_command_carries_every_resource(tmp_path):
    job = Job(worker=None, run_dir=tmp_path / "run", name="seg-1234")  # type: ignore[arg-type]
    slurm = voxblock.Slurm(
        cpus=2, gpus=1, memory="4G", partition="gpu", time_limit="1:00:00", flags=("-A", "x")
    )
    command = slurm.launch_command(job)
    assert command[: command.index("-m") - 3] == [
        *("srun", "--job-name", "voxblock-seg-1234-w{worker_id}", "--ntasks", "1", "--cpus-per-task", "2"),
        *("--mem", "4096M", "--partition", "gpu", "--time", "1:00:00", "--gres", "gpu:1", "-A", "x"),
    ]
    assert command[-3:] == ["-m", "voxblock.compute", str((tmp_path / "run").resolve())]


def test_bad_compute_is_refused():
    with pytest.raises(VoxblockError, match="compute must be"):
        voxblock.BlockwiseTask("scale", WORLD, BLOCK, BLOCK, compute="slurm")
