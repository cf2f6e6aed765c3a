"""The synthetic volumes every benchmark reads: one generator, used by both virtualenvs.

Only numpy, zarr and funlib.persistence are imported (and scipy and
scikit-image by the agglomeration volumes, both in both virtualenvs), so
volara's own virtualenv (daisy 1) and voxblock's (daisy 2) write and read the
very same arrays: same codec (zarr's default), same 64^3 chunks, same data
(seeded).
A volume is written once per work directory and reused (a marker file
records that it is complete).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

CHUNK = 64
THRESHOLD = 0.5
CHANNELS = 3  # argmax input
CELL = 8  # fragment size (voxels) of the relabel input
WS_OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [4, 0, 0], [0, 4, 0], [0, 0, 4]]

# the agglomeration case: affinities -> fragments -> region graph -> segmentation
AGG_OFFSETS = WS_OFFSETS
AGG_BIAS = -0.6  # mutex watershed bias of the fragments: over-segments (split VOI ~1.2 whole-volume)
AGG_THRESHOLD = 0.5  # graph mutex watershed: mean edge affinity above attracts, below repels
AGG_CONTEXT = 4  # voxels around each fragments block: the longest offset
AGG_CELL_VOXELS = 12_000  # ground truth: one cell per this many voxels (1k-30k voxels each)
AGG_NOISE = 0.25  # std of the smooth noise (sigma 2 voxels) added to every affinity channel


def _prepare(path: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype, channel_dims: int = 0):
    from funlib.persistence import prepare_ds

    spatial = len(shape) - channel_dims
    return prepare_ds(
        str(path),
        shape=shape,
        offset=(0,) * spatial,
        voxel_size=(1,) * spatial,
        axis_names=[f"c{i}^" for i in range(channel_dims)] + ["z", "y", "x"][-spatial:],
        units=[""] * spatial,
        types=["channel"] * channel_dims + ["space"] * spatial,
        chunk_shape=chunks,
        dtype=dtype,
        mode="w",
    )


def _field(z: np.ndarray, y: np.ndarray, x: np.ndarray, phase: float) -> np.ndarray:
    """A smooth field in [0, 1] with blobs ~20 voxels across: 'predictions'."""
    a = np.sin(z * 0.11 + phase) * np.cos(y * 0.13 + 2 * phase)
    b = np.sin(y * 0.07 + x * 0.09 + 3 * phase) * np.cos(x * 0.12 - phase)
    return (0.5 + 0.25 * (a + b)).astype(np.float32)


def _slabs(size: int):
    for z0 in range(0, size, CHUNK):
        yield z0, min(size, z0 + CHUNK)


def write_predictions(path: Path, size: int, channels: int = 0, chunk: int = CHUNK) -> None:
    """float32 smooth predictions, (C,) Z, Y, X."""
    shape = ((channels,) if channels else ()) + (size,) * 3
    chunks = ((channels,) if channels else ()) + (chunk,) * 3
    array = _prepare(path, shape, chunks, np.float32, channel_dims=int(bool(channels)))
    y = np.arange(size)[None, :, None]
    x = np.arange(size)[None, None, :]
    for z0, z1 in _slabs(size):
        z = np.arange(z0, z1)[:, None, None]
        if channels:
            data = np.stack([_field(z, y, x, 0.7 * c) for c in range(channels)])
            array._source_data[:, z0:z1] = data
        else:
            array._source_data[z0:z1] = _field(z, y, x, 0.0)


def fragment_ids(size: int, seed: int = 1) -> np.ndarray:
    """The (sorted) IDs of the fragments: one per CELL^3 cell, spread over uint64."""
    cells = (-(-size // CELL)) ** 3
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(np.arange(1, 50 * cells, dtype=np.uint64), size=cells, replace=False))


def write_fragments(path: Path, size: int) -> None:
    """uint64 fragments: CELL^3 cells, each its own (scattered) ID."""
    ids = fragment_ids(size)
    per_axis = -(-size // CELL)
    rng = np.random.default_rng(2)
    ids = ids[rng.permutation(ids.size)].reshape((per_axis,) * 3)
    array = _prepare(path, (size,) * 3, (CHUNK,) * 3, np.uint64)
    for z0, z1 in _slabs(size):
        coarse = ids[z0 // CELL : -(-z1 // CELL)]
        data = coarse.repeat(CELL, 0).repeat(CELL, 1).repeat(CELL, 2)
        array._source_data[z0:z1] = data[: z1 - z0, :size, :size]


def write_lut(path: Path, size: int) -> None:
    """fragment -> segment table (npz, key fragment_segment_lut): every 5 fragments one segment."""
    fragments = fragment_ids(size)
    rng = np.random.default_rng(3)
    segments = rng.integers(1, max(2, fragments.size // 5), size=fragments.size).astype(np.uint64)
    np.savez(path, fragment_segment_lut=np.stack([fragments, segments]))


def write_affinities(path: Path, size: int) -> None:
    """float32 affinities for WS_OFFSETS from random cells of 6..14 voxels, plus noise."""
    rng = np.random.default_rng(4)
    edges = [np.cumsum(rng.integers(6, 15, size=size)) for _ in range(3)]
    cell = [np.searchsorted(e, np.arange(size), side="right") for e in edges]
    labels = (
        cell[0][:, None, None] * 1_000_000 + cell[1][None, :, None] * 1000 + cell[2][None, None, :]
    ).astype(np.int64)
    affs = np.zeros((len(WS_OFFSETS), size, size, size), dtype=np.float32)
    for c, offset in enumerate(WS_OFFSETS):
        shifted = labels
        for axis, o in enumerate(offset):
            if o:
                shifted = np.roll(shifted, -o, axis=axis)
        affs[c] = labels == shifted
    affs = 0.8 * affs + 0.2 * rng.random(affs.shape, dtype=np.float32)
    array = _prepare(path, affs.shape, (len(WS_OFFSETS),) + (CHUNK,) * 3, np.float32, channel_dims=1)
    array._source_data[...] = affs
    array._source_data.attrs["offsets"] = WS_OFFSETS


def agglomeration_truth(size: int, seed: int = 5) -> np.ndarray:
    """uint64 ground-truth cells that fill the volume and touch: a Voronoi tessellation of random
    seeds (one per AGG_CELL_VOXELS voxels) seen through a smooth random warp (wiggly faces), each
    cell one 6-connected piece (pieces under 500 voxels go to their nearest neighbour), IDs 1..n."""
    from scipy import ndimage
    from skimage.measure import label

    rng = np.random.default_rng(seed)
    shape = (size,) * 3
    count = max(2, size**3 // AGG_CELL_VOXELS)
    seeds = np.zeros(shape, np.uint32)
    seeds[tuple(rng.integers(0, size, size=(count, 3)).T)] = np.arange(1, count + 1, dtype=np.uint32)
    nearest = ndimage.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
    voronoi = seeds[tuple(nearest)]
    del nearest
    warped_at = []
    for axis in range(3):
        shift = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 8)
        shift *= 4.0 / shift.std()  # about 4 voxels
        ramp = np.arange(size, dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        warped_at.append(np.clip(np.rint(ramp + shift), 0, size - 1).astype(np.intp))
    cells = voronoi[tuple(warped_at)]
    del warped_at, voronoi
    pieces = label(cells, background=-1, connectivity=1).astype(np.uint32)
    small = np.bincount(pieces.ravel())[pieces] < 500
    nearest = ndimage.distance_transform_edt(small, return_distances=False, return_indices=True)
    pieces = pieces[tuple(nearest)]
    del nearest
    _, truth = np.unique(pieces, return_inverse=True)
    return (truth.reshape(shape) + 1).astype(np.uint64)


def agglomeration_affinities(truth: np.ndarray, seed: int = 6) -> np.ndarray:
    """float32 affinities of `truth` for AGG_OFFSETS (0.925 inside a cell, 0.075 across a face
    and past the volume) plus smooth noise (AGG_NOISE, sigma 2, independent per channel), clipped
    to [0, 1]: mutex watershed with AGG_BIAS over-segments the cells and merges few of them."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    affs = np.empty((len(AGG_OFFSETS), *truth.shape), dtype=np.float32)
    for channel, offset in enumerate(AGG_OFFSETS):
        same = np.zeros(truth.shape, dtype=bool)
        here = tuple(slice(0, s - o) for o, s in zip(offset, truth.shape))
        there = tuple(slice(o, s) for o, s in zip(offset, truth.shape))
        same[here] = truth[here] == truth[there]
        noise = ndimage.gaussian_filter(rng.standard_normal(truth.shape, dtype=np.float32), 2)
        noise *= AGG_NOISE / noise.std()
        affs[channel] = np.clip(0.85 * same + 0.075 + noise, 0.0, 1.0)
    return affs


