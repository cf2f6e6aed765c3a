"""What `voxblock run` and `voxblock segment` say: refusals of flags before anything is
created, and what --help says about --input/--output, --roi and --fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from voxblock.cli import main
from voxblock_testing.volumes import write_array


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(path.relative_to(root)): (path.read_bytes() if path.is_file() else None)
        for path in sorted(root.rglob("*"))
    }


@pytest.fixture
def volume(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    data = (np.arange(16**3).reshape(16, 16, 16) % 7 > 3).astype(np.float32)
    write_array("v.zarr/raw", data, voxel_size=(4, 2, 2), offset=(8, 0, 4), chunk_shape=(8, 8, 8))
    return tmp_path


def invoke(*arguments: str):
    return CliRunner().invoke(main, list(arguments))


RUN = ("run", "threshold", "--input", "v.zarr/raw", "--output", "v.zarr/mask", "--block-size", "8")
SEGMENT = (
    "segment",
    "threshold-label",
    "--input",
    "v.zarr/raw",
    "--output",
    "v.zarr/seg",
    "--block-size",
    "8",
)


@pytest.mark.bad_input
@pytest.mark.parametrize("command", [RUN, SEGMENT], ids=["run", "segment"])
@pytest.mark.parametrize("roi", ["0,0,0:0,8,8", "2,0,2:8,-4,8", "0,0,0:0"])
def test_a_roi_without_a_positive_shape_is_refused(volume, command, roi):
    before = snapshot(volume)
    result = invoke(*command, "--roi", roi, "--no-progress")
    assert result.exit_code == 1, result.output
    assert f"--roi's shape must be positive on every axis; got {roi}" in result.output
    assert "no block fits" not in result.output and "Traceback" not in result.output
    assert snapshot(volume) == before


@pytest.mark.bad_input
def test_a_missing_output_is_named_as_the_flag(volume):
    before = snapshot(volume)
    result = invoke("run", "threshold", "--input", "v.zarr/raw", "--block-size", "8", "--no-progress")
    assert result.exit_code == 1, result.output
    assert "--output CONTAINER/DATASET is required" in result.output
    assert "array name ''" not in result.output
    result = invoke("run", "threshold", "--output", "v.zarr/mask", "--block-size", "8", "--no-progress")
    assert result.exit_code == 1, result.output
    assert "--input CONTAINER/DATASET is required" in result.output
    assert snapshot(volume) == before


def _option_help(text: str, flag: str) -> str:
    """The help of one option in --help's text, on one line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(flag + " "))
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].strip().startswith("-")),
        len(lines),
    )
    return " ".join(line.strip() for line in lines[start:end])


def test_run_help_marks_input_and_output_required_and_says_how_roi_counts():
    result = invoke("run", "threshold", "--help")
    assert result.exit_code == 0, result.output
    assert "[required]" in _option_help(result.output, "--input")
    assert "[required]" in _option_help(result.output, "--output")
    roi = _option_help(result.output, "--roi")
    assert "OFFSET counts voxels from world 0, not from the input's first voxel" in roi
    assert "voxel i starts at i * voxel size + (the input's offset mod voxel size)" in roi
    fit = _option_help(result.output, "--fit")
    assert "valid (skip every border block whose read ROI leaves the region grown by --context" in fit
    assert "those voxels are not written" in fit


def test_segment_help_says_how_roi_counts():
    result = invoke("segment", "--help")
    assert result.exit_code == 0, result.output
    roi = _option_help(result.output, "--roi")
    assert "OFFSET counts voxels from world 0, not from the input's first voxel" in roi
    assert "[required]" in _option_help(result.output, "--input")


def test_the_roi_offset_counts_from_world_0(volume):
    """--roi 3,0,3:... on an input at offset (8, 0, 4) voxels (2, 0, 2): the input's voxel (1, 0, 1)."""
    result = invoke(*RUN, "--roi", "3,0,3:4,8,8", "--threshold", "0.5", "--no-progress")
    assert result.exit_code == 0, result.output
    from funlib.geometry import Roi
    from funlib.persistence import open_ds

    mask = open_ds(str(volume / "v.zarr" / "mask"))
    raw = open_ds(str(volume / "v.zarr" / "raw"))
    region = Roi((12, 0, 6), (16, 16, 16))
    assert mask.roi.contains(region)
    np.testing.assert_array_equal(mask[region], (raw[region] > 0.5).astype(np.uint8))
