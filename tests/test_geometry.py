"""Property tests of the pure block arithmetic (`voxblock.Blocking`), and of its
agreement with daisy's own block enumeration. Cheap: no processes."""

from __future__ import annotations

import daisy.v2 as daisy
import pytest
from funlib.geometry import Coordinate, Roi
from hypothesis import given, settings
from hypothesis import strategies as st

from voxblock import Blocking, VoxblockError
from voxblock_testing.properties import check_blocks
from voxblock_testing.strategies import BlockingCase, blockings


def _keys(blocks):
    return sorted(((tuple(r.offset), tuple(r.shape)), (tuple(w.offset), tuple(w.shape))) for r, w in blocks)


def _volume(roi: Roi) -> int:
    result = 1
    for s in roi.shape:
        result *= s
    return 0 if roi.empty else result


@settings(max_examples=400, deadline=None)
@given(blockings())
def test_fit_mode_properties(case: BlockingCase):
    check_blocks(case, case.blocking.blocks())


@settings(max_examples=300, deadline=None)
@given(blockings(fits=st.just("valid")))
def test_valid_reads_inside_total_and_misses_no_block_that_fits(case: BlockingCase):
    blocking = case.blocking
    blocks = blocking.blocks()
    for read, _ in blocks:
        assert case.total_roi.contains(read)
    # the next block along any axis would read past the total ROI
    stride = case.write_roi.shape
    for read, _ in blocks:
        for d in range(len(stride)):
            step = Coordinate(stride[i] if i == d else 0 for i in range(len(stride)))
            neighbour = read.shift(step)
            if case.total_roi.contains(neighbour):
                assert neighbour in [r for r, _ in blocks]
    if blocks:  # the first block reads from the start of the total ROI
        assert min(tuple(r.begin) for r, _ in blocks) == tuple(case.total_roi.begin)


@settings(max_examples=300, deadline=None)
@given(blockings(fits=st.just("overhang")))
def test_overhang_covers_the_target(case: BlockingCase):
    blocking = case.blocking
    target = blocking.target_roi
    writes = [w for _, w in blocking.blocks()]
    for i, a in enumerate(writes):
        for b in writes[i + 1 :]:
            assert not a.intersects(b)
    assert sum(_volume(w.intersect(target)) for w in writes) == _volume(target)
    for read, write in blocking.blocks():
        assert read.shape == case.read_roi.shape and write.shape == case.write_roi.shape


@settings(max_examples=300, deadline=None)
@given(blockings(fits=st.just("shrink")))
def test_shrink_clips_and_keeps_context(case: BlockingCase):
    blocking = case.blocking
    below, above = blocking.context
    target = blocking.target_roi
    blocks = blocking.blocks()
    assert sum(_volume(w) for _, w in blocks) == _volume(target)
    for read, write in blocks:
        assert case.total_roi.contains(read)
        assert read.grow(-below, -above) == write
        stride = case.write_roi.shape
        if all(write.begin[d] + stride[d] <= target.end[d] for d in range(write.dims)):
            # away from the far border nothing is clipped: the block has its full shape
            assert write.shape == stride
            assert read == Roi(write.begin - below, case.read_roi.shape)
        else:
            # a clipped block ends at the far border of the target region
            assert any(write.end[d] == target.end[d] for d in range(write.dims))


@settings(max_examples=300, deadline=None)
@given(blockings(min_blocks=1))
def test_written_roi_is_the_union_of_writes_in_the_target(case: BlockingCase):
    blocking = case.blocking
    written = blocking.written_roi
    writes = [w.intersect(blocking.target_roi) for _, w in blocking.blocks()]
    assert sum(_volume(w) for w in writes) == _volume(written)
    for w in writes:
        assert written.contains(w)
    assert blocking.first_block() == blocking.blocks()[0]


@settings(max_examples=1000, deadline=None)
@given(blockings())
def test_blocks_equal_daisys_enumeration(case: BlockingCase):
    graph = daisy.BlockwiseDependencyGraph(
        "geometry", case.read_roi, case.write_roi, False, case.fit, total_read_roi=case.total_roi
    )
    theirs = [(block.read_roi, block.write_roi) for block, _ in graph.enumerate_all_dependencies()]
    assert _keys(case.blocking.blocks()) == _keys(theirs)
    assert graph.num_blocks == len(case.blocking.blocks())


@settings(max_examples=200, deadline=None)
@given(blockings(), st.integers(1, 4))
def test_blocks_are_in_grid_order_and_shift_with_the_total_roi(case: BlockingCase, shift: int):
    blocks = case.blocking.blocks()
    writes = [tuple(w.begin) for _, w in blocks]
    assert writes == sorted(writes)
    offset = case.voxel_size * shift
    shifted = Blocking(case.total_roi.shift(offset), case.read_roi, case.write_roi, case.fit).blocks()
    assert _keys(shifted) == _keys([(r.shift(offset), w.shift(offset)) for r, w in blocks])