def write_agglomeration_truth(path: Path, size: int) -> None:
    array = _prepare(path, (size,) * 3, (CHUNK,) * 3, np.uint64)
    array._source_data[...] = agglomeration_truth(size)


def write_agglomeration_affinities(path: Path, size: int) -> None:
    affs = agglomeration_affinities(agglomeration_truth(size))
    array = _prepare(path, affs.shape, (len(AGG_OFFSETS),) + (CHUNK,) * 3, np.float32, channel_dims=1)
    array._source_data[...] = affs
    # voxblock reads 'offsets', volara 'neighborhood'
    array._source_data.attrs.update({"offsets": AGG_OFFSETS, "neighborhood": AGG_OFFSETS})


WRITERS = {
    "pred": lambda p, s: write_predictions(p, s),
    "pred32": lambda p, s: write_predictions(p, s, chunk=32),
    "probs": lambda p, s: write_predictions(p, s, channels=CHANNELS),
    "frags": write_fragments,
    "affs": write_affinities,
    "agg-truth": write_agglomeration_truth,
    "agg-affs": write_agglomeration_affinities,
}


def ensure(workdir: Path, kind: str, size: int) -> str:
    """The array name CONTAINER/DATASET of volume `kind` at `size`^3, written if missing."""
    container = Path(workdir) / f"vol{size}.zarr"
    path = container / kind
    marker = Path(workdir) / f".vol{size}-{kind}.done"
    if not marker.exists():
        shutil.rmtree(path, ignore_errors=True)
        WRITERS[kind](path, size)
        marker.write_text(json.dumps({"kind": kind, "size": size}))
    return f"{container}/{kind}"


def ensure_lut(workdir: Path, size: int) -> str:
    path = Path(workdir) / f"lut{size}.npz"
    if not path.exists():
        write_lut(path, size)
    return str(path)


def reset(path: str | Path) -> None:
    """Remove an output array (and a voxblock run directory beside its container)."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
