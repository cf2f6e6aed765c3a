"""Outputs on disk as users have them: sharded zarr v3, zarr v2 containers.

Through the real scheduler: two blocks that run at once must never share a
write unit (a shard, else a chunk), an output takes its container's zarr
format, and a sharded output can be asked for and is written exactly.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from funlib.geometry import Roi
from funlib.persistence import open_ds, prepare_ds
from hypothesis import given
from hypothesis import strategies as st

import voxblock
from voxblock.errors import VoxblockError
from voxblock.layout import plan_layout
from voxblock_testing.volumes import random_raw, read_array

SHAPE = (128, 128, 128)


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(path.relative_to(root)): (path.read_bytes() if path.is_file() else None)
        for path in sorted(root.rglob("*"))
    }


@pytest.fixture
def raw(tmp_path, monkeypatch) -> str:
    monkeypatch.chdir(tmp_path)
    return random_raw(str(tmp_path / "in.zarr" / "raw"), SHAPE, seed=3, chunk_shape=(64, 64, 64))


def threshold(raw: str, output: str, block: int, workers: int, **options) -> bool:
    total = Roi((0, 0, 0), SHAPE)
    roi = Roi((0, 0, 0), (block,) * 3)
    return voxblock.run_blockwise(
        "threshold",
        total_roi=total,
        read_roi=roi,
        write_roi=roi,
        num_workers=workers,
        progress=False,
        input=raw,
        output=output,
        threshold=0.5,
        **options,
    )


def expected_mask(raw: str) -> np.ndarray:
    return (read_array(raw) > 0.5).astype(np.uint8)


def segment(raw: str, output: str, **options) -> bool:
    return voxblock.segment_blockwise(
        "threshold-label",
        context=(1, 1, 1),
        total_roi=Roi((0, 0, 0), SHAPE),
        read_roi=Roi((0, 0, 0), (64, 64, 64)),
        write_roi=Roi((0, 0, 0), (64, 64, 64)),
        num_workers=2,
        input=raw,
        output=output,
        parameters={"threshold": 0.5},
        progress=False,
        **options,
    )


def sharded_output(path: Path, shards: int, chunks: int) -> str:
    """An empty output made by zarr itself, sharded, with funlib's metadata (as a user makes one)."""
    array = zarr.create_array(
        store=str(path), shape=SHAPE, chunks=(chunks,) * 3, shards=(shards,) * 3, dtype="uint8"
    )
    array.attrs.put(
        {"voxel_size": [1, 1, 1], "offset": [0, 0, 0], "axis_names": ["z", "y", "x"], "units": ["", "", ""]}
    )
    return str(path)


@pytest.mark.bad_input
def test_blocks_smaller_than_a_shard_are_refused_before_any_work(raw, tmp_path):
    # 64^3 blocks into 128^3 shards of 32^3 chunks: four workers would rewrite shared shards
    output = sharded_output(tmp_path / "out.zarr" / "mask", shards=128, chunks=32)
    before = snapshot(tmp_path / "out.zarr")
    with pytest.raises(VoxblockError, match=r"shards of \(128, 128, 128\) world units.*--workers 1"):
        threshold(raw, output, block=64, workers=4, overwrite=True)
    assert snapshot(tmp_path / "out.zarr") == before
    assert not list(tmp_path.glob("out.zarr/*.voxblock"))


def test_blocks_that_own_whole_shards_write_every_voxel(raw, tmp_path):
    output = sharded_output(tmp_path / "out.zarr" / "mask", shards=64, chunks=32)
    assert threshold(raw, output, block=128, workers=2, overwrite=True)
    np.testing.assert_array_equal(read_array(output), expected_mask(raw))


def test_one_worker_may_write_blocks_smaller_than_a_shard(raw, tmp_path):
    output = sharded_output(tmp_path / "out.zarr" / "mask", shards=128, chunks=32)
    assert threshold(raw, output, block=64, workers=1, overwrite=True)
    np.testing.assert_array_equal(read_array(output), expected_mask(raw))


@pytest.mark.bad_input
def test_segment_overwrite_into_a_shared_shard_is_refused(raw, tmp_path):
    output = tmp_path / "out.zarr" / "cells"
    array = zarr.create_array(
        store=str(output), shape=SHAPE, chunks=(32,) * 3, shards=(128,) * 3, dtype="uint64"
    )
    array.attrs.put({"voxel_size": [1, 1, 1], "offset": [0, 0, 0]})
    before = snapshot(tmp_path / "out.zarr")
    with pytest.raises(VoxblockError, match=r"shards of \(128, 128, 128\) world units"):
        segment(raw, str(output), overwrite=True)
    assert snapshot(tmp_path / "out.zarr") == before


