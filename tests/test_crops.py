"""A region smaller than the input is segmented as if it were the whole volume.

Border blocks read past the region (their context, or with fit="overhang"
their whole write ROI); joining labels through voxels outside the region
made the labelling of a crop change with the block size.
"""

from __future__ import annotations

import numpy as np
import pytest
from funlib.geometry import Roi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

import voxblock
from voxblock.errors import VoxblockError
from voxblock_testing.volumes import read_array, write_array

SHAPE = (48, 48, 48)


def noise(seed: int) -> np.ndarray:
    data = ndimage.gaussian_filter(np.random.default_rng(seed).random(SHAPE).astype(np.float32), 1.5)
    return (data - data.min()) / (data.max() - data.min())


def same_up_to_ids(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1] and bool(
        ((a == 0) == (b == 0)).all()
    )


def segment_crop(tmp_path, data, crop: Roi, block: int, stitch: str, fit: str, serial: bool, name: str):
    raw = write_array(str(tmp_path / "in.zarr" / "raw"), data, chunk_shape=(16, 16, 16))
    output = str(tmp_path / "out.zarr" / name)
    roi = Roi((0, 0, 0), (block,) * 3)
    assert voxblock.segment_blockwise(
        "threshold-label",
        context=(1, 1, 1),
        total_roi=crop,
        read_roi=roi,
        write_roi=roi,
        num_workers=2,
        input=raw,
        output=output,
        parameters={"threshold": 0.5},
        stitch=stitch,
        fit=fit,
        serial=serial,
        progress=False,
    )
    return read_array(output)


def crop_labels(data: np.ndarray, crop: Roi) -> np.ndarray:
    inside = data[crop.to_slices()]
    labels, _ = ndimage.label(inside > 0.5)
    return labels


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 5),
    begin=st.tuples(*[st.integers(0, 20)] * 3),
    size=st.tuples(*[st.integers(8, 28)] * 3),
    block=st.sampled_from([6, 8, 16]),
    stitch=st.sampled_from(["faces", "context"]),
    fit=st.sampled_from(["overhang", "shrink"]),
)
def test_a_crop_is_labelled_as_the_crop_alone_whatever_the_blocks(
    tmp_path_factory, seed, begin, size, block, stitch, fit
):
    tmp_path = tmp_path_factory.mktemp("crop")
    data = noise(seed)
    crop = Roi(begin, size)
    labels = segment_crop(tmp_path, data, crop, block, stitch, fit, serial=True, name="cells")
    assert labels.shape == tuple(size)
    assert same_up_to_ids(labels, crop_labels(data, crop))


def test_a_crop_through_the_real_scheduler(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = noise(7)
    crop = Roi((5, 9, 13), (30, 33, 27))
    expected = crop_labels(data, crop)
    for block in (8, 16):
        labels = segment_crop(tmp_path, data, crop, block, "auto", "overhang", serial=False, name=f"b{block}")
        assert same_up_to_ids(labels, expected), block


@pytest.mark.bad_input
def test_a_region_outside_the_input_is_refused_before_any_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = write_array(str(tmp_path / "in.zarr" / "raw"), noise(1), chunk_shape=(16, 16, 16))
    with pytest.raises(VoxblockError, match="not inside the input"):
        voxblock.segment_blockwise(
            "threshold-label",
            context=(1, 1, 1),
            total_roi=Roi((40, 0, 0), (16, 48, 48)),
            read_roi=Roi((0, 0, 0), (16, 16, 16)),
            write_roi=Roi((0, 0, 0), (16, 16, 16)),
            num_workers=2,
            input=raw,
            output=str(tmp_path / "in.zarr" / "cells"),
            parameters={"threshold": 0.5},
            progress=False,
        )
    assert sorted(p.name for p in (tmp_path / "in.zarr").iterdir() if p.is_dir()) == ["raw"]
    assert not list(tmp_path.glob("*.voxblock"))
