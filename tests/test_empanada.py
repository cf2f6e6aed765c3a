"""The empanada worker with a real TorchScript model whose heads are known analytically.

The model (built and saved here, no downloads) sees bright objects on a dark
background: its semantic logits are positive inside objects, its centre
heatmap is the foreground blurred by a Gaussian (one maximum per convex
object, at its centre) and its offsets point from each pixel to the centroid
of the foreground within a 21 x 21 window (the object's centre, since
objects are at least 11 voxels apart). So the expected instances are the
objects themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import daisy.v2 as daisy
import numpy as np
import pytest
import torch
import yaml
from funlib.geometry import Coordinate, Roi
from funlib.persistence import open_ds, prepare_ds

import voxblock
from voxblock import VoxblockError
from voxblock_workers.empanada import Empanada

# torch 2.9+ deprecates TorchScript, which empanada models are (and these tests save)
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")

WINDOW = 21  # offsets: centroid of the foreground within this window
SIGMA = 1.5  # centre heatmap: Gaussian blur of the foreground, times 4


class PanopticHeads(torch.nn.Module):
    """sem_logits, ctr_hmp and offsets of bright objects, computed with fixed convolutions."""

    def __init__(self, offset_channels: int = 2):
        super().__init__()
        radius = WINDOW // 2
        d = torch.arange(-radius, radius + 1, dtype=torch.float32)
        ones = torch.ones(WINDOW, WINDOW)
        moments = [ones, d.view(-1, 1) * ones, d.view(1, -1) * ones][: 1 + offset_channels]
        self.register_buffer("moments", torch.stack(moments).unsqueeze(1))
        g = torch.exp(-(torch.arange(-4, 5, dtype=torch.float32) ** 2) / (2 * SIGMA**2))
        blur = g.view(-1, 1) * g.view(1, -1)
        self.register_buffer("blur", (4 * blur / blur.sum()).view(1, 1, 9, 9))
        self.radius = radius

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        foreground = (x > 0.5).float()
        moments = torch.nn.functional.conv2d(foreground, self.moments, padding=self.radius)
        offsets = moments[:, 1:] / moments[:, :1].clamp(min=1e-6)
        heatmap = torch.nn.functional.conv2d(foreground, self.blur, padding=4)
        return 8.0 * (x - 0.5), heatmap, offsets

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, heatmap, offsets = self.heads(x)
        return {"sem_logits": logits, "ctr_hmp": heatmap, "offsets": offsets}


class TupleHeads(PanopticHeads):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heads(x)


class NoOffsets(PanopticHeads):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, heatmap, _ = self.heads(x)
        return {"sem_logits": logits, "ctr_hmp": heatmap}


def save_model(path: Path, kind: type = PanopticHeads, **kwargs) -> Path:
    torch.jit.save(torch.jit.script(kind(**kwargs)), str(path))
    return path


def write_config(path: Path, model: str, **changes) -> str:
    """An empanada-style model config (YAML, or JSON for a .json path); `model` relative to it."""
    config = {
        "class_names": {1: "mito"},
        "labels": [1],
        "thing_list": [1],
        "model": model,
        "norms": {"mean": 0.0, "std": 1.0},
        "padding_factor": 16,
        "description": "analytic test heads",
    }
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    if path.suffix == ".json":
        path.write_text(json.dumps(config))
    else:
        path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture
def config(tmp_path) -> str:
    save_model(tmp_path / "heads.pt")
    return write_config(tmp_path / "mitonet.yaml", "heads.pt")


def ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def write_raw(path: Path, objects: np.ndarray, chunk: int) -> str:
    """Objects (labels) as a uint8 image: 255 inside, 0 outside."""
    name = f"{path}/v.zarr/raw"
    array = prepare_ds(
        name,
        shape=objects.shape,
        offset=(0,) * objects.ndim,
        voxel_size=(1,) * objects.ndim,
        chunk_shape=(chunk,) * objects.ndim,
        dtype=np.uint8,
        mode="w",
    )
    array._source_data[...] = np.where(objects > 0, 255, 0).astype(np.uint8)
    return name


def read(name: str) -> np.ndarray:
    return np.asarray(open_ds(name, mode="r")._source_data[...])


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """The same labelling up to a permutation of IDs that keeps 0."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    if np.any((pairs[0] == 0) != (pairs[1] == 0)):
        return False
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def objects_in_blocks(seed: int) -> tuple[np.ndarray, list[int]]:
    """(32, 64, 128): one object per 32^3 block: six balls, a tiny ball, a one-plane disc.

    Returns the labels (1..8) and the labels a min_size=20, min_extent=3 run keeps.
    """
    rng = np.random.default_rng(seed)
    shape = (32, 64, 128)
    labels = np.zeros(shape, dtype=np.uint32)
    for i, (by, bx) in enumerate((y, x) for y in range(2) for x in range(4)):
        centre = (
            int(rng.integers(12, 21)),
            32 * by + int(rng.integers(12, 21)),
            32 * bx + int(rng.integers(12, 21)),
        )
        if i == 6:
            mask = ball(shape, centre, 1)  # 7 voxels: below min_size
        elif i == 7:
            mask = ball(shape, centre, 4) & (np.arange(shape[0]) == centre[0])[:, None, None]  # 1 plane
        else:
            mask = ball(shape, centre, 4)
        labels[mask] = i + 1
    return labels, [1, 2, 3, 4, 5, 6]