def test_examples_of_each_fit_mode():
    total, read, write = Roi((0,), (21,)), Roi((0,), (10,)), Roi((2,), (4,))
    assert Blocking(total, read, write, "valid").blocks() == [
        (Roi((0,), (10,)), Roi((2,), (4,))),
        (Roi((4,), (10,)), Roi((6,), (4,))),
        (Roi((8,), (10,)), Roi((10,), (4,))),
    ]
    assert Blocking(total, read, write, "overhang").blocks()[-1] == (Roi((12,), (10,)), Roi((14,), (4,)))
    assert Blocking(total, read, write, "shrink").blocks()[-1] == (Roi((12,), (9,)), Roi((14,), (3,)))


@pytest.mark.parametrize(
    "total, read, write, fit, match",
    [
        (Roi((0,), (10,)), Roi((0,), (4,)), Roi((2,), (4,)), "valid", "must contain"),
        (Roi((0,), (10,)), Roi((0,), (4,)), Roi((0,), (4,)), "clip", "fit must be one of"),
        (Roi((0, 0), (10, 10)), Roi((0,), (4,)), Roi((0,), (4,)), "valid", "different dimensions"),
        (Roi((0,), (10,)), Roi((0,), (4,)), Roi((1,), (0,)), "valid", "empty"),
    ],
)
def test_bad_blockings_are_refused(total, read, write, fit, match):
    with pytest.raises(VoxblockError, match=match):
        Blocking(total, read, write, fit)


def test_check_blocks_catches_wrong_blocks():
    total, read, write = Roi((0,), (21,)), Roi((0,), (10,)), Roi((2,), (4,))
    overhang = Blocking(total, read, write, "overhang")
    blocks = overhang.blocks()
    with pytest.raises(AssertionError, match="cover"):
        check_blocks(overhang, blocks[:-1])  # a missing block leaves part of the target unwritten
    with pytest.raises(AssertionError, match="more than once"):
        check_blocks(overhang, [*blocks, blocks[0]])
    with pytest.raises(AssertionError, match="overlap"):  # same write ROI, another read ROI
        check_blocks(overhang, [*blocks, (blocks[0][0].shift(Coordinate((1,))), blocks[0][1])])
    with pytest.raises(AssertionError, match="off the block grid"):
        check_blocks(overhang, [(r.shift(Coordinate((1,))), w.shift(Coordinate((1,)))) for r, w in blocks])
    valid = Blocking(total, read, write, "valid")
    with pytest.raises(AssertionError, match="leaves the total ROI"):
        check_blocks(valid, blocks)  # the overhanging last block reads past the total ROI
    shrink = Blocking(total, read, write, "shrink")
    with pytest.raises(AssertionError, match="fit=shrink"):
        check_blocks(shrink, blocks)  # not clipped


@settings(max_examples=300, deadline=None)
@given(blockings())
def test_num_blocks_is_the_number_of_blocks(case: BlockingCase):
    blocking = Blocking(case.total_roi, case.read_roi, case.write_roi, case.fit)
    assert blocking.num_blocks == len(blocking.blocks())


def test_roi_slices_index_an_array_by_world_rois():
    """roi_slices: a ROI's voxels in an array whose first voxel is at `origin` (off world 0 too)."""
    import numpy as np

    from voxblock.geometry import roi_slices

    voxel_size = Coordinate(4, 2)
    origin = Coordinate(-6, 1)  # an input at a half-voxel translation
    data = np.arange(10 * 12).reshape(10, 12)
    roi = Roi((10, 5), (12, 8))  # voxels 4..6 and 2..5 from the origin
    assert roi_slices(roi, origin, voxel_size) == (slice(4, 7), slice(2, 6))
    assert roi_slices(roi, tuple(origin), tuple(voxel_size)) == (slice(4, 7), slice(2, 6))
    np.testing.assert_array_equal(data[roi_slices(roi, origin, voxel_size)], data[4:7, 2:6])
    whole = Roi(origin, Coordinate(data.shape) * voxel_size)
    assert data[roi_slices(whole, origin, voxel_size)].shape == data.shape
    assert roi_slices(Roi(origin, (0, 0)), origin, voxel_size) == (slice(0, 0), slice(0, 0))


def test_affinity_offsets_are_given_or_the_arrays_and_checked():
    import numpy as np

    from voxblock.geometry import affinity_offsets

    class Affinities:
        spatial_dims = 2
        shape = (2, 5, 5)
        attrs = {"offsets": [[1, 0], [0, np.int64(1)]]}

    assert affinity_offsets([], Affinities(), "w", "a.zarr/affs") == [[1, 0], [0, 1]]
    assert affinity_offsets([[0, 2], [-1, 0]], Affinities(), "w", "a.zarr/affs") == [[0, 2], [-1, 0]]
    with pytest.raises(VoxblockError, match=r"w: 1 offsets for 2 affinity channels in a\.zarr/affs"):
        affinity_offsets([[0, 2]], Affinities(), "w", "a.zarr/affs")
    for bad in ([[1, 0, 0]], [[True, 0]], [[0.5, 0]], "x"):
        with pytest.raises(VoxblockError, match="w: offsets must be a list of 2-D integer offsets"):
            affinity_offsets(bad, Affinities(), "w", "a.zarr/affs")
    Affinities.attrs = {}
    with pytest.raises(VoxblockError, match="no 'offsets' attribute"):
        affinity_offsets([], Affinities(), "w", "a.zarr/affs")