@pytest.mark.parametrize("workers", [1, 2])
def test_sharded_output_on_request(raw, tmp_path, workers):
    output = str(tmp_path / "out.zarr" / "mask")
    assert threshold(
        raw, output, block=64, workers=workers, shard_shape=(64, 64, 64), chunk_shape=(16, 32, 32)
    )
    written = zarr.open_array(output, mode="r")
    assert written.shards == (64, 64, 64)
    assert written.chunks == (16, 32, 32)
    np.testing.assert_array_equal(written[...], expected_mask(raw))
    # one file per block: 8 shards, not 64 chunk files per block
    shard_files = [p for p in Path(output, "c").rglob("*") if p.is_file()]
    assert len(shard_files) == 8


@pytest.mark.bad_input
def test_a_shard_that_does_not_divide_the_block_is_refused(raw, tmp_path):
    with pytest.raises(VoxblockError, match="must divide the write block"):
        threshold(raw, str(tmp_path / "out.zarr" / "mask"), block=64, workers=2, shard_shape=(48, 64, 64))
    assert not (tmp_path / "out.zarr").exists()


def zarr_v2_input(tmp_path: Path) -> str:
    """An input in a zarr v2 container, written by funlib.persistence as many users' data is."""
    data = np.random.default_rng(5).random(SHAPE, dtype=np.float32)
    array = prepare_ds(
        str(tmp_path / "v2.zarr" / "raw"),
        shape=SHAPE,
        offset=(0, 0, 0),
        voxel_size=(1, 1, 1),
        chunk_shape=(64, 64, 64),
        dtype=np.float32,
        mode="w",
        zarr_format=2,
    )
    array[array.roi] = data
    zarr.open_group(str(tmp_path / "v2.zarr"), mode="a", zarr_format=2)
    return str(tmp_path / "v2.zarr" / "raw")