def run_in_blocks(tmp_path: Path, config: str, objects: np.ndarray, output: str, **options) -> np.ndarray:
    raw = write_raw(tmp_path, objects, chunk=32)
    context = Coordinate((8,) * objects.ndim)
    write = Roi((0,) * objects.ndim, (32,) * objects.ndim)
    ok = voxblock.run_blockwise(
        "empanada",
        Roi((0,) * objects.ndim, objects.shape).grow(context, context),
        write.grow(context, context),
        write,
        num_workers=2,
        progress=False,
        input=raw,
        output=f"{tmp_path}/v.zarr/{output}",
        config=config,
        **options,
    )
    assert ok
    return read(f"{tmp_path}/v.zarr/{output}")


def assert_one_instance_per_object(result: np.ndarray, objects: np.ndarray, kept: list[int]) -> None:
    assert result.dtype == np.uint64
    assert np.array_equal(result > 0, np.isin(objects, kept))  # 0 exactly on background and dropped
    ids = []
    for label in kept:
        found = np.unique(result[objects == label])
        assert len(found) == 1 and found[0] > 0, f"object {label} has instances {found}"
        ids.append(found[0])
    assert len(set(ids)) == len(kept)


def test_run_blockwise_finds_each_object_and_filters(tmp_path, config):
    objects, kept = objects_in_blocks(seed=3)
    result = run_in_blocks(tmp_path, config, objects, "instances", min_size=20, min_extent=3)
    assert_one_instance_per_object(result, objects, kept)
    assert len(np.unique(result[result > 0])) == 6
    # the filters are what removed the tiny ball and the one-plane disc: without them
    # (in memory, on the whole volume) both are instances too
    world = Roi((0, 0, 0), objects.shape)
    raw = open_ds(f"{tmp_path}/v.zarr/raw")
    unfiltered = Empanada(config=config).segment(raw, daisy.Block(world, world, world))
    assert_one_instance_per_object(unfiltered.astype(np.uint64), objects, list(range(1, 9)))


def test_2d_tuple_model_json_config(tmp_path):
    """A 2-D image, a model returning a tuple, a JSON config naming the model by absolute path."""
    save_model(tmp_path / "tuple.pt", TupleHeads)
    config = write_config(tmp_path / "model.json", str(tmp_path / "tuple.pt"))  # absolute model path
    rng = np.random.default_rng(5)
    objects = np.zeros((64, 96), dtype=np.uint32)
    for i in range(6):
        by, bx = divmod(i, 3)
        centre = (32 * by + int(rng.integers(10, 23)), 32 * bx + int(rng.integers(10, 23)))
        objects[ball(objects.shape, centre, int(rng.integers(3, 7)))] = i + 1
    raw = open_ds(write_raw(tmp_path, objects, chunk=32))
    world = Roi((0, 0), objects.shape)
    result = Empanada(config=config).segment(raw, daisy.Block(world, world, world))
    assert_one_instance_per_object(result, objects, list(range(1, 7)))


