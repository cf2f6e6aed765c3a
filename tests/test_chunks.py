"""Direct chunk I/O (voxblock.chunks) reads and writes exactly what zarr does."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import zarr
from funlib.geometry import Roi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec, ZstdCodec

from voxblock import arrays
from voxblock.chunks import DirectChunks

COMPRESSORS = {
    "default": "auto",
    "none": None,
    "zstd-checksum": [ZstdCodec(level=3, checksum=True)],
    "blosc-lz4": [BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")],
    "gzip": [GzipCodec(level=1)],
    "crc32c": [ZstdCodec(level=1), Crc32cCodec()],
}


@st.composite
def boxes(draw, shape):
    begin = [draw(st.integers(0, s - 1)) for s in shape]
    end = [draw(st.integers(b + 1, s)) for b, s in zip(begin, shape)]
    return tuple(slice(b, e) for b, e in zip(begin, end))


@st.composite
def layouts(draw):
    dims = draw(st.integers(1, 4))
    shape = tuple(draw(st.integers(1, 13)) for _ in range(dims))
    chunks = tuple(draw(st.integers(1, s + 2)) for s in shape)
    # sharded: each shard a whole number of inner chunks per axis
    shards = tuple(c * draw(st.integers(1, 3)) for c in chunks) if draw(st.booleans()) else None
    return shape, chunks, shards


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    layout=layouts(),
    dtype=st.sampled_from(["uint8", "int16", "uint32", "uint64", "float32", "float64"]),
    compressor=st.sampled_from(sorted(COMPRESSORS)),
    fill=st.sampled_from([0, 3]),
    write_empty=st.booleans(),
    data=st.data(),
)
def test_direct_reads_and_writes_match_zarr(
    tmp_path_factory, layout, dtype, compressor, fill, write_empty, data
):
    shape, chunks, shards = layout
    path = tmp_path_factory.mktemp("chunks") / "a.zarr"
    codecs = COMPRESSORS[compressor]
    created = zarr.create_array(
        str(path), shape=shape, chunks=chunks, shards=shards, dtype=dtype, fill_value=fill, compressors=codecs
    )
    source = zarr.open_array(str(path), mode="r+", config={"write_empty_chunks": write_empty})
    direct = DirectChunks.of(source)
    assert direct is not None
    expected = np.full(shape, fill, dtype=dtype)
    for _ in range(data.draw(st.integers(1, 6))):
        box = data.draw(boxes(shape))
        size = tuple(s.stop - s.start for s in box)
        value = data.draw(st.sampled_from(["random", "fill", "zero"]))
        if value == "random":
            block = np.random.default_rng(data.draw(st.integers(0, 99))).integers(0, 50, size).astype(dtype)
        else:
            block = np.full(size, fill if value == "fill" else 0, dtype=dtype)
        if data.draw(st.booleans()):
            direct[box] = block
        else:
            source[box] = block
        expected[box] = block
        np.testing.assert_array_equal(created[...], expected)
        read_box = data.draw(boxes(shape))
        np.testing.assert_array_equal(direct[read_box], expected[read_box])
        if shards is not None:  # zarr reads every inner chunk voxblock wrote, through the shard index
            np.testing.assert_array_equal(zarr.open_array(str(path), mode="r")[...], expected)
    assert not list(path.rglob("*.partial")), "a temporary chunk file was left behind"
    unit = shards or chunks
    if not write_empty:
        # like zarr, a chunk (or shard) holding only the fill value is not stored
        for index in np.ndindex(*(-(-s // c) for s, c in zip(shape, unit))):
            region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, unit, shape))
            if (expected[region] == fill).all():
                assert not direct.path(index).exists()


@pytest.mark.parametrize("write_empty", [False, True])
@pytest.mark.parametrize("shape", [(16, 16, 8), (14, 13, 8)])  # the second ends inside its edge shards
def test_whole_shards_written_directly_have_zarrs_bytes(tmp_path, write_empty, shape):
    data = np.random.default_rng(1).integers(0, 9, shape).astype("uint16")
    data[:8, :8] = 0  # some inner chunks hold only the fill value: not stored unless write_empty
    config = {"write_empty_chunks": write_empty}
    made = {}
    for name in ("ours", "theirs"):
        zarr.create_array(
            str(tmp_path / f"{name}.zarr"), shape=shape, chunks=(4, 4, 4), shards=(8, 8, 8), dtype="u2"
        )
        made[name] = zarr.open_array(str(tmp_path / f"{name}.zarr"), mode="r+", config=config)
    direct = DirectChunks.of(made["ours"])
    assert direct is not None and direct.unit == (8, 8, 8) and direct.chunks == (4, 4, 4)
    direct[0 : shape[0], 0 : shape[1], 0 : shape[2]] = data
    made["theirs"][...] = data
    for index in np.ndindex(2, 2, 1):
        mine, zarrs = direct.path(index), DirectChunks.of(made["theirs"]).path(index)
        assert mine.exists() == zarrs.exists()
        if mine.exists():
            assert mine.read_bytes() == zarrs.read_bytes()


def test_what_zarr_must_handle_itself_goes_through_zarr(tmp_path):
    v2 = zarr.create_array(str(tmp_path / "v2.zarr"), shape=(8, 8), chunks=(4, 4), dtype="u2", zarr_format=2)
    memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(8, 8), chunks=(4, 4), dtype="u2")
    for source in (v2, memory):
        assert DirectChunks.of(source) is None
    # and voxblock still reads and writes them, through zarr
    for name in ("v2",):
        path = tmp_path / f"{name}.zarr"
        zarr.open_array(str(path), mode="r+").attrs.update({"voxel_size": [1, 1], "offset": [0, 0]})
        array = arrays.open_array(path, mode="r+")
        data = np.arange(36, dtype="u2").reshape(6, 6)
        arrays.write(array, Roi((1, 2), (6, 6)), data)
        np.testing.assert_array_equal(arrays.read(array, Roi((1, 2), (6, 6))), data)
        np.testing.assert_array_equal(zarr.open_array(str(path), mode="r")[1:7, 2:8], data)


def test_direct_access_takes_unit_step_slices_only(tmp_path):
    source = zarr.create_array(str(tmp_path / "a.zarr"), shape=(8, 8), chunks=(4, 4), dtype="u1")
    direct = DirectChunks.of(source)
    with pytest.raises(IndexError):
        direct[0:8:2, 0:8]
    with pytest.raises(IndexError):
        direct[0:8]


def test_an_array_pickles_without_its_chunk_io_and_reads_the_same_after(tmp_path):
    """Workers may carry opened arrays to other processes: the direct I/O is made again there."""
    path = tmp_path / "a.zarr"
    data = np.arange(6 * 8 * 8, dtype="u4").reshape(6, 8, 8)
    zarr.create_array(str(path), shape=data.shape, chunks=(4, 4, 4), dtype="u4")[...] = data
    zarr.open_array(str(path), mode="r+").attrs.update({"voxel_size": [1, 1, 1], "offset": [0, 0, 0]})
    array = arrays.open_array(path, mode="r+")
    roi = Roi((1, 2, 3), (4, 5, 5))
    expected = data[1:5, 2:7, 3:8]
    np.testing.assert_array_equal(array[roi], expected)  # world-unit indexing takes the direct path
    assert isinstance(array._chunk_io, DirectChunks)
    copy = pickle.loads(pickle.dumps(array))
    assert copy._chunk_io is None
    np.testing.assert_array_equal(arrays.read(copy, roi), expected)
    copy[roi] = expected + 1
    np.testing.assert_array_equal(zarr.open_array(str(path), mode="r")[1:5, 2:7, 3:8], expected + 1)


def test_an_untested_zarr_release_goes_through_zarr(tmp_path, monkeypatch):
    """Direct I/O uses zarr's private codec methods: only on releases it was tested against."""
    from voxblock import chunks

    source = zarr.create_array(str(tmp_path / "a.zarr"), shape=(8, 8), chunks=(4, 4), dtype="u2")
    assert chunks.tested_zarr(zarr.__version__), "this zarr is not in TESTED_ZARR: test it, then add it"
    assert DirectChunks.of(source) is not None
    monkeypatch.setattr(zarr, "__version__", "3.9.0")
    assert DirectChunks.of(source) is None
    zarr.open_array(str(tmp_path / "a.zarr"), mode="r+").attrs.update(
        {"voxel_size": [1, 1], "offset": [0, 0]}
    )
    array = arrays.open_array(tmp_path / "a.zarr", mode="r+")
    data = np.arange(36, dtype="u2").reshape(6, 6)
    arrays.write(array, Roi((1, 2), (6, 6)), data)
    np.testing.assert_array_equal(arrays.read(array, Roi((1, 2), (6, 6))), data)