def test_an_output_takes_its_zarr_v2_containers_format(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = zarr_v2_input(tmp_path)
    output = str(tmp_path / "v2.zarr" / "masks" / "fg")
    assert threshold(raw, output, block=64, workers=2)
    # zarr 2's own files: .zarray and .zattrs, and groups (.zgroup) above it
    meta = json.loads((Path(output) / ".zarray").read_text())
    assert meta["zarr_format"] == 2 and meta["chunks"] == [64, 64, 64]
    assert (tmp_path / "v2.zarr" / "masks" / ".zgroup").is_file()
    assert not (Path(output) / "zarr.json").exists()
    group = zarr.open_group(str(tmp_path / "v2.zarr"), mode="r")
    assert "masks/fg" in dict(group.members(max_depth=None))
    written = open_ds(output)
    assert written.voxel_size == (1, 1, 1)
    np.testing.assert_array_equal(written.to_ndarray(written.roi), expected_mask(raw))


def test_segmentation_in_a_zarr_v2_container_is_zarr_v2_throughout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = zarr_v2_input(tmp_path)
    output = str(tmp_path / "v2.zarr" / "cells")
    assert segment(raw, output)
    for meta in (tmp_path / "v2.zarr").rglob("zarr.json"):
        pytest.fail(f"a zarr v3 node inside a zarr v2 container: {meta}")
    assert json.loads((Path(output) / ".zarray").read_text())["zarr_format"] == 2


def test_a_new_container_is_a_zarr_v3_group_that_lists_its_output(raw, tmp_path):
    output = str(tmp_path / "new.zarr" / "a" / "mask")
    assert threshold(raw, output, block=64, workers=2)
    group = zarr.open_group(str(tmp_path / "new.zarr"), mode="r")
    assert group.metadata.zarr_format == 3
    assert "a/mask" in dict(group.members(max_depth=None))


@pytest.mark.bad_input
def test_shards_in_a_zarr_v2_container_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = zarr_v2_input(tmp_path)
    before = snapshot(tmp_path / "v2.zarr")
    with pytest.raises(VoxblockError, match="zarr v2 has no shards"):
        threshold(raw, str(tmp_path / "v2.zarr" / "mask"), block=64, workers=2, shard_shape=(64, 64, 64))
    after = snapshot(tmp_path / "v2.zarr")
    assert {k: v for k, v in after.items() if not k.startswith("mask")} == before


@pytest.mark.bad_input
def test_a_shard_only_tiny_chunks_divide_is_refused(raw, tmp_path):
    with pytest.raises(VoxblockError, match="no chunk of 16-64 voxels divides"):
        threshold(raw, str(tmp_path / "out.zarr" / "mask"), block=97, workers=1, shard_shape=(97, 97, 97))
    assert not (tmp_path / "out.zarr").exists()


def test_reading_one_chunk_of_a_large_shard_reads_little_of_its_file(tmp_path):
    """Inputs' shards may be far larger than a block (webknossos, OME-NGFF 0.5 writers)."""
    from voxblock.chunks import DirectChunks

    source = zarr.create_array(
        str(tmp_path / "big.zarr"), shape=(128, 128, 128), chunks=(16,) * 3, shards=(128,) * 3, dtype="f4"
    )
    data = np.random.default_rng(2).random((128, 128, 128), dtype=np.float32)
    source[...] = data
    direct = DirectChunks.of(source)
    np.testing.assert_array_equal(direct[16:32, 16:32, 16:32], data[16:32, 16:32, 16:32])
    path = tmp_path / "big.zarr" / "c" / "0" / "0" / "0"
    reads = []

    class Counting(io.BufferedReader):
        def read(self, size=-1):
            chunk = super().read(size)
            reads.append(len(chunk))
            return chunk

    with Counting(io.FileIO(path, "r")) as file:
        stored = direct._shards.read(file, [(1, 1, 1)])
    assert list(stored) == [(1, 1, 1)]
    shard_bytes = path.stat().st_size
    assert sum(reads) < shard_bytes / 50, (reads, shard_bytes)


@given(
    write=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    shard_factor=st.integers(1, 4),
    chunk_divisor=st.integers(1, 3),
    give_chunk=st.booleans(),
)
def test_plan_layout_gives_blocks_whole_shards(write, shard_factor, chunk_divisor, give_chunk):
    shard = [w * 16 for w in write]
    block = [s * shard_factor for s in shard]
    chunk = [s // chunk_divisor if s % chunk_divisor == 0 else s for s in shard] if give_chunk else None
    layout = plan_layout(block, chunk, shard)
    assert tuple(layout.write_unit) == tuple(shard)
    assert all(b % s == 0 for b, s in zip(block, layout.shard))
    assert all(
        s % c == 0 and c <= max(64, s if give_chunk else 64) for s, c in zip(layout.shard, layout.chunk)
    )
    assert tuple(plan_layout(block).write_unit) == tuple(block)


def test_a_sharded_input_read_with_context_equals_the_whole_volume(tmp_path, monkeypatch):
    """The halo asks whether a neighbour's chunk exists: for a sharded input, its shard's file."""
    import cc3d
    from scipy import ndimage

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    data = ndimage.gaussian_filter(rng.random(SHAPE).astype(np.float32), 2)
    data = (data - data.min()) / (data.max() - data.min())
    source = zarr.create_array(
        str(tmp_path / "in.zarr" / "raw"), shape=SHAPE, chunks=(32,) * 3, shards=(64,) * 3, dtype="f4"
    )
    source[...] = data
    source.attrs.put({"voxel_size": [1, 1, 1], "offset": [0, 0, 0]})
    assert voxblock.segment_blockwise(
        "threshold-label",
        context=(2, 2, 2),
        total_roi=Roi((0, 0, 0), SHAPE),
        read_roi=Roi((0, 0, 0), (32, 32, 32)),
        write_roi=Roi((0, 0, 0), (32, 32, 32)),
        num_workers=2,
        input=str(tmp_path / "in.zarr" / "raw"),
        output=str(tmp_path / "out.zarr" / "cells"),
        parameters={"threshold": 0.5},
        stitch="context",
        progress=False,
    )
    cells = read_array(str(tmp_path / "out.zarr" / "cells"))
    expected = cc3d.connected_components(data > 0.5, connectivity=6)
    # equal up to a permutation of IDs: every pair (ours, expected) is one-to-one
    pairs = np.unique(np.stack([cells.ravel(), expected.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def test_cli_writes_a_sharded_output(raw, tmp_path):
    from click.testing import CliRunner

    from voxblock.cli import main

    output = str(tmp_path / "out.zarr" / "mask")
    result = CliRunner().invoke(
        main,
        [
            *("run", "threshold", "--input", raw, "--output", output, "--block-size", "64"),
            *("--workers", "2", "--shard-size", "64", "--chunk-size", "32", "--threshold", "0.5"),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    written = zarr.open_array(output, mode="r")
    assert (written.shards, written.chunks) == ((64, 64, 64), (32, 32, 32))
    np.testing.assert_array_equal(written[...], expected_mask(raw))


@pytest.mark.parametrize("stitch", ["faces", "context"])
def test_a_sharded_segmentation_equals_an_unsharded_one(raw, tmp_path, stitch):
    sharded, plain = str(tmp_path / "out.zarr" / "sharded"), str(tmp_path / "out.zarr" / "plain")
    assert segment(raw, sharded, stitch=stitch, shard_shape=(64, 64, 64), chunk_shape=(32, 32, 32))
    assert segment(raw, plain, stitch=stitch)
    assert zarr.open_array(sharded, mode="r").shards == (64, 64, 64)
    np.testing.assert_array_equal(read_array(sharded), read_array(plain))


@pytest.mark.bad_input
def test_a_segmentation_that_cannot_be_sharded_is_refused_before_pass_one(raw, tmp_path):
    with pytest.raises(VoxblockError, match="must divide the write block"):
        segment(raw, str(tmp_path / "out.zarr" / "cells"), shard_shape=(48, 64, 64))
    assert not (tmp_path / "out.zarr").exists()
