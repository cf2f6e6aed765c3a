"""The standard workers (voxblock-workers) run through the real scheduler.

Every run uses num_workers=2 on a small synthetic volume whose size the
block does not divide, and is compared with the same operation done on the
whole volume in memory.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import mwatershed
import numpy as np
import pytest
import zarr
from funlib.geometry import Coordinate, Roi
from funlib.persistence import open_ds, prepare_ds
from hypothesis import given, settings
from hypothesis import strategies as st

import voxblock
from voxblock import Blocking, VoxblockError
from voxblock.workers import registered_workers
from voxblock_workers.argmax import smallest_unsigned
from voxblock_workers.relabel import relabel_block
from voxblock_workers.watershed import Watershed

THIRDPARTY = Path(__file__).parent / "thirdparty"

# torch 2.9+ deprecates TorchScript, which predict still loads (and these tests save)
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")


# -- helpers ------------------------------------------------------------------


def write_array(
    name: str,
    data: np.ndarray,
    channels: int = 0,
    voxel_size: tuple[int, ...] | None = None,
    offset: tuple[int, ...] | None = None,
    attrs: dict | None = None,
) -> str:
    """Write `data` as a funlib.persistence array "CONTAINER/DATASET" (`offset` in voxels)."""
    spatial = data.ndim - channels
    voxel_size = voxel_size or (1,) * spatial
    offset = offset or (0,) * spatial
    array = prepare_ds(
        name,
        shape=data.shape,
        offset=Coordinate(offset) * Coordinate(voxel_size),
        voxel_size=Coordinate(voxel_size),
        axis_names=[f"c{i}^" for i in range(channels)] + ["z", "y", "x"][-spatial:],
        types=["channel"] * channels + ["space"] * spatial,
        dtype=data.dtype,
        mode="w",
    )
    array._source_data[...] = data
    if attrs:
        zarr.open(name, mode="r+").attrs.update(attrs)
    return name


def read_array(name: str) -> np.ndarray:
    return np.asarray(open_ds(name, mode="r")._source_data[...])


def world_roi(offset, shape, voxel_size=None) -> Roi:
    voxel_size = Coordinate(voxel_size or (1,) * len(shape))
    return Roi(Coordinate(offset) * voxel_size, Coordinate(shape) * voxel_size)


def run(worker: str, total: Roi, read: Roi, write: Roi, **options) -> None:
    options.setdefault("num_workers", 2)
    assert voxblock.run_blockwise(worker, total, read, write, progress=False, **options)


def assert_same_partition(a: np.ndarray, b: np.ndarray) -> None:
    """`a` and `b` label the same segments (0 being background in both)."""
    assert a.shape == b.shape
    assert np.array_equal(a == 0, b == 0)
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1], "a segment of a is split in b"
    assert len(np.unique(pairs[1])) == pairs.shape[1], "a segment of b is split in a"


# -- threshold ----------------------------------------------------------------


def test_threshold_3d_inclusive_matches_whole_volume(tmp_path):
    rng = np.random.default_rng(1)
    data = (rng.integers(0, 10, size=(16, 32, 27)) / 10).astype(np.float32)
    source = write_array(f"{tmp_path}/v.zarr/raw", data, voxel_size=(2, 1, 1), offset=(3, 0, 5))
    vs = (2, 1, 1)
    run(
        "threshold",
        world_roi((3, 0, 5), (16, 32, 27), vs),
        world_roi((0, 0, 0), (5, 12, 10), vs),
        world_roi((0, 0, 0), (5, 12, 10), vs),
        fit="shrink",
        input=source,
        output=f"{tmp_path}/v.zarr/mask",
        threshold=0.3,
        inclusive=True,
    )
    result = read_array(f"{tmp_path}/v.zarr/mask")
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, (data >= np.float32(0.3)).astype(np.uint8))
    assert (data == np.float32(0.3)).any()  # the inclusive edge is exercised


def test_threshold_channel_of_2d_volume(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, size=(3, 64, 50), dtype=np.uint8)
    source = write_array(f"{tmp_path}/v.zarr/probs", data, channels=1)
    run(
        "threshold",
        world_roi((0, 0), (64, 50)),
        world_roi((0, 0), (24, 16)),
        world_roi((0, 0), (24, 16)),
        input=source,
        output=f"{tmp_path}/v.zarr/mask",
        threshold=100,
        channel=1,
    )
    np.testing.assert_array_equal(read_array(f"{tmp_path}/v.zarr/mask"), (data[1] > 100).astype(np.uint8))


# -- argmax -------------------------------------------------------------------


def test_argmax_all_channels_subset_and_groups(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, size=(5, 40, 45), dtype=np.uint8)
    source = write_array(f"{tmp_path}/v.zarr/scores", data, channels=1)
    total, block = world_roi((0, 0), (40, 45)), world_roi((0, 0), (16, 16))
    runs = {
        "all": ({}, np.argmax(data, axis=0)),
        "subset": ({"channels": [3, 1, 4]}, np.argmax(data[[3, 1, 4]], axis=0)),
        "groups": (
            {"groups": [[0, 1], [2], [3, 4]]},
            np.argmax(
                np.stack(
                    [data[[0, 1]].sum(0, dtype=np.int64), data[2].astype(np.int64), data[[3, 4]].sum(0)]
                ),
                axis=0,
            ),
        ),
    }
    for key, (options, expected) in runs.items():
        output = f"{tmp_path}/v.zarr/{key}"
        run("argmax", total, block, block, fit="shrink", input=source, output=output, **options)
        result = read_array(output)
        assert result.dtype == np.uint8
        np.testing.assert_array_equal(result, expected, err_msg=key)
    # the groups really differ from a per-channel argmax (sums overflow uint8)
    assert not np.array_equal(runs["groups"][1], np.argmax(data[[0, 2, 3]], axis=0))


def test_argmax_many_classes_use_a_wider_dtype(tmp_path):
    rng = np.random.default_rng(4)
    data = rng.random((300, 10, 13)).astype(np.float32)
    source = write_array(f"{tmp_path}/v.zarr/scores", data, channels=1)
    run(
        "argmax",
        world_roi((0, 0), (10, 13)),
        world_roi((0, 0), (4, 8)),
        world_roi((0, 0), (4, 8)),
        input=source,
        output=f"{tmp_path}/v.zarr/labels",
    )
    result = read_array(f"{tmp_path}/v.zarr/labels")
    assert result.dtype == np.uint16
    np.testing.assert_array_equal(result, np.argmax(data, axis=0))


def test_smallest_unsigned():
    assert smallest_unsigned(0) == np.uint8
    assert smallest_unsigned(255) == np.uint8
    assert smallest_unsigned(256) == np.uint16
    assert smallest_unsigned(2**32) == np.uint64


# -- relabel ------------------------------------------------------------------


def test_relabel_npz_and_zarr_tables(tmp_path):
    rng = np.random.default_rng(5)
    fragments = rng.integers(0, 60, size=(32, 32, 30), dtype=np.uint64)
    source = write_array(f"{tmp_path}/v.zarr/frags", fragments)
    keys = np.arange(1, 41, dtype=np.uint64)  # 41..59 are not in the table
    values = rng.integers(1000, 1010, size=keys.size).astype(np.uint64)
    lut = np.stack([keys, values])
    np.savez(tmp_path / "lut.npz", fragment_segment_lut=lut, other=np.zeros(3))
    zarr.create_array(str(tmp_path / "v.zarr" / "lut"), data=lut.astype(np.int64))

    mapping = dict(zip(keys.tolist(), values.tolist()))
    kept = np.vectorize(lambda v: mapping.get(v, v), otypes=[np.uint64])(fragments)
    zeroed = np.vectorize(lambda v: mapping.get(v, 0), otypes=[np.uint64])(fragments)
    total, block = world_roi((0, 0, 0), (32, 32, 30)), world_roi((0, 0, 0), (12, 16, 16))
    cases = [
        ("kept", {"lut": str(tmp_path / "lut.npz")}, kept),
        ("zeroed", {"lut": f"{tmp_path}/v.zarr/lut", "unmapped_to_zero": True}, zeroed),
        ("narrow", {"lut": str(tmp_path / "lut.npz"), "unmapped_to_zero": True, "dtype": "uint16"}, zeroed),
    ]
    for key, options, expected in cases:
        output = f"{tmp_path}/v.zarr/{key}"
        run("relabel", total, block, block, input=source, output=output, **options)
        result = read_array(output)
        assert result.dtype == np.dtype(options.get("dtype", "uint64"))
        np.testing.assert_array_equal(result, expected, err_msg=key)
    assert (fragments > 40).any() and (fragments == 0).any()


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from([np.uint8, np.uint32, np.uint64, np.int64]),
    values=st.lists(st.integers(0, 2**7 - 1), min_size=1, max_size=300),
    table=st.dictionaries(st.integers(0, 2**7 - 1), st.integers(0, 2**7 - 1), max_size=40),
    spread=st.sampled_from([1, 2**20, 2**40]),
    unmapped_to_zero=st.booleans(),
    wider=st.booleans(),
)
def test_relabel_block_is_a_lookup(dtype, values, table, spread, unmapped_to_zero, wider):
    """Every ID becomes its table entry; an ID missing from it stays (or becomes 0)."""
    info = np.iinfo(dtype)
    spread = spread if info.max // spread >= 2**7 else 1
    data = np.array(values, dtype=dtype) * dtype(spread)
    keys = np.array(sorted(table), dtype=dtype) * dtype(spread)
    mapped = np.array([table[k] for k in sorted(table)], dtype=dtype)
    output = np.dtype(np.int64 if np.dtype(dtype).kind == "i" else np.uint64) if wider else None
    result = relabel_block(data.reshape(-1, 1), keys, mapped, unmapped_to_zero, output)
    lookup = dict(zip(keys.tolist(), mapped.tolist()))
    expected = [lookup.get(v, 0 if unmapped_to_zero else v) for v in data.tolist()]
    assert result.dtype == (output or data.dtype)
    assert result.ravel().tolist() == expected


# -- watershed ----------------------------------------------------------------

OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 0], [0, 3, 0], [0, 0, 3]]


def affinities_from_labels(labels: np.ndarray, offsets) -> np.ndarray:
    """1 where a voxel and its neighbour at `offset` share a (non-zero) label, else 0."""
    affs = np.zeros((len(offsets), *labels.shape), dtype=np.float32)
    for c, offset in enumerate(offsets):
        here = tuple(slice(0, s - o) for s, o in zip(labels.shape, offset))
        there = tuple(slice(o, s) for s, o in zip(labels.shape, offset))
        affs[(c, *here)] = (labels[here] == labels[there]) & (labels[here] != 0)
    return affs


def boxes_inside_blocks(shape, block, rng) -> np.ndarray:
    """Random boxes, each inside one write block, away from its border."""
    labels = np.zeros(shape, dtype=np.uint64)
    next_id = 1
    for corner in np.ndindex(*(-(-s // b) for s, b in zip(shape, block))):
        begin = [c * b for c, b in zip(corner, block)]
        end = [min(b0 + b, s) for b0, b, s in zip(begin, block, shape)]
        for _ in range(3):
            lo = [int(rng.integers(b0 + 1, max(b0 + 2, e - 3))) for b0, e in zip(begin, end)]
            hi = [int(rng.integers(low + 1, e)) if low + 1 < e else e for low, e in zip(lo, end)]
            hi = [min(h, e - 1) for h, e in zip(hi, end)]
            if all(h > low for low, h in zip(lo, hi)):
                labels[tuple(slice(low, h) for low, h in zip(lo, hi))] = next_id
                next_id += 1
    return labels


def test_watershed_objects_inside_blocks_match_whole_volume(tmp_path):
    rng = np.random.default_rng(6)
    shape, block = (32, 32, 28), (12, 12, 12)
    labels = boxes_inside_blocks(shape, block, rng)
    affs = affinities_from_labels(labels, OFFSETS)
    noisy = np.clip(affs * 0.8 + 0.1 + rng.uniform(-0.05, 0.05, affs.shape), 0, 1)
    affs_u8 = np.round(noisy * 255).astype(np.uint8)
    source = write_array(f"{tmp_path}/v.zarr/affs", affs_u8, channels=1, attrs={"offsets": OFFSETS})
    bias = [-0.5, -0.5, -0.5, -0.7, -0.7, -0.7]
    output = f"{tmp_path}/v.zarr/frags"
    run(
        "watershed",
        world_roi((-3, -3, -3), [s + 6 for s in shape]),
        world_roi((-3, -3, -3), (18, 18, 18)),
        world_roi((0, 0, 0), block),
        fit="shrink",
        input=source,
        output=output,
        bias=bias,
        min_size=10,
    )
    result = read_array(output)
    assert result.dtype == np.uint64 and result.shape == shape

    whole = mwatershed.agglom(
        affs_u8.astype(np.float64) / 255 + np.reshape(bias, (-1, 1, 1, 1)), OFFSETS
    ).astype(np.uint64)
    ids, counts = np.unique(whole, return_counts=True)
    whole[np.isin(whole, ids[(counts < 10) & (ids != 0)])] = 0
    assert_same_partition(result, whole)
    # background is 0, every fragment lies in one object, small ones are removed
    assert not result[labels == 0].any()
    pairs = np.unique(np.stack([result[result != 0], labels[result != 0]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1]
    assert np.unique(result[result != 0], return_counts=True)[1].min() >= 10
    assert len(np.unique(result)) > 10 and (counts[ids != 0] < 10).any()


def test_watershed_each_block_is_mutex_watershed_of_its_read_roi(tmp_path):
    """Random affinities: mutex watershed is not local, so compare block by block;
    IDs are unique across blocks, follow the block grid, and 0 is background."""
    rng = np.random.default_rng(7)
    shape = (20, 22, 21)
    offsets = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 2, 2]]
    affs = rng.random((4, *shape)).astype(np.float32)
    source = write_array(f"{tmp_path}/v.zarr/affs", affs, channels=1)
    output = f"{tmp_path}/v.zarr/frags"
    total = world_roi((-2, -2, -2), [s + 4 for s in shape])  # the read ROI: context outside is 0
    read, write = world_roi((-2, -2, -2), (12, 12, 12)), world_roi((0, 0, 0), (8, 8, 8))
    strides = [[1, 1, 1], [1, 1, 1], [1, 1, 1], [2, 2, 2]]
    run(
        "watershed",
        total,
        read,
        write,
        fit="shrink",
        input=source,
        output=output,
        offsets=offsets,
        bias=-0.4,
        strides=strides,
    )
    result = read_array(output)
    assert result.shape == shape
    padded = np.pad(affs, ((0, 0), (2, 2), (2, 2), (2, 2)))
    blocks = Blocking(total, read, write, "shrink").blocks()
    assert len(blocks) == 27
    seen: set[int] = set()
    for read_roi, write_roi in blocks:
        r = tuple(slice(b + 2, e + 2) for b, e in zip(read_roi.begin, read_roi.end))
        w = tuple(slice(b, e) for b, e in zip(write_roi.begin, write_roi.end))
        expected = mwatershed.agglom(
            padded[(slice(None), *r)].astype(np.float64) - 0.4, offsets, strides=strides
        )
        crop = tuple(
            slice(wb - rb, we - rb) for wb, we, rb in zip(write_roi.begin, write_roi.end, read_roi.begin)
        )
        got = result[w]
        assert_same_partition(got, expected[crop])
        ids = set(np.unique(got[got != 0]).tolist())
        assert ids and not ids & seen
        seen |= ids
        index = np.ravel_multi_index(tuple(b // 8 for b in write_roi.begin), (3, 3, 3))
        assert min(ids) > index * 512 and max(ids) <= (index + 1) * 512
    assert (result == 0).any()


def test_watershed_block_ids_do_not_depend_on_run_order(tmp_path):
    """Two runs, one worker vs two, write identical IDs."""
    rng = np.random.default_rng(8)
    affs = rng.random((2, 30, 26)).astype(np.float32)
    source = write_array(f"{tmp_path}/v.zarr/affs", affs, channels=1)
    results = []
    for num_workers in (1, 2):
        output = f"{tmp_path}/v.zarr/frags{num_workers}"
        run(
            "watershed",
            world_roi((0, 0), (30, 26)),
            world_roi((-1, -1), (10, 10)),
            world_roi((0, 0), (8, 8)),
            fit="shrink",
            num_workers=num_workers,
            input=source,
            output=output,
            offsets=[[1, 0], [0, 1]],
        )
        results.append(read_array(output))
    np.testing.assert_array_equal(results[0], results[1])


# -- predict ------------------------------------------------------------------


def test_predict_torchscript_3d(tmp_path):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.ReLU(), torch.nn.Conv3d(2, 2, 1))
    model_path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(net), str(model_path))

    rng = np.random.default_rng(9)
    raw = rng.integers(0, 256, size=(26, 30, 28), dtype=np.uint8)
    source = write_array(f"{tmp_path}/v.zarr/raw", raw)
    output = f"{tmp_path}/v.zarr/pred"
    run(
        "predict",
        world_roi((-1, -1, -1), (28, 32, 30)),
        world_roi((-1, -1, -1), (12, 12, 12)),
        world_roi((0, 0, 0), (10, 10, 10)),
        input=source,
        output=output,
        model=str(model_path),
        normalize="minmax",
        min=0,
        max=255,
        activation="sigmoid",
        device="cpu",
    )
    result = read_array(output)
    assert result.shape == (2, 26, 30, 28) and result.dtype == np.float32

    padded = np.pad(raw.astype(np.float32) / 255, 1)
    with torch.no_grad():
        expected = torch.sigmoid(net(torch.from_numpy(padded)[None, None]))[0].numpy()
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_predict_loads_exported_programs(tmp_path):
    """A torch.export file (.pt2) loads like a TorchScript file (checked here without a run:
    starting torch.export in every worker process costs seconds)."""
    import torch

    from voxblock_workers.predict import load_model

    net = torch.nn.Conv2d(1, 3, 3)
    torch.export.save(torch.export.export(net, (torch.zeros(1, 1, 12, 12),)), str(tmp_path / "net.pt2"))
    loaded = load_model(str(tmp_path / "net.pt2"), "", "cpu")
    x = torch.from_numpy(np.random.default_rng(13).random((1, 1, 12, 12)).astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    (tmp_path / "bad.pt2").write_bytes(b"nothing")
    with pytest.raises(VoxblockError, match=r"not a torch\.export model"):
        load_model(str(tmp_path / "bad.pt2"), "", "cpu")


NET_MODULE = """
import torch


