"""What segment_blockwise keeps beside its arrays grows with its worker processes, not its
blocks: 512 blocks leave at most 100 bookkeeping files (run directory, edge and lookup tables),
with either stitch and with the halo."""

from __future__ import annotations

import numpy as np
import pytest
from funlib.geometry import Roi

import voxblock
from voxblock.packfile import PackIndex
from voxblock_testing.volumes import blobs, read_array


def bookkeeping(tmp_path, name: str) -> list[str]:
    """Every file segment_blockwise keeps but its arrays of voxels (the segmentation, fragments)."""
    run_dir = tmp_path / "v.zarr.voxblock" / name
    found = [str(p.relative_to(tmp_path)) for p in run_dir.rglob("*") if p.is_file()]
    for table in ("edges", "lut"):
        found += [str(p.relative_to(tmp_path)) for p in (tmp_path / "v.zarr" / f"{name}_{table}").rglob("*")]
    return found


@pytest.mark.parametrize("stitch", ["faces", "context"])
def test_512_blocks_leave_at_most_100_bookkeeping_files(tmp_path, stitch):
    raw = blobs(f"{tmp_path}/v.zarr/raw", (128, 128, 128), chunk_shape=(16, 16, 16), seed=5)
    block = Roi((0, 0, 0), (16, 16, 16))
    ok = voxblock.segment_blockwise(
        "threshold-label",
        (1, 1, 1),
        Roi((0, 0, 0), (128, 128, 128)),
        block,
        block,
        num_workers=2,
        input=raw,
        output=f"{tmp_path}/v.zarr/seg",
        parameters={"threshold": 0.5, "connectivity": 26},
        progress=False,
        stitch=stitch,
    )
    assert ok
    files = bookkeeping(tmp_path, "seg")
    print(f"{stitch}: {len(files)} bookkeeping files for 512 blocks")
    assert len(files) <= 100, sorted(files)
    run_dir = tmp_path / "v.zarr.voxblock" / "seg"
    edges = PackIndex(run_dir / "edges", "edges")
    edges.refresh()
    assert len(edges) == 512  # every block's record, in a few packs
    if stitch == "context":  # the halo kept the slabs of many chunks, in a few files
        assert any((run_dir / "fragments" / "halo").rglob("*.idx"))
    # and the segmentation is the whole-volume one (the other method, a different layout)
    other = "context" if stitch == "faces" else "faces"
    assert voxblock.segment_blockwise(
        "threshold-label",
        (1, 1, 1),
        Roi((0, 0, 0), (128, 128, 128)),
        block,
        block,
        num_workers=2,
        input=raw,
        output=f"{tmp_path}/v.zarr/check",
        parameters={"threshold": 0.5, "connectivity": 26},
        progress=False,
        stitch=other,
        halo=False,
    )
    a, b = read_array(f"{tmp_path}/v.zarr/seg"), read_array(f"{tmp_path}/v.zarr/check")
    # the same partition: each segment of one is one segment of the other
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def test_an_old_run_directory_of_one_file_per_block_starts_afresh(tmp_path):
    """A run directory of the earlier layout (edges/<block>.npy) is another segmentation's: its
    files are removed, never read as this one's."""
    raw = blobs(f"{tmp_path}/v.zarr/raw", (32, 32, 32), chunk_shape=(16, 16, 16), seed=5)
    run_dir = tmp_path / "v.zarr.voxblock" / "seg"
    (run_dir / "edges").mkdir(parents=True)
    np.save(run_dir / "edges" / "0.npy", np.array([0, 1, 99], np.uint64))
    (run_dir / "segment.json").write_text('{"key": "an older layout"}')
    block = Roi((0, 0, 0), (16, 16, 16))
    assert voxblock.segment_blockwise(
        "threshold-label",
        (1, 1, 1),
        Roi((0, 0, 0), (32, 32, 32)),
        block,
        block,
        input=raw,
        output=f"{tmp_path}/v.zarr/seg",
        parameters={"threshold": 0.5},
        progress=False,
        serial=True,
    )
    assert not (run_dir / "edges" / "0.npy").exists()
