"""The `voxblock` command, run as a user would: a real process per call."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from funlib.persistence import open_ds

from voxblock_testing.volumes import random_raw, read_array

SHAPE = (20, 24, 24)
VOXEL = (4, 2, 2)


def voxblock(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "voxblock", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def raw(tmp_path: Path) -> np.ndarray:
    name = random_raw(
        f"{tmp_path}/v.zarr/raw", SHAPE, seed=3, voxel_size=VOXEL, offset=(8, 0, 4), chunk_shape=(8, 8, 8)
    )
    return read_array(name)


def test_run_converts_voxels_covers_the_input_and_resumes(raw, tmp_path):
    args = (
        "run",
        "scale",
        "--input",
        "v.zarr/raw",
        "--output",
        "v.zarr/out",
        "--block-size",
        "8",
        "--context",
        "1,2,0",
        "--factor",
        "3",
        "--workers",
        "2",
        "--no-progress",
    )
    first = voxblock(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "27 blocks processed" in first.stdout
    out = open_ds(str(tmp_path / "v.zarr" / "out"))
    source = open_ds(str(tmp_path / "v.zarr" / "raw"))
    assert out.roi == source.roi
    assert out._source_data.chunks == (8, 8, 8)
    np.testing.assert_allclose(out[out.roi], raw * 3, rtol=1e-6)
    logs = tmp_path / "v.zarr.voxblock" / "out" / "logs"
    before = {p: p.stat().st_mtime_ns for p in logs.rglob("*") if p.is_file()}
    again = voxblock(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "0 blocks processed, 27 already done" in again.stdout
    # nothing to do: no worker process was started (their logs are untouched)
    assert {p: p.stat().st_mtime_ns for p in logs.rglob("*") if p.is_file()} == before
    report = json.loads((tmp_path / "v.zarr.voxblock" / "out" / "report.json").read_text())
    assert report["skipped"] == 27
    assert list((tmp_path / "v.zarr.voxblock" / "out" / "logs" / "scale").glob("worker_*.out"))


def test_run_a_sub_roi(raw, tmp_path):
    result = voxblock(
        "run",
        "scale",
        "--input",
        "v.zarr/raw",
        "--output",
        "v.zarr/part",
        "--block-size",
        "8",
        "--roi",
        "2,0,2:8,16,8",
        "--shift",
        "1",
        "--no-progress",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = open_ds(str(tmp_path / "v.zarr" / "part"))
    assert tuple(out.roi.offset) == (8, 0, 4) and tuple(out.roi.shape) == (32, 32, 16)
    np.testing.assert_allclose(out[out.roi], raw[:8, :16, :8] + 1, rtol=1e-6)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("run", "nosuchworker", "--block-size", "8"), "unknown worker 'nosuchworker'"),
        (
            ("run", "scale", "--input", "v.zarr/nope", "--output", "v.zarr/o", "--block-size", "8"),
            "no dataset 'nope'",
        ),
        (
            ("run", "scale", "--input", "v.zarr/raw", "--output", "v.zarr/o", "--block-size", "8,8"),
            "has 2 values",
        ),
        (
            (
                "run",
                "scale",
                "--input",
                "v.zarr/raw",
                "--output",
                "v.zarr/o",
                "--block-size",
                "8",
                "--context",
                "-1",
            ),
            "--context must be >= 0",
        ),
        (
            ("run", "scale", "--input", "v.zarr/raw", "--output", "v.zarr/raw", "--block-size", "8"),
            "same array",
        ),
        (
            ("run", "scale", "--input", "raw", "--output", "v.zarr/o", "--block-size", "8"),
            "CONTAINER/DATASET",
        ),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(raw, tmp_path, args, message):
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    result = voxblock(*args, "--no-progress", cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_help_teaches_worker_options_with_defaults(tmp_path):
    top = voxblock("--help", cwd=tmp_path)
    assert top.returncode == 0 and "voxblock demo" in top.stdout
    listed = voxblock("workers", cwd=tmp_path)
    assert "scale" in listed.stdout
    worker = voxblock("run", "scale", "--help", cwd=tmp_path)
    assert worker.returncode == 0
    assert "--factor" in worker.stdout and "[default: 1.0]" in worker.stdout
    assert "--block-size" in worker.stdout and "--timeout" in worker.stdout


def test_demo_runs_and_checks_itself(tmp_path):
    result = voxblock(
        "demo", "--size", "32", "--block-size", "16", "--no-progress", "--dir", "d", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "equals the whole-volume result: yes" in result.stdout
    assert "up to a permutation of IDs: yes" in result.stdout


def test_segment_command_matches_the_whole_volume_labelling(raw, tmp_path):
    from scipy import ndimage

    result = voxblock(
        "segment",
        "threshold-label",
        "--input",
        "v.zarr/raw",
        "--output",
        "v.zarr/cells",
        "--block-size",
        "8",
        "--context",
        "1",
        "-p",
        "threshold=0.6",
        "-p",
        "connectivity=6",
        "--no-progress",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    cells = open_ds(str(tmp_path / "v.zarr" / "cells"))
    labels = cells[cells.roi]
    expected, _ = ndimage.label(raw > 0.6)
    pairs = np.unique(np.stack([labels.ravel(), expected.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
    assert set(np.unique(labels)) == set(range(int(labels.max()) + 1))
    bad = voxblock(
        "segment", "threshold-label", "--input", "v.zarr/raw", "--output", "v.zarr/c2",
        "--block-size", "8", "-p", "threshold", cwd=tmp_path,
    )  # fmt: skip
    assert bad.returncode != 0 and "expected KEY=VALUE" in bad.stderr