def lattice_balls() -> np.ndarray:
    """27 balls of radius 3 in (48, 48, 48), 12 voxels apart; 19 cross the borders of 24^3 blocks."""
    shape = (48, 48, 48)
    labels = np.zeros(shape, dtype=np.uint32)
    for i, position in enumerate(np.ndindex(3, 3, 3)):
        labels[ball(shape, tuple(5 + 19 * p for p in position), 3)] = i + 1
    return labels


@pytest.mark.parametrize("axes", ["xy", "xy,xz,yz"])
def test_segment_blockwise_equals_whole_volume(tmp_path, config, axes):
    """Blocks cut 19 of the 27 balls; the result is the whole-volume result and the balls.

    xy runs in two worker processes; the ortho-plane run (three times the model calls) runs
    its passes in this process to keep the file fast: the block code is the same.
    """
    objects = lattice_balls()
    raw = write_raw(tmp_path, objects, chunk=24)
    world = Roi((0, 0, 0), objects.shape)
    write = Roi((0, 0, 0), (24, 24, 24))
    ok = voxblock.segment_blockwise(
        "empanada",
        (12, 12, 12),
        world,
        write,
        write,
        num_workers=2,
        input=raw,
        output=f"{tmp_path}/v.zarr/seg",
        parameters={"config": config, "axes": axes},
        progress=False,
        serial=axes != "xy",
    )
    assert ok
    result = read(f"{tmp_path}/v.zarr/seg")
    whole = Empanada(config=config, axes=axes).segment(open_ds(raw), daisy.Block(world, world, world))
    assert len(np.unique(whole)) == 28  # 27 objects and background
    assert same_partition(result, whole)
    assert_one_instance_per_object(result, objects, list(range(1, 28)))