def make_net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5), torch.nn.Tanh())
"""


def test_predict_module_callable_with_checkpoint_2d_uint8(tmp_path, monkeypatch):
    import torch

    (tmp_path / "tiny_net_module.py").write_text(NET_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # for the worker processes
    net = importlib.import_module("tiny_net_module").make_net()
    torch.save(net.state_dict(), tmp_path / "weights.pth")

    rng = np.random.default_rng(10)
    raw = rng.normal(size=(3, 40, 35)).astype(np.float32)
    source = write_array(f"{tmp_path}/v.zarr/raw", raw, channels=1)
    output = f"{tmp_path}/v.zarr/pred"
    run(
        "predict",
        world_roi((-2, -2), (44, 39)),
        world_roi((-2, -2), (20, 20)),
        world_roi((0, 0), (16, 16)),
        input=source,
        output=output,
        model="tiny_net_module:make_net",
        checkpoint=str(tmp_path / "weights.pth"),
        normalize="scale",
        scale=0.5,
        shift=0.1,
        activation="softmax",
        dtype="uint8",
    )
    result = read_array(output)
    assert result.shape == (4, 40, 35) and result.dtype == np.uint8

    # outside the input the raw data is 0, and normalized like the rest
    padded = np.pad(raw, ((0, 0), (2, 2), (2, 2))) * np.float32(0.5) + np.float32(0.1)
    with torch.no_grad():
        probs = torch.softmax(net(torch.from_numpy(padded)[None]), dim=1)[0].numpy()
    expected = np.round(np.clip(probs, 0, 1) * 255).astype(np.uint8)
    assert np.abs(result.astype(int) - expected).max() <= 1
    assert (result != expected).mean() < 0.01


# -- refused before any block runs --------------------------------------------


def _bad_cases(tmp_path):
    import torch

    rng = np.random.default_rng(11)
    raw = write_array(f"{tmp_path}/v.zarr/raw", rng.random((16, 16, 16)).astype(np.float32))
    probs = write_array(
        f"{tmp_path}/v.zarr/probs", rng.random((2, 16, 16, 16)).astype(np.float32), channels=1
    )
    labels = write_array(f"{tmp_path}/v.zarr/labels", rng.integers(0, 9, (16, 16, 16)).astype(np.uint32))
    np.savez(tmp_path / "lut3.npz", rng.integers(0, 9, (3, 5)))
    np.savez(tmp_path / "lutf.npz", fragment_segment_lut=rng.random((2, 5)))
    np.savez(tmp_path / "lutbig.npz", fragment_segment_lut=np.array([[1, 2], [5, 2**40]]))
    np.savez(tmp_path / "lutdup.npz", fragment_segment_lut=np.array([[7, 3, 9, 3], [1, 2, 3, 4]]))
    net = torch.nn.Conv3d(1, 1, 5)  # context 2 per side, the task gives 1
    torch.jit.save(torch.jit.script(net), str(tmp_path / "net.pt"))
    torch.jit.save(torch.jit.script(torch.nn.Flatten()), str(tmp_path / "flat.pt"))
    torch.jit.save(torch.jit.script(torch.nn.Conv3d(1, 1, 3)), str(tmp_path / "fits.pt"))
    fits = str(tmp_path / "fits.pt")
    return {
        "threshold needs a channel": ("threshold", {"input": probs}, "choose one with channel"),
        "threshold channel without axis": ("threshold", {"input": raw, "channel": 0}, "no channel axis"),
        "threshold channel out of range": ("threshold", {"input": probs, "channel": 2}, "out of range"),
        "argmax without channels": ("argmax", {"input": raw}, "channel axis"),
        "argmax channel out of range": ("argmax", {"input": probs, "channels": [0, 5]}, "out of range"),
        "argmax both": ("argmax", {"input": probs, "channels": [0], "groups": [[1]]}, "not both"),
        "relabel float input": ("relabel", {"input": raw, "lut": str(tmp_path / "lut3.npz")}, "integer"),
        "relabel lut 3xN": ("relabel", {"input": labels, "lut": str(tmp_path / "lut3.npz")}, "2xN"),
        "relabel lut floats": ("relabel", {"input": labels, "lut": str(tmp_path / "lutf.npz")}, "integers"),
        "relabel lut too big": ("relabel", {"input": labels, "lut": str(tmp_path / "lutbig.npz")}, "fit"),
        "relabel lut missing": ("relabel", {"input": labels, "lut": str(tmp_path / "no.npz")}, "not exist"),
        "relabel lut twice": (
            "relabel",
            {"input": labels, "lut": str(tmp_path / "lutdup.npz")},
            "more than once",
        ),
        "relabel narrower output": (
            "relabel",
            {"input": labels, "lut": str(tmp_path / "lutdup.npz"), "dtype": "uint8"},
            "unmapped_to_zero",
        ),
        "relabel float output": (
            "relabel",
            {"input": labels, "lut": str(tmp_path / "lutdup.npz"), "dtype": "float32"},
            "not an integer",
        ),
        "relabel no dtype": (
            "relabel",
            {"input": labels, "lut": str(tmp_path / "lutdup.npz"), "dtype": "uint77"},
            "not a numpy dtype",
        ),
        "watershed no offsets": ("watershed", {"input": probs}, "offsets"),
        "watershed offsets count": (
            "watershed",
            {"input": probs, "offsets": [[1, 0, 0]]},
            "1 offsets for 2 affinity channels",
        ),
        "watershed bias length": (
            "watershed",
            {"input": probs, "offsets": [[1, 0, 0], [0, 1, 0]], "bias": [0.1]},
            "bias",
        ),
        "watershed int affinities": ("watershed", {"input": labels, "offsets": [[1, 0, 0]]}, "channel"),
        "predict shape mismatch": ("predict", {"input": raw, "model": str(tmp_path / "net.pt")}, "context"),
        "predict bad output": ("predict", {"input": raw, "model": str(tmp_path / "flat.pt")}, "batch"),
        "predict no model file": ("predict", {"input": raw, "model": str(tmp_path / "none.pt")}, "model"),
        "predict out_shape": ("predict", {"input": raw, "model": fits, "out_shape": [7, 7, 7]}, "out_shape"),
        "predict in_shape": ("predict", {"input": raw, "model": fits, "in_shape": [12, 12, 12]}, "read"),
        "predict shrink": ("predict", {"input": raw, "model": fits, "fit": "shrink"}, "one size"),
        "predict bad activation": (
            "predict",
            {"input": raw, "model": str(tmp_path / "net.pt"), "activation": "relu"},
            "activation",
        ),
        "unknown option": ("threshold", {"input": raw, "treshold": 0.2}, "no option treshold"),
    }


@pytest.mark.bad_input
def test_bad_options_and_inputs_are_refused_before_any_block(tmp_path, record_property):
    cases = _bad_cases(tmp_path)
    record_property("bad_inputs", len(cases))
    for key, (worker, options, message) in cases.items():
        output = f"{tmp_path}/v.zarr/out"
        with pytest.raises(VoxblockError, match=message):
            voxblock.run_blockwise(
                worker,
                world_roi((-1, -1, -1), (18, 18, 18)),
                world_roi((-1, -1, -1), (10, 10, 10)),
                world_roi((0, 0, 0), (8, 8, 8)),
                num_workers=2,
                progress=False,
                output=output,
                **options,
            )
        assert not (tmp_path / "v.zarr" / "out").exists(), key
        assert not list(tmp_path.glob("**/*.voxblock")), key


def test_watershed_grid_is_recorded_in_prepare():
    """The block grid comes from the blocking, not from daisy's block ids."""
    blocking = Blocking(world_roi((0, 0), (20, 20)), world_roi((-2, -2), (9, 9)), world_roi((0, 0), (5, 5)))
    from voxblock.segment.ids import BlockGrid

    grid = BlockGrid.of(blocking, 25)
    assert grid.counts == (4, 4) and grid.id_range == 25
    assert grid.origin == (2, 2)  # the first write ROI starts after the context
    assert grid.index(world_roi((2, 2), (5, 5))) == 0
    assert grid.index(world_roi((7, 17), (5, 5))) == 7
    with pytest.raises(ValueError, match="off the grid"):
        grid.index(world_roi((0, 0), (5, 5)))
    assert isinstance(Watershed(), voxblock.ArrayWorker)


