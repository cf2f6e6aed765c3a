"""voxblock reads funlib.persistence's metadata itself (no dask in workers): it must agree with
funlib.persistence on every array funlib writes."""

from __future__ import annotations

import numpy as np
from funlib.geometry import Coordinate, Roi
from funlib.persistence import open_ds, prepare_ds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voxblock import arrays


@st.composite
def described_arrays(draw):
    spatial = draw(st.integers(1, 3))
    channels = draw(st.integers(0, 1))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(channels + spatial))
    voxel_size = tuple(draw(st.integers(1, 4)) for _ in range(spatial))
    offset = tuple(v * draw(st.integers(-3, 3)) + draw(st.integers(0, 1)) for v in voxel_size)
    named = draw(st.booleans())
    axis_names = [f"c{i}^" for i in range(channels)] + [f"ax{i}" for i in range(spatial)] if named else None
    units = [draw(st.sampled_from(["nm", "", "um"])) for _ in range(spatial)] if draw(st.booleans()) else None
    types = ["channel"] * channels + ["space"] * spatial if draw(st.booleans()) else None
    if axis_names is None and types is None and channels:
        types = ["channel"] * channels + ["space"] * spatial  # funlib needs one of them to see a channel
    return shape, voxel_size, offset, axis_names, units, types


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(described=described_arrays(), data=st.data())
def test_voxblock_reads_what_funlib_persistence_reads(tmp_path_factory, described, data):
    shape, voxel_size, offset, axis_names, units, types = described
    path = str(tmp_path_factory.mktemp("meta") / "a.zarr" / "x")
    written = prepare_ds(
        path,
        shape=shape,
        offset=offset,
        voxel_size=voxel_size,
        axis_names=axis_names,
        units=units,
        types=types,
        dtype=np.int32,
        mode="w",
    )
    written._source_data[...] = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    theirs, ours = open_ds(path), arrays.open_array(path)
    assert ours.roi == theirs.roi
    assert ours.voxel_size == theirs.voxel_size and ours.offset == theirs.offset
    assert ours.axis_names == list(theirs.axis_names)
    assert ours.units == list(theirs.units)
    assert ours.types == list(theirs.types)
    assert ours.channel_dims == theirs.channel_dims
    begin = [data.draw(st.integers(0, s - 1)) for s in ours.physical_shape]
    size = [data.draw(st.integers(1, s - b)) for b, s in zip(begin, ours.physical_shape)]
    roi = Roi(ours.offset + ours.voxel_size * Coordinate(begin), ours.voxel_size * Coordinate(size))
    np.testing.assert_array_equal(arrays.read(ours, roi), theirs.to_ndarray(roi))
