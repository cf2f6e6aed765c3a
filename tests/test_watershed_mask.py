"""The watershed worker's foreground mask, through the real scheduler.

The rule: every affinity edge with an end outside the mask is dropped (never joins) and
voxels outside the mask are 0. So a masked run equals a run without a mask on affinities
whose edges touching the background are made 0 (repulsive with a negative bias), with the
background then set to 0: the same fragments, block by block (the IDs may differ, as each
block renumbers its fragments).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from funlib.geometry import Coordinate, Roi

import voxblock
from voxblock import VoxblockError
from voxblock_testing.volumes import affinities_from_labels, read_array, write_array

OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 2, 2], [3, 0, 0]]


def world_roi(offset, shape) -> Roi:
    return Roi(Coordinate(offset), Coordinate(shape))


def run(total: Roi, read: Roi, write: Roi, **options) -> None:
    options.setdefault("num_workers", 2)
    assert voxblock.run_blockwise("watershed", total, read, write, progress=False, **options)


def assert_same_partition(a: np.ndarray, b: np.ndarray) -> None:
    """`a` and `b` label the same fragments (0 being background in both)."""
    assert a.shape == b.shape
    np.testing.assert_array_equal(a == 0, b == 0)
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1], "a fragment of a is split in b"
    assert len(np.unique(pairs[1])) == pairs.shape[1], "a fragment of b is split in a"


def edges_touching_background_zeroed(affs: np.ndarray, foreground: np.ndarray, offsets) -> np.ndarray:
    """The affinities with every edge (voxel u -- u + offset) that has an end outside the
    foreground set to 0; past the volume is background too (blocks read context there)."""
    out = affs.copy()
    for c, offset in enumerate(offsets):
        src = tuple(slice(max(0, -o), s - max(0, o)) for o, s in zip(offset, foreground.shape))
        dst = tuple(slice(max(0, o), s - max(0, -o)) for o, s in zip(offset, foreground.shape))
        both = np.zeros_like(foreground)
        both[src] = foreground[src] & foreground[dst]
        out[c][~both] = 0
    return out


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_masked_fragments_are_the_foreground_fragments_of_the_edge_dropped_run(tmp_path):
    rng = np.random.default_rng(11)
    shape = (20, 22, 21)
    affs = rng.random((len(OFFSETS), *shape)).astype(np.float32)
    foreground = rng.random(shape) > 0.15
    foreground[:, 9:11, :] = False  # a wall across the volume
    mask = np.where(foreground, 7, 0).astype(np.uint8)  # nonzero, not 1, is foreground
    source = write_array(f"{tmp_path}/v.zarr/affs", affs, channel_dims=1, attrs={"offsets": OFFSETS})
    mask_name = write_array(f"{tmp_path}/v.zarr/mask", mask, chunk_shape=(4, 4, 4))
    total = world_roi((-2, -2, -2), [s + 4 for s in shape])  # context past the volume and the mask
    read, write = world_roi((-2, -2, -2), (12, 12, 12)), world_roi((0, 0, 0), (8, 8, 8))
    common = {"fit": "shrink", "bias": -0.4, "min_size": 3}

    masked = f"{tmp_path}/v.zarr/masked"
    run(total, read, write, **common, input=source, output=masked, mask=mask_name, halo=True)
    result = read_array(masked)
    # the mask was read through its halo (a context input): its slabs were kept
    assert list(tmp_path.glob("**/halo/mask-*"))

    # the same fragments, from a run without a mask on the affinities the rule leaves
    dropped = edges_touching_background_zeroed(affs, foreground, OFFSETS)
    plain_source = write_array(
        f"{tmp_path}/v.zarr/dropped", dropped, channel_dims=1, attrs={"offsets": OFFSETS}
    )
    plain = f"{tmp_path}/v.zarr/plain"
    run(total, read, write, **common, input=plain_source, output=plain)
    expected = np.where(foreground, read_array(plain), 0)

    assert not result[~foreground].any()
    assert_same_partition(result, expected)
    assert len(np.unique(result)) > 50

    # without the mask, fragments do join across the wall: the mask changed something
    unmasked = f"{tmp_path}/v.zarr/unmasked"
    run(total, read, write, **common, input=source, output=unmasked)
    across = read_array(unmasked)
    above, below = set(np.unique(across[:, 8, :])), set(np.unique(across[:, 11, :]))
    assert (above & below) - {0}
    assert not (set(np.unique(result[:, :9, :])) & set(np.unique(result[:, 11:, :]))) - {0}


def test_a_mask_in_segment_blockwise_splits_an_object_it_cuts(tmp_path):
    """segment_blockwise("watershed", mask=...): one object by its affinities, two by the mask."""
    labels = np.zeros((20, 24, 16), dtype=np.uint64)
    labels[2:18, 2:22, 2:14] = 1
    offsets = OFFSETS[:3]
    affs = affinities_from_labels(labels, offsets)
    foreground = np.ones(labels.shape, dtype=bool)
    foreground[:, 11, :] = False  # cuts the object in two, across block borders
    source = write_array(f"{tmp_path}/v.zarr/affs", affs, channel_dims=1, chunk_shape=(8, 8, 8))
    mask_name = write_array(f"{tmp_path}/v.zarr/mask", foreground, chunk_shape=(8, 8, 8))
    world, write = world_roi((0, 0, 0), labels.shape), world_roi((0, 0, 0), (8, 8, 8))
    segments = {}
    for name, extra in (("plain", {}), ("masked", {"mask": mask_name})):
        assert voxblock.segment_blockwise(
            "watershed",
            (1, 1, 1),
            world,
            write,
            write,
            num_workers=2,
            input=source,
            output=f"{tmp_path}/v.zarr/{name}",
            parameters={"offsets": offsets, "bias": -0.5, **extra},
            progress=False,
        )
        segments[name] = read_array(f"{tmp_path}/v.zarr/{name}")
    inside = labels > 0
    assert len(np.unique(segments["plain"][inside])) == 1 and segments["plain"][inside].all()
    masked = segments["masked"]
    assert not masked[~foreground].any()
    assert_same_partition(
        masked, np.where(foreground & inside, np.where(np.arange(24) < 11, 1, 2)[None, :, None], 0)
    )


@pytest.mark.bad_input
def test_bad_masks_are_refused_before_anything_is_created(tmp_path):
    rng = np.random.default_rng(3)
    shape = (16, 16, 16)
    source = write_array(
        f"{tmp_path}/v.zarr/affs", rng.random((3, *shape)).astype(np.float32), channel_dims=1
    )
    ones = np.ones(shape, dtype=np.uint8)
    write_array(f"{tmp_path}/m.zarr/channels", np.ones((2, *shape), dtype=np.uint8), channel_dims=1)
    write_array(f"{tmp_path}/m.zarr/float", ones.astype(np.float32))
    write_array(f"{tmp_path}/m.zarr/coarse", ones[::2, ::2, ::2], voxel_size=(2, 2, 2))
    write_array(f"{tmp_path}/m.zarr/small", ones[:, :12, :])
    write_array(f"{tmp_path}/m.zarr/shifted", ones, offset=(0, 4, 0))
    write_array(f"{tmp_path}/v.zarr/out", np.zeros(shape, dtype=np.uint64))
    cases = {
        "missing container": (f"{tmp_path}/none.zarr/mask", "does not exist.*pass an existing"),
        "missing dataset": (f"{tmp_path}/m.zarr/none", "no dataset 'none'.*pass an existing"),
        "channels": (f"{tmp_path}/m.zarr/channels", "1 channel axes"),
        "float": (f"{tmp_path}/m.zarr/float", "dtype float32.*integer or bool"),
        "voxel size": (f"{tmp_path}/m.zarr/coarse", r"voxel size \(2, 2, 2\)"),
        "not covering": (f"{tmp_path}/m.zarr/small", "not all of the affinities"),
        "shifted": (f"{tmp_path}/m.zarr/shifted", "not all of the affinities"),
        "the output": (f"{tmp_path}/v.zarr/out", "also the output"),
    }
    before = listing(tmp_path)
    for key, (mask, message) in cases.items():
        with pytest.raises(VoxblockError, match=f"watershed: mask .*{message}"):
            voxblock.run_blockwise(
                "watershed",
                world_roi((0, 0, 0), shape),
                world_roi((-1, -1, -1), (10, 10, 10)),
                world_roi((0, 0, 0), (8, 8, 8)),
                num_workers=2,
                progress=False,
                input=source,
                output=f"{tmp_path}/v.zarr/frags" if key != "the output" else mask,
                offsets=[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                mask=mask,
            )
        assert listing(tmp_path) == before, key


@pytest.mark.bad_input
def test_segment_blockwise_refuses_a_bad_mask_before_anything_is_created(tmp_path):
    shape = (16, 16, 16)
    affs = np.random.default_rng(4).random((3, *shape)).astype(np.float32)
    source = write_array(f"{tmp_path}/v.zarr/affs", affs, channel_dims=1)
    mask = write_array(f"{tmp_path}/v.zarr/mask", np.ones(shape, dtype=np.float32))
    before = listing(tmp_path)
    with pytest.raises(VoxblockError, match=r"watershed: mask .*dtype float32"):
        voxblock.segment_blockwise(
            "watershed",
            (1, 1, 1),
            world_roi((0, 0, 0), shape),
            world_roi((0, 0, 0), (8, 8, 8)),
            world_roi((0, 0, 0), (8, 8, 8)),
            num_workers=2,
            input=source,
            output=f"{tmp_path}/v.zarr/seg",
            parameters={"offsets": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "mask": mask},
            progress=False,
        )
    assert listing(tmp_path) == before
