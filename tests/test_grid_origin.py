"""Inputs whose offset is not a multiple of their voxel size (OME-NGFF pyramid levels at a
half-voxel translation): the voxel grid starts at the input's offset, so ROIs on that grid
run and give the whole-volume result; ROIs off it are refused, naming the nearest on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from funlib.geometry import Coordinate, Roi
from funlib.persistence import open_ds
from scipy import ndimage

import voxblock
from voxblock import Blocking, VoxblockError
from voxblock.cli import cli_wording, main, rois_from_voxels
from voxblock.geometry import check_blocking_on_grid, check_on_grid, is_on_grid, nearest_on_grid

VOXEL = Coordinate(8, 8, 8)
OFFSET = Coordinate(2, 2, 2)
SHAPE = (20, 20, 20)
BLOCK = Roi((0, 0, 0), (32, 32, 32))
# on the input's grid: its offset plus whole voxels, not the whole input
TOTAL = Roi(OFFSET + Coordinate(16, 8, 0), (8 * 14, 8 * 12, 8 * 20))


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(path.relative_to(root)): (path.read_bytes() if path.is_file() else None)
        for path in sorted(root.rglob("*"))
    }


def _data(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), 1.2).astype(np.float32)


@pytest.fixture
def volume(tmp_path, monkeypatch) -> tuple[np.ndarray, float]:
    """v.zarr/raw: funlib attributes voxel_size [8,8,8], offset [2,2,2] (written as is, with zarr)."""
    monkeypatch.chdir(tmp_path)
    data = _data()
    array = zarr.create_array(
        store=str(tmp_path / "v.zarr" / "raw"), shape=SHAPE, chunks=(5, 5, 5), dtype="f4"
    )
    array[:] = data
    array.attrs.put(
        {
            "voxel_size": list(VOXEL),
            "offset": list(OFFSET),
            "axis_names": ["z", "y", "x"],
            "units": ["nm"] * 3,
            "types": ["space"] * 3,
        }
    )
    return data, float(np.quantile(data, 0.7))


def _voxels(roi: Roi) -> tuple[slice, ...]:
    """`roi` as slices of the input's data."""
    return tuple(slice((b - o) // v, (e - o) // v) for b, e, o, v in zip(roi.begin, roi.end, OFFSET, VOXEL))


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


# -- the arithmetic ---------------------------------------------------------------------------


def test_the_grid_starts_at_the_origin():
    assert is_on_grid(Roi((2, 10, -6), (8, 16, 8)), VOXEL, OFFSET)
    assert not is_on_grid(Roi((0, 8, 0), (8, 16, 8)), VOXEL, OFFSET)
    assert not is_on_grid(Roi((2, 2, 2), (8, 12, 8)), VOXEL, OFFSET)
    assert is_on_grid(Roi((0, 8, -8), (8, 16, 8)), VOXEL)  # default origin: world 0
    assert is_on_grid(Roi((18, 10, 2), (8, 8, 8)), VOXEL, (34, 26, 18))  # any origin on the same grid
    inside, around = nearest_on_grid(Roi((0, 5, 2), (80, 80, 84)), VOXEL, OFFSET)
    assert inside == Roi((2, 10, 2), (72, 72, 80)) and around == Roi((-6, 2, 2), (88, 88, 88))
    assert is_on_grid(inside, VOXEL, OFFSET) and is_on_grid(around, VOXEL, OFFSET)


def test_read_and_write_rois_count_only_by_shape_and_context():
    """Blocks start at the total ROI: a block ROI's own offset is off any grid, its context is not."""
    total = Roi(OFFSET, (80, 80, 80))
    check_blocking_on_grid(Blocking(total, Roi((-8, -8, -8), (48, 48, 48)), BLOCK), VOXEL, OFFSET)
    check_blocking_on_grid(
        Blocking(total, Roi((-5, -5, -5), (48, 48, 48)), Roi((3, 3, 3), BLOCK.shape)), VOXEL, OFFSET
    )
    with pytest.raises(VoxblockError, match=r"read ROI .* its offset relative to the write ROI"):
        check_blocking_on_grid(Blocking(total, Roi((-4, -4, -4), (40, 40, 40)), BLOCK), VOXEL, OFFSET)
    with pytest.raises(VoxblockError, match=r"write ROI .* off the voxel grid"):
        check_blocking_on_grid(
            Blocking(total, Roi((0, 0, 0), (40, 32, 32)), Roi((0, 0, 0), (36, 32, 32))), VOXEL, OFFSET
        )


def test_an_off_grid_roi_is_refused_naming_the_grid_and_the_nearest_rois():
    with pytest.raises(VoxblockError) as refused:
        check_on_grid("total ROI", Roi((0, 0, 0), (80, 80, 80)), VOXEL, OFFSET)
    message = str(refused.value)
    assert "total ROI [0:80, 0:80, 0:80] (80, 80, 80) (world units) is off the voxel grid" in message
    assert "must start at the input's offset (2, 2, 2) plus multiples of the voxel size (8, 8, 8)" in message
    assert "[2:74, 2:74, 2:74] (72, 72, 72) (inside it) or [-6:82, -6:82, -6:82] (88, 88, 88)" in message
    # in the CLI's words: on the input's grid, the nearest ROIs are voxels as --roi counts them
    worded = cli_wording(message, VOXEL, OFFSET)
    assert "[0:80, 0:80, 0:80] (80, 80, 80) (world units)" in worded
    assert "0,0,0:9,9,9 (voxels, OFFSET:SHAPE) (inside it) or -1,-1,-1:11,11,11 (voxels" in worded


def test_cli_roi_counts_voxels_of_the_inputs_grid_from_world_0():
    """--roi 2,1,0:14,12,20 on an input at offset (2, 2, 2): voxel i starts at 8 i + 2."""
    input_roi = Roi(OFFSET, VOXEL * Coordinate(SHAPE))
    total, read, write = rois_from_voxels(input_roi, VOXEL, "4", "1", "2,1,0:14,12,20")
    assert total == TOTAL.grow(VOXEL, VOXEL)
    assert (read, write) == (Roi((0, 0, 0), (48, 48, 48)), Roi((8, 8, 8), (32, 32, 32)))
    # an input on the world-0 grid (offset 16 = voxel 2): unchanged, voxel i starts at 8 i
    total, _, _ = rois_from_voxels(Roi((16, 16, 16), (80, 80, 80)), VOXEL, "4", "0", "2,2,2:4,4,4")
    assert total == Roi((16, 16, 16), (32, 32, 32))


# -- real runs ---------------------------------------------------------------------------------


def test_an_output_at_the_inputs_offset_is_placed_by_funlib(volume, tmp_path):
    data, threshold = volume
    assert voxblock.run_blockwise(
        "threshold",
        TOTAL,
        BLOCK,
        BLOCK,
        num_workers=2,
        input="v.zarr/raw",
        output="v.zarr/mask",
        threshold=threshold,
        progress=False,
    )
    attrs = zarr.open_array(str(tmp_path / "v.zarr" / "mask"), mode="r").attrs
    assert attrs["offset"] == list(TOTAL.offset) and attrs["voxel_size"] == list(VOXEL)
    mask = open_ds(str(tmp_path / "v.zarr" / "mask"))
    assert mask.roi == TOTAL
    np.testing.assert_array_equal(mask[TOTAL], (data[_voxels(TOTAL)] > threshold).astype(np.uint8))
    np.testing.assert_array_equal(mask.to_ndarray(TOTAL.grow(VOXEL, VOXEL))[1:-1, 1:-1, 1:-1], mask[TOTAL])


@pytest.mark.parametrize("halo", [False, True])
def test_blocks_with_context_equal_the_whole_volume(volume, tmp_path, halo):
    """Context read through direct chunk I/O, or through the halo, from an array at offset 2."""
    data, threshold = volume
    read = BLOCK.grow(VOXEL, VOXEL)
    for fit in ("overhang", "shrink"):
        output = f"v.zarr/mask_{fit}"
        assert voxblock.run_blockwise(
            "threshold",
            TOTAL.grow(VOXEL, VOXEL),
            read,
            BLOCK,
            num_workers=2,
            input="v.zarr/raw",
            output=output,
            threshold=threshold,
            fit=fit,
            halo=halo,
            chunk_shape=(2, 2, 2),
            progress=False,
        )
        mask = open_ds(str(tmp_path / output))
        assert mask.roi.contains(TOTAL)
        np.testing.assert_array_equal(mask[TOTAL], (data[_voxels(TOTAL)] > threshold).astype(np.uint8))


@pytest.mark.parametrize("stitch", ["faces", "context"])
def test_segment_blockwise_equals_the_whole_volume_labelling(volume, tmp_path, stitch):
    data, threshold = volume
    assert voxblock.segment_blockwise(
        "threshold-label",
        VOXEL,
        TOTAL,
        BLOCK,
        BLOCK,
        2,
        input="v.zarr/raw",
        output="v.zarr/seg",
        parameters={"threshold": threshold},
        stitch=stitch,
        progress=False,
    )
    seg = open_ds(str(tmp_path / "v.zarr" / "seg"))
    assert seg.roi == TOTAL
    expected, count = ndimage.label(data[_voxels(TOTAL)] > threshold)
    assert count > 3
    assert same_partition(seg[TOTAL], expected)


def test_the_cli_runs_on_the_inputs_grid(volume, tmp_path):
    data, threshold = volume
    arguments = ["run", "threshold", "--input", "v.zarr/raw", "--output", "v.zarr/mask", "--block-size", "4"]
    arguments += ["--roi", "2,1,0:14,12,20", "--context", "1", "--threshold", str(threshold), "--no-progress"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(
        open_ds(str(tmp_path / "v.zarr" / "mask"))[TOTAL], (data[_voxels(TOTAL)] > threshold).astype(np.uint8)
    )


@pytest.mark.filterwarnings("ignore:The 'coordinate_transformations' argument is deprecated")
def test_an_ome_ngff_level_at_a_half_voxel_translation(tmp_path):
    """s1 of a pyramid written by ome-zarr-py: scale 8, translation 2 (s0: scale 4, no translation).

    The centre convention, given explicitly: ome-zarr-py 0.18's own (`scale=`) writes s1's
    translation as 0.5, half an s0 voxel in voxels, not in the unit of the scale.
    """
    writer = pytest.importorskip("ome_zarr.writer")
    data = _data(1, (32, 32, 32))
    root = zarr.open_group(str(tmp_path / "img.zarr"), mode="w")
    writer.write_multiscale(
        [data, data.reshape(16, 2, 16, 2, 16, 2).mean(axis=(1, 3, 5))],
        root,
        axes=["z", "y", "x"],
        coordinate_transformations=[
            [{"type": "scale", "scale": [4, 4, 4]}],
            [{"type": "scale", "scale": [8, 8, 8]}, {"type": "translation", "translation": [2, 2, 2]}],
        ],
    )
    s1 = np.asarray(zarr.open_array(str(tmp_path / "img.zarr" / "s1"), mode="r")[...])
    total = Roi((10, 2, 18), (8 * 14, 8 * 16, 8 * 12))
    threshold = float(np.quantile(s1, 0.7))
    output = str(tmp_path / "out.zarr" / "mask")
    assert voxblock.run_blockwise(
        "threshold",
        total,
        BLOCK,
        BLOCK,
        num_workers=2,
        input=str(tmp_path / "img.zarr" / "s1"),
        output=output,
        threshold=threshold,
        progress=False,
    )
    mask = open_ds(output)
    assert mask.roi == total and mask.voxel_size == VOXEL
    np.testing.assert_array_equal(mask[total], (s1[_voxels(total)] > threshold).astype(np.uint8))


# -- refused -----------------------------------------------------------------------------------


@pytest.mark.bad_input
def test_off_grid_rois_are_refused_as_given(volume, tmp_path):
    """Through run_blockwise and segment_blockwise: nothing created, the ROI quoted as passed."""
    before = snapshot(tmp_path)
    for bad in (Roi((0, 0, 0), (80, 80, 80)), Roi((2, 2, 2), (84, 80, 80))):
        with pytest.raises(VoxblockError, match="off the voxel grid") as refused:
            voxblock.run_blockwise(
                "threshold", bad, BLOCK, BLOCK, num_workers=2, input="v.zarr/raw", output="v.zarr/bad"
            )
        assert f"total ROI {bad} (world units)" in str(refused.value)
        with pytest.raises(VoxblockError, match="off the voxel grid") as refused:
            voxblock.segment_blockwise(
                "threshold-label", VOXEL, bad, BLOCK, BLOCK, 2, input="v.zarr/raw", output="v.zarr/seg"
            )
        # the ROI the user passed, not the one grown by the context
        assert f"total ROI {bad} (world units)" in str(refused.value)
        assert "plus multiples of the voxel size" in str(refused.value)
    with pytest.raises(VoxblockError, match=r"context \(12, 8, 8\) must be a multiple of the voxel size"):
        voxblock.segment_blockwise(
            "threshold-label", (12, 8, 8), TOTAL, BLOCK, BLOCK, 2, input="v.zarr/raw", output="v.zarr/seg"
        )
    assert snapshot(tmp_path) == before