# -- a third-party worker package ---------------------------------------------


@pytest.fixture(scope="session")
def thirdparty_installed(tmp_path_factory):
    source = tmp_path_factory.mktemp("thirdparty") / "pkg"
    shutil.copytree(THIRDPARTY, source)  # the build writes into its source directory
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "install", "-q", "--no-deps", "--no-build-isolation", str(source)],
        check=True,
        capture_output=True,
    )
    importlib.invalidate_caches()
    yield
    subprocess.run([*pip, "uninstall", "-q", "-y", "voxblock-thirdparty-example"], check=True)


def test_thirdparty_worker_is_registered_and_runs(thirdparty_installed, tmp_path):
    assert "invert" in registered_workers()
    rng = np.random.default_rng(12)
    data = rng.integers(0, 256, size=(20, 30), dtype=np.uint8)
    source = write_array(f"{tmp_path}/v.zarr/raw", data)
    run(
        "invert",
        world_roi((0, 0), (20, 30)),
        world_roi((0, 0), (8, 8)),
        world_roi((0, 0), (8, 8)),
        fit="shrink",
        input=source,
        output=f"{tmp_path}/v.zarr/inverted",
    )
    np.testing.assert_array_equal(read_array(f"{tmp_path}/v.zarr/inverted"), 255 - data)