@pytest.mark.bad_input
def test_bad_config_model_and_input_are_refused_before_any_block(tmp_path, config, record_property):
    objects, _ = objects_in_blocks(seed=1)
    raw = write_raw(tmp_path, objects, chunk=32)
    flat = write_raw(tmp_path / "flat", objects[0], chunk=32)
    two = f"{tmp_path}/two.zarr/raw"
    prepare_ds(two, shape=(2, 32, 32, 32), voxel_size=(1, 1, 1), dtype=np.uint8, mode="w")
    save_model(tmp_path / "no_offsets.pt", NoOffsets)
    save_model(tmp_path / "one_offset.pt", offset_channels=1)
    (tmp_path / "garbage.pt").write_bytes(b"not a model")
    (tmp_path / "list.yaml").write_text("- model: heads.pt\n")
    (tmp_path / "broken.json").write_text("{model: ")
    bad = {
        "no config": ({}, "config=PATH"),
        "missing config": ({"config": str(tmp_path / "none.yaml")}, "does not exist"),
        "not a mapping": ({"config": str(tmp_path / "list.yaml")}, "mapping"),
        "not json": ({"config": str(tmp_path / "broken.json")}, "not valid"),
        "no norms": ({"config": write_config(tmp_path / "a.yaml", "heads.pt", norms=None)}, "norms"),
        "zero std": (
            {"config": write_config(tmp_path / "b.yaml", "heads.pt", norms={"mean": 0, "std": 0})},
            "norms",
        ),
        "url": ({"config": write_config(tmp_path / "c.yaml", "https://example.org/m.pth")}, "URL"),
        "missing model": ({"config": write_config(tmp_path / "d.yaml", "none.pt")}, "model file"),
        "not torchscript": ({"config": write_config(tmp_path / "e.yaml", "garbage.pt")}, "TorchScript"),
        "missing head": ({"config": write_config(tmp_path / "f.yaml", "no_offsets.pt")}, "missing offsets"),
        "offsets shape": ({"config": write_config(tmp_path / "g.yaml", "one_offset.pt")}, "offsets head"),
        "two classes": (
            {"config": write_config(tmp_path / "h.yaml", "heads.pt", labels=[1, 2], thing_list=[1, 2])},
            "one foreground class",
        ),
        "padding": ({"config": write_config(tmp_path / "i.yaml", "heads.pt", padding_factor=64)}, "padding"),
        "bad padding": ({"config": write_config(tmp_path / "j.yaml", "heads.pt", padding_factor=0)}, ">= 1"),
        "channels": ({"config": config, "input": two}, "single-channel"),
        "axes": ({"config": config, "axes": "xy,ab"}, "axes"),
        "2-D ortho": ({"config": config, "input": flat, "axes": "xy,xz"}, "2-D"),
        "nms kernel": ({"config": config, "nms_kernel": 4}, "odd"),
        "threshold": ({"config": config, "semantic_threshold": 2}, "semantic_threshold"),
    }
    record_property("bad_inputs", len(bad) + 1)  # and the segment_blockwise case below
    for case, (options, message) in bad.items():
        options = {"input": raw, **options}
        ndim = 2 if options["input"] == flat else 3
        output = f"{tmp_path}/out.zarr/{case.replace(' ', '_')}"
        write = Roi((0,) * ndim, (32,) * ndim)
        with pytest.raises(VoxblockError, match=message):
            voxblock.run_blockwise(
                "empanada",
                Roi((0,) * ndim, (32,) * ndim).grow((8,) * ndim, (8,) * ndim),
                write.grow((8,) * ndim, (8,) * ndim),
                write,
                num_workers=1,
                progress=False,
                output=output,
                **options,
            )
        assert not Path(output).exists(), case
    # segment_blockwise checks the model on its first block, before any block runs
    with pytest.raises(VoxblockError, match="missing offsets"):
        voxblock.segment_blockwise(
            "empanada",
            (8, 8, 8),
            Roi((0, 0, 0), (32, 64, 128)),
            Roi((0, 0, 0), (32, 32, 32)),
            Roi((0, 0, 0), (32, 32, 32)),
            num_workers=1,
            input=raw,
            output=f"{tmp_path}/v.zarr/seg",
            parameters={"config": str(tmp_path / "f.yaml")},
            progress=False,
        )
    assert not Path(f"{tmp_path}/v.zarr/seg").exists()
    assert not Path(f"{tmp_path}/v.zarr/seg_fragments").exists()


def test_consensus_rule():
    """Majority vote for foreground; IoU-linked instances of different axes are one; each voxel
    takes the instance most of its axes put it in."""
    worker = Empanada(consensus_iou=0.6)
    shape = (1, 1, 12)
    whole = np.zeros(shape, dtype=bool)
    whole[..., :10] = True
    only_one = np.zeros(shape, dtype=bool)
    only_one[..., 10] = True  # voxel 10: one axis of three says foreground
    xy = np.zeros(shape, dtype=np.int64)
    xy[..., :5], xy[..., 5:10] = 1, 2  # xy splits the object in two halves (IoU 0.5 with the whole)
    xz = np.where(whole, 3, 0)
    yz = np.where(whole | only_one, 7, 0)
    result = worker.consensus([whole, whole, whole | only_one], [xy, xz, yz])
    assert result[0, 0, 10] == 0 and result[0, 0, 11] == 0
    assert len(np.unique(result[..., :10])) == 1 and result[0, 0, 0] > 0  # xz and yz outvote xy
    # with a lower consensus IoU the halves join the whole: still one instance
    joined = Empanada(consensus_iou=0.5).consensus([whole, whole, whole | only_one], [xy, xz, yz])
    assert same_partition(joined, result)
    # two axes of two that disagree: ties go to the first axis
    tie = Empanada(consensus_iou=0.6).consensus([whole, whole], [xy, xz])
    assert same_partition(tie, np.where(whole, xy, 0))
