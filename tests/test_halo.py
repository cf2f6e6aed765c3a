"""Halo reads equal plain zarr reads: random arrays, chunks, ROIs, thickness, missing slabs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from funlib.geometry import Coordinate, Roi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voxblock import arrays, halo
from voxblock.halo import Halo, chunks_in, chunks_touched, plan_thickness, slab_boxes, slab_holding
from voxblock.packfile import PackIndex
from voxblock_testing.volumes import write_array


@st.composite
def cases(draw):
    dims = draw(st.integers(2, 3))
    chunk = tuple(draw(st.integers(2, 6)) for _ in range(dims))
    shape = tuple(draw(st.integers(1, 3 * c + 2)) for c in chunk)
    thickness = tuple(draw(st.integers(1, max(1, c - 1))) for c in chunk)
    voxel = draw(st.sampled_from([1, 2]))
    channels = draw(st.sampled_from([0, 1]))
    offset = tuple(voxel * draw(st.integers(-3, 3)) for _ in range(dims))
    reads = []
    for _ in range(draw(st.integers(1, 4))):
        begin = tuple(o + voxel * draw(st.integers(-3, s)) for o, s in zip(offset, shape))
        size = tuple(voxel * draw(st.integers(1, s + 4)) for s in shape)
        reads.append(Roi(begin, size))
    drop = draw(st.lists(st.integers(0, 200), max_size=5))
    zero_from = tuple(draw(st.integers(0, s)) for s in shape)
    return dims, chunk, shape, thickness, voxel, channels, offset, reads, drop, zero_from


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_halo_read_equals_zarr_read(tmp_path_factory, case):
    dims, chunk, shape, thickness, voxel, channels, offset, reads, drop, zero_from = case
    tmp = tmp_path_factory.mktemp("halo")
    rng = np.random.default_rng(0)
    full = (2,) * channels + shape
    data = rng.integers(1, 1000, size=full).astype(np.int32)
    # zeros (the fill value) from a corner on: zarr stores no chunk that holds only them
    data[(..., *(slice(z, None) for z in zero_from))] = 0
    name = write_array(
        f"{tmp}/v.zarr/a",
        data,
        voxel_size=(voxel,) * dims,
        offset=offset,
        chunk_shape=chunk,
        channel_dims=channels,
    )
    array = arrays.open_input(name)
    kept = Halo(str(tmp / "halo"), thickness)
    # the pre-pass: every chunk's slabs, then some of them lost
    halo.keep(array, kept, array.roi, arrays.read(array, array.roi))
    store = kept.store()
    store.index.refresh()
    keys = sorted(entry.key for entry in store.index.entries())
    for i in drop:  # forgotten: a tombstone hides the chunk's slabs
        if keys:
            store.append(keys[i % len(keys)], tombstone=True)
    for roi in reads:
        expected = arrays.read(array, roi, fill_value=-1)
        got = halo.read(array, roi, -1, kept)
        np.testing.assert_array_equal(got, expected)


def test_writes_keep_slabs_that_match_the_chunks(tmp_path):
    data = np.zeros((8, 8, 8), dtype=np.uint16)
    name = write_array(f"{tmp_path}/v.zarr/a", data, chunk_shape=(4, 4, 4))
    kept = Halo(str(tmp_path / "halo"), (1, 1, 1))
    array, plain = arrays.open_output(name), arrays.open_output(name)
    halo.use_halos([array], {name: kept})
    assert array.block_io is kept
    assert plain.block_io is None  # only the arrays it is given to
    block = Roi((0, 0, 4), (4, 4, 4))
    arrays.write(array, block, np.full((4, 4, 4), 7, np.uint16))

    def kept_slabs() -> bool:  # as another process sees the halo
        index = PackIndex(tmp_path / "halo", halo.KIND)
        index.refresh()
        return index.get(halo.chunk_key((0, 0, 1))) is not None

    assert kept_slabs()
    # rewriting part of a chunk hides its slabs (they would be stale)
    arrays.write(array, Roi((0, 0, 4), (2, 4, 4)), np.full((2, 4, 4), 9, np.uint16))
    assert not kept_slabs()
    arrays.write(array, block, np.arange(64, dtype=np.uint16).reshape(4, 4, 4))
    read = Roi((-1, -1, 3), (6, 6, 6))
    np.testing.assert_array_equal(arrays.read(array, read), arrays.read(plain, read))


def test_a_job_gives_its_halos_to_the_arrays_its_worker_opened(tmp_path):
    """The read strategy travels with the job: after the worker's setup, each array it opened
    that the job keeps a halo for reads through it; the others read straight from their chunks."""
    from voxblock.job import Job
    from voxblock.workers import Worker

    data = np.arange(512, dtype=np.uint16).reshape(8, 8, 8)
    name = write_array(f"{tmp_path}/v.zarr/a", data, chunk_shape=(4, 4, 4))
    other = write_array(f"{tmp_path}/v.zarr/b", data, chunk_shape=(4, 4, 4))

    @dataclasses.dataclass
    class Opens(Worker):
        def setup(self) -> None:
            self.kept = arrays.open_input(name)
            self.plain = arrays.open_output(other)

    kept = Halo(str(tmp_path / "halo"), (1, 1, 1), from_reads=True)
    worker = Opens()
    Job(worker, tmp_path / "run", halos={name: kept}).setup()
    assert worker.kept.block_io is kept
    assert worker.plain.block_io is None
    read = Roi((-1, 3, 3), (6, 6, 6))
    np.testing.assert_array_equal(arrays.read(worker.kept, read), arrays.read(worker.plain, read))
    assert any((tmp_path / "halo").iterdir())  # the read kept the slabs of the chunks it decoded


def test_slab_geometry():
    chunk = ((0, 0), (4, 6))
    assert slab_boxes(chunk, (1, 2)) == [
        ((0, 0), (1, 6)),
        ((3, 0), (4, 6)),
        ((0, 0), (4, 2)),
        ((0, 4), (4, 6)),
    ]
    assert slab_holding(((3, 1), (4, 3)), chunk, (1, 2)) == 1
    assert slab_holding(((1, 1), (3, 3)), chunk, (1, 2)) is None
    # a chunk clipped by the array's end has slabs no thicker than itself
    assert slab_boxes(((8, 0), (9, 4)), (2, 1))[:2] == [((8, 0), (9, 4)), ((8, 0), (9, 4))]
    assert list(chunks_in((9, 4), (4, 4), ((-1, -1), (5, 2)))) == [
        ((0, 0), ((0, 0), (4, 4))),
        ((1, 0), ((4, 0), (8, 4))),
    ]


@pytest.mark.parametrize(
    ("block", "context", "chunk", "expected"),
    [
        (64, 1, 64, (1, 1, 1)),  # 27 chunks for 1: worth a halo
        (64, 0, 64, None),  # no context
        (256, 1, 64, (1, 1, 1)),  # 6^3 / 4^3 = 3.4
        (64, 40, 64, None),  # slabs as thick as the chunks
        (1024, 1, 64, None),  # 18^3 / 16^3 = 1.4: not worth it
    ],
)
def test_plan_thickness(block, context, chunk, expected):
    write = Roi((0, 0, 0), (block,) * 3)
    read = write.grow(context, context)
    got = plan_thickness(read, write, Coordinate((1, 1, 1)), Coordinate((chunk,) * 3), Coordinate((0, 0, 0)))
    assert (tuple(got) if got is not None else None) == expected


def test_chunks_touched():
    chunk = Coordinate((64, 64, 64))
    origin = Coordinate((0, 0, 0))
    assert chunks_touched(Roi((0, 0, 0), (64, 64, 64)), origin, chunk) == 1
    assert chunks_touched(Roi((-1, -1, -1), (66, 66, 66)), origin, chunk) == 27
    assert chunks_touched(Roi((-1, -1, -1), (66, 66, 66)), Coordinate((-1, -1, -1)), chunk) == 8


def _halo_files(run_dir) -> int:
    return sum(1 for _ in run_dir.rglob("halo/*/*.*"))


def _halo_chunks(run_dir) -> int:
    """Chunks whose slabs some worker kept, in all the halos of a run."""
    found = 0
    for directory in {path.parent for path in run_dir.rglob("halo/*/*.idx")}:
        index = PackIndex(directory, halo.KIND)
        index.refresh()
        found += len(index)
    return found


def test_segment_with_and_without_halo_real_scheduler(tmp_path):
    """Two real workers; a halo on the input and on the fragments changes nothing but speed."""
    import voxblock
    from voxblock_testing.volumes import blobs, read_array

    raw = blobs(f"{tmp_path}/v.zarr/raw", (48, 48, 32), chunk_shape=(16, 16, 16), seed=3)
    block = Roi((0, 0, 0), (16, 16, 16))
    outputs = {}
    for halo_choice in (None, False):
        output = f"{tmp_path}/v.zarr/seg_{halo_choice}"
        ok = voxblock.segment_blockwise(
            "threshold-label",
            (1, 1, 1),
            Roi((0, 0, 0), (48, 48, 32)),
            block,
            block,
            num_workers=2,
            input=raw,
            output=output,
            parameters={"threshold": 0.5, "connectivity": 26},
            progress=False,
            halo=halo_choice,
            stitch="context",  # the context is what the halo serves
        )
        assert ok
        outputs[halo_choice] = read_array(output)
        run_dir = tmp_path / "v.zarr.voxblock" / f"seg_{halo_choice}"
        # 18 input chunks and 18 fragment chunks keep slabs; none when switched off
        assert _halo_chunks(run_dir) == (36 if halo_choice is None else 0)
        # in two files (records, index) per worker process and array, not one per chunk
        assert _halo_files(run_dir) <= (2 * 2 * 2 if halo_choice is None else 0)
    np.testing.assert_array_equal(outputs[None], outputs[False])


def test_cli_no_halo(tmp_path):
    from click.testing import CliRunner

    from voxblock.cli import main
    from voxblock_testing.volumes import random_raw

    raw = random_raw(f"{tmp_path}/v.zarr/raw", (32, 32, 32), chunk_shape=(16, 16, 16), seed=2)
    for flag in ("--halo", "--no-halo"):
        result = CliRunner().invoke(
            main,
            [
                "segment",
                "threshold-label",
                "--input",
                raw,
                "--output",
                f"{tmp_path}/v.zarr/seg{flag}",
                "--block-size",
                "16",
                "--context",
                "1",
                "-p",
                "threshold=0.5",
                "--workers",
                "1",
                "--no-progress",
                "--stitch",
                "context",
                flag,
            ],
        )
        assert result.exit_code == 0, result.output
        assert (_halo_files(tmp_path / "v.zarr.voxblock" / f"seg{flag}") > 0) == (flag == "--halo")


def test_plan_thickness_forced_wherever_the_context_is_thinner_than_a_chunk():
    write = Roi((0, 0, 0), (1024,) * 3)
    chunk, voxel, origin = Coordinate((64,) * 3), Coordinate((1, 1, 1)), Coordinate((0, 0, 0))
    assert plan_thickness(write.grow(1, 1), write, voxel, chunk, origin) is None  # does not pay
    assert tuple(plan_thickness(write.grow(1, 1), write, voxel, chunk, origin, force=True)) == (1, 1, 1)
    assert plan_thickness(write.grow(64, 64), write, voxel, chunk, origin, force=True) is None


@pytest.mark.bad_input
def test_a_halo_that_is_not_a_choice_is_refused_before_anything_is_written(tmp_path):
    import voxblock
    from voxblock_testing.volumes import random_raw

    raw = random_raw(f"{tmp_path}/v.zarr/raw", (16, 16, 16), chunk_shape=(8, 8, 8), seed=1)
    block = Roi((0, 0, 0), (8, 8, 8))
    with pytest.raises(voxblock.VoxblockError, match="halo must be True, False or None"):
        voxblock.BlockwiseTask(
            "threshold",
            Roi((0, 0, 0), (16, 16, 16)),
            block,
            block,
            input=raw,
            output=f"{tmp_path}/v.zarr/m",
            halo="yes",
        )
    assert not (tmp_path / "v.zarr" / "m").exists()
    assert not (tmp_path / "v.zarr.voxblock").exists()
