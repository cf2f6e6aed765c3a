"""The synthetic volumes of voxblock-testing: geometry metadata, seeding, values."""

from __future__ import annotations

import numpy as np
import pytest
from funlib.geometry import Coordinate, Roi

from voxblock_testing import volumes


def test_labels_geometry_and_seed(tmp_path):
    name = volumes.random_labels(
        str(tmp_path / "v.zarr/labels"),
        (10, 12, 8),
        voxel_size=(4, 2, 2),
        offset=(8, 0, -4),
        chunk_shape=(5, 6, 4),
        num_labels=5,
        cell=2,
        background=0.3,
        seed=3,
    )
    array = volumes.open_array(name)
    assert array.roi == Roi((8, 0, -4), (40, 24, 16))
    assert array.voxel_size == Coordinate(4, 2, 2)
    assert array._source_data.chunks == (5, 6, 4)
    data = volumes.read_array(name)
    assert data.dtype == np.uint64 and set(np.unique(data)) <= set(range(6)) and 0 in data
    # cells of 2 voxels: constant within each 2x2x2 cell
    assert (data[::2, ::2, ::2] == data[1::2, 1::2, 1::2]).all()
    again = volumes.labels_data((10, 12, 8), num_labels=5, cell=2, background=0.3, seed=3)
    np.testing.assert_array_equal(data, again)
    assert not np.array_equal(data, volumes.labels_data((10, 12, 8), num_labels=5, cell=2, seed=4))


def test_channel_axis(tmp_path):
    name = volumes.blobs(str(tmp_path / "v.zarr/blobs"), (16, 16), channels=3, seed=1)
    array = volumes.open_array(name)
    assert array.channel_dims == 1 and array.shape == (3, 16, 16) and array.roi == Roi((0, 0), (16, 16))
    data = volumes.read_array(name)
    assert not np.array_equal(data[0], data[1])  # channels are independent


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_blobs(ndim, tmp_path):
    shape = (24,) * ndim
    binary = volumes.read_array(volumes.blobs(str(tmp_path / "v.zarr/b"), shape, fraction=0.3, seed=2))
    assert binary.dtype == np.uint8 and set(np.unique(binary)) == {0, 1}
    assert abs(binary.mean() - 0.3) < 0.02
    smooth = volumes.blobs_data(shape, binary=False, sigma=2.0, seed=2)
    assert smooth.dtype == np.float32 and smooth.min() == 0.0 and smooth.max() == 1.0
    # smooth: neighbouring voxels differ much less than random pairs
    step = np.abs(np.diff(smooth, axis=0)).mean()
    shuffled = np.random.default_rng(0).permutation(smooth.ravel())
    assert step < 0.5 * np.abs(np.diff(shuffled)).mean()


def test_affinities_from_labels():
    labels = np.array([[1, 1, 2], [1, 0, 2], [3, 3, 2]])
    affs = volumes.affinities_from_labels(labels, [(-1, 0), (0, -1), (0, 2)])
    assert affs.dtype == np.float32 and affs.shape == (3, 3, 3)
    np.testing.assert_array_equal(affs[0], [[0, 0, 0], [1, 0, 1], [0, 0, 1]])
    np.testing.assert_array_equal(affs[1], [[0, 1, 0], [0, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(affs[2], [[0, 0, 0], [0, 0, 0], [0, 0, 0]])


def test_affinities_written_like_the_labels(tmp_path):
    labels = volumes.random_labels(
        str(tmp_path / "v.zarr/labels"), (8, 10, 6), voxel_size=(2, 1, 1), offset=(4, 0, 0), cell=3, seed=5
    )
    offsets = [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]
    name = volumes.affinities(str(tmp_path / "v.zarr/affs"), labels, offsets)
    array = volumes.open_array(name)
    assert array.channel_dims == 1 and array.dtype == np.float32
    assert array.roi == volumes.open_array(labels).roi and array.voxel_size == Coordinate(2, 1, 1)
    expected = volumes.affinities_from_labels(volumes.read_array(labels), offsets)
    np.testing.assert_array_equal(volumes.read_array(name), expected)
    assert 0 < expected.mean() < 1


def test_predictions_are_a_softmax(tmp_path):
    name = volumes.predictions(str(tmp_path / "v.zarr/p"), (12, 12, 12), channels=4, seed=9)
    data = volumes.read_array(name)
    assert data.shape == (4, 12, 12, 12) and data.dtype == np.float32
    assert (data > 0).all()
    np.testing.assert_allclose(data.sum(axis=0), 1.0, rtol=1e-5)
    assert len(np.unique(data.argmax(axis=0))) == 4  # every class wins somewhere
    np.testing.assert_array_equal(data, volumes.predictions_data((12, 12, 12), channels=4, seed=9))
