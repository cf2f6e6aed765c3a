"""`voxblock downsample`: blockwise multiscale pyramids against a whole-volume numpy reference.

Conventions under test: a level's shape is the floor of the one below over the factors (voxels
past the last whole window are not used); its voxel size is the one below times the factors and
its translation the one below (offset = translation, the corner of voxel 0); mean rounds half to
even (np.rint) for integers and is a float64 mean cast back for floats; mode is the most frequent
label of a window, ties to the smallest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voxblock import VoxblockError
from voxblock.cli import main
from voxblock.rundir import RunDirectory
from voxblock_workers.downsample import (
    Downsample,
    default_mode,
    downsample,
    downsample_blockwise,
    parse_factors,
)

# ome-zarr-py 0.18 deprecates the arguments these tests write an OME-NGFF 0.4 image with
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ome_zarr")

# -- the whole-volume reference -------------------------------------------------------------------


def windows(data: np.ndarray, factors) -> np.ndarray:
    """Every whole window of `data`, flattened on a last axis (floor: the partial ones dropped)."""
    out = [s // f for s, f in zip(data.shape, factors)]
    cut = data[tuple(slice(0, o * f) for o, f in zip(out, factors))]
    split = cut.reshape([x for o, f in zip(out, factors) for x in (o, f)])
    order = list(range(0, 2 * len(out), 2)) + list(range(1, 2 * len(out), 2))
    return split.transpose(order).reshape(*out, -1)


def reference_level(data: np.ndarray, factors, mode: str) -> np.ndarray:
    w = windows(data, factors)
    if mode == "mean":
        mean = w.mean(axis=-1, dtype=np.float64)
        return (mean if data.dtype.kind == "f" else np.rint(mean)).astype(data.dtype)
    flat = w.reshape(-1, w.shape[-1])
    found = np.empty(len(flat), dtype=data.dtype)
    for i, window in enumerate(flat):
        values, counts = np.unique(window, return_counts=True)  # sorted: the first maximum is the smallest
        found[i] = values[counts.argmax()]
    return found.reshape(w.shape[:-1])


def reference_pyramid(data: np.ndarray, per_level, mode: str) -> list[np.ndarray]:
    levels = [data]
    for factors in per_level:
        levels.append(reference_level(levels[-1], factors, mode))  # level k+1 from level k
    return levels


def ome_image(path: Path, data: np.ndarray, scale, translation, chunks) -> str:
    """An OME-NGFF 0.4 image with one level, s0, written by ome-zarr-py."""
    from ome_zarr.writer import write_multiscale

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    transforms = [
        [{"type": "scale", "scale": list(scale)}, {"type": "translation", "translation": list(translation)}]
    ]
    write_multiscale(
        [data], group, axes="zyx", coordinate_transformations=transforms, storage_options={"chunks": chunks}
    )
    return f"{path}/s0"


def read_back(group: Path) -> list[dict]:
    """Every level as ome-zarr-py's Reader sees it (data, scale, translation), validated first."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models import open_ome_zarr

    open_ome_zarr(zarr.open_group(str(group), mode="r"))  # raises where the metadata does not validate
    node = next(iter(Reader(parse_url(str(group)))()))
    transforms = node.metadata["coordinateTransformations"]
    levels = []
    for data, level in zip(node.data, transforms):
        kinds = {t["type"]: t for t in level}
        levels.append(
            {
                "data": np.asarray(data),
                "scale": kinds["scale"]["scale"],
                "translation": kinds.get("translation", {}).get("translation"),
            }
        )
    return levels


# -- the reduction ---------------------------------------------------------------------------------


def test_mean_rounds_half_to_even_and_mode_breaks_ties_to_the_smallest():
    data = np.array([[1, 2], [2, 3], [3, 4], [0, 1]], dtype=np.uint8)  # means 1.5, 2.5, 3.5, 0.5
    assert downsample(data, (1, 2), "mean").ravel().tolist() == [2, 2, 4, 0]  # as np.rint
    labels = np.array([[7, 3, 3, 7], [5, 5, 9, 1], [2, 2, 2, 8]], dtype=np.uint64)
    assert downsample(labels, (1, 4), "mode").ravel().tolist() == [3, 5, 2]
    big = np.array([[2**64 - 1, 2**64 - 2]], dtype=np.uint64)  # exact past float64: 2**64 - 1.5 -> even
    assert downsample(big, (1, 2), "mean").tolist() == [[2**64 - 2]]
    signed = np.array([[-3, -2], [-5, 0]], dtype=np.int64)  # -2.5 -> -2, -2.5 -> -2
    assert downsample(signed, (1, 2), "mean").ravel().tolist() == [-2, -2]


def test_default_mode_and_factors():
    assert [default_mode(d) for d in ("uint32", "uint64", "int64", "bool")] == ["mode"] * 4
    assert [default_mode(d) for d in ("uint8", "uint16", "int16", "float32", "float64")] == ["mean"] * 5
    assert parse_factors(None, 3, 2, (8, 4, 4)) == [(1, 2, 2), (2, 2, 2)]  # towards isotropic
    assert parse_factors("1,2,2", 3, 2, (8, 4, 4)) == [(1, 2, 2), (1, 2, 2)]
    assert parse_factors("[[1,2,2],[2,2,2]]", 3, 2, (1, 1, 1)) == [(1, 2, 2), (2, 2, 2)]
    assert "uint32/uint64" in CliRunner().invoke(main, ["downsample", "--help"]).output


# -- blockwise equals the whole volume -------------------------------------------------------------

DTYPES = {"uint8": "mean", "int16": "mean", "float32": "mean", "uint64": "mode", "uint32": "mode"}


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    mode = draw(st.sampled_from(["mean", "mode"])) if dtype != "float32" else "mean"
    levels = draw(st.integers(1, 3))
    per_level = [
        draw(st.lists(st.integers(1, 3), min_size=3, max_size=3).filter(lambda f: max(f) > 1))
        for _ in range(levels)
    ]
    total = np.prod(per_level, axis=0)
    shape = [draw(st.integers(int(t), int(t) + 5)) for t in total]  # odd shapes the factors do not divide
    block = [draw(st.integers(1, 4)) for _ in range(3)]
    seed = draw(st.integers(0, 2**16))
    return dtype, mode, per_level, shape, block, seed


def sample(dtype: str, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "float32":
        return (rng.integers(0, 64, shape) / 8).astype(np.float32)  # sums exact in float64
    if dtype in ("uint64", "uint32"):
        return rng.choice(np.array([0, 3, 7, 2**31 + 1], dtype=dtype), size=shape)  # few labels: ties
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, shape, dtype=dtype)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases(), batch=st.integers(1, 3))
def test_every_level_equals_the_whole_volume_reference(tmp_path_factory, case, batch):
    """Also handed out in batches of batch^3 blocks (`batch`): the same levels."""
    dtype, mode, per_level, shape, block, seed = case
    tmp = tmp_path_factory.mktemp("pyramid")
    data = sample(dtype, shape, seed)
    source = ome_image(tmp / "img.zarr", data, (8, 4, 2), (16, 8, 6), (4, 4, 4))
    pyramid = downsample_blockwise(
        source, levels=len(per_level), factors=json.dumps(per_level), mode=mode, block_size=block,
        progress=False, serial=True, batch=batch,
    )  # fmt: skip
    assert pyramid.succeeded
    expected = reference_pyramid(data, per_level, mode)
    levels = read_back(tmp / "img.zarr")
    assert len(levels) == len(per_level) + 1
    size = np.array([8, 4, 2])
    for k, (level, reference) in enumerate(zip(levels, expected)):
        np.testing.assert_array_equal(level["data"], reference, err_msg=f"level {k}")
        assert level["data"].dtype == data.dtype
        assert level["scale"] == pytest.approx(list(size * np.prod(per_level[:k], axis=0)))
        assert level["translation"] == [16, 8, 6]  # the corner of voxel 0 stays


def test_a_new_pyramid_from_a_plain_array_in_zarr_v3_with_two_workers_through_the_cli(tmp_path):
    data = sample("uint16", (21, 35, 40), 3)
    root = zarr.open_group(str(tmp_path / "v.zarr"), mode="w", zarr_format=3)
    array = root.create_array("raw", data=data, chunks=(8, 8, 8))
    array.attrs.update(
        {"voxel_size": [40, 4, 4], "offset": [40, 0, 8], "axis_names": ["z", "y", "x"], "units": ["nm"] * 3}
    )
    args = ["downsample", f"{tmp_path}/v.zarr/raw", "--levels", "3", "--factors", "[[1,2,2],[1,2,2],[2,2,2]]"]
    refused = CliRunner().invoke(main, [*args, "--no-progress"])
    assert refused.exit_code != 0 and "--output" in refused.output and "raw_pyramid" in refused.output
    result = CliRunner().invoke(
        main, [*args, "--output", f"{tmp_path}/v.zarr/raw_pyramid", "--block-size", "4,8,8", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    batch = ["--batch", "2", "--no-progress"]
    batched = CliRunner().invoke(
        main, [*args, "--output", f"{tmp_path}/v.zarr/batched", "--block-size", "4,8,8", *batch]
    )
    assert batched.exit_code == 0 and "batches of 2x2x2" in batched.output, batched.output
    unbatched = read_back(tmp_path / "v.zarr/raw_pyramid")
    for level, same in zip(unbatched, read_back(tmp_path / "v.zarr/batched"), strict=True):
        np.testing.assert_array_equal(same["data"], level["data"])
    per_level = [(1, 2, 2), (1, 2, 2), (2, 2, 2)]
    expected = reference_pyramid(data, per_level, "mean")
    levels = read_back(tmp_path / "v.zarr/raw_pyramid")
    attrs = json.loads((tmp_path / "v.zarr/raw_pyramid/zarr.json").read_text())["attributes"]
    assert attrs["ome"]["version"] == "0.5"
    assert [d["path"] for d in attrs["ome"]["multiscales"][0]["datasets"]] == ["s0", "s1", "s2", "s3"]
    for k, (level, reference) in enumerate(zip(levels, expected)):
        np.testing.assert_array_equal(level["data"], reference, err_msg=f"level {k}")
        assert level["translation"] == [40, 0, 8]
    assert [level["scale"] for level in levels] == [[40, 4, 4], [40, 8, 8], [40, 16, 16], [80, 32, 32]]
    again = CliRunner().invoke(
        main, [*args, "--output", f"{tmp_path}/v.zarr/raw_pyramid", "--block-size", "4,8,8"]
    )
    assert again.exit_code == 0 and "0 blocks processed" in again.output  # resumed: nothing to do


# -- resuming ---------------------------------------------------------------------------------------

DRIVER = """
import sys
from voxblock_workers.downsample import downsample_blockwise
pyramid = downsample_blockwise(sys.argv[1], levels=2, factors="2,2,2", block_size=1, num_workers=1,
                               progress=False)
sys.exit(0 if pyramid.succeeded else 1)
"""


def test_a_killed_run_resumes_to_the_reference(tmp_path):
    data = sample("uint8", (24, 24, 24), 5)
    source = ome_image(tmp_path / "img.zarr", data, (4, 4, 4), (0, 0, 0), (10, 10, 10))
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, source], start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    run_dir = RunDirectory(tmp_path / "img.zarr.voxblock/s1")
    deadline = time.monotonic() + 60
    while run_dir.done_blocks() < 100:
        assert driver.poll() is None, "the run ended before it was killed"
        assert time.monotonic() < deadline, "no blocks done in time"
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    done = run_dir.done_blocks()
    assert 100 <= done < 12**3
    pyramid = downsample_blockwise(
        source, levels=2, factors="2,2,2", block_size=1, num_workers=2, progress=False
    )
    assert pyramid.succeeded
    assert pyramid.report.tasks[0].skipped >= done
    for level, reference in zip(
        read_back(tmp_path / "img.zarr"), reference_pyramid(data, [(2, 2, 2)] * 2, "mean")
    ):
        np.testing.assert_array_equal(level["data"], reference)


# -- refused before any work ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"factors": "0,2,2"}, "positive integers"),
        ({"factors": "2,2"}, "positive integers"),
        ({"factors": [2.5, 2, 2]}, "positive integers"),
        ({"factors": "1,1,1"}, "do not downsample"),
        ({"factors": "[[2,2,2]]", "levels": 2}, "one per level"),
        ({"levels": 0}, "levels must be a positive integer"),
        ({"mode": "median"}, "mode must be one of"),
        ({"levels": 4}, "zero-size axis"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_bad_options_are_refused_before_any_work(tmp_path, keywords, message):
    source = ome_image(
        tmp_path / "img.zarr", sample("uint8", (9, 17, 17), 1), (1, 1, 1), (0, 0, 0), (8, 8, 8)
    )
    with pytest.raises(VoxblockError, match=message):
        downsample_blockwise(source, **{"factors": "2,2,2", **keywords}, progress=False)
    assert sorted(p.name for p in (tmp_path / "img.zarr").iterdir() if not p.name.startswith(".")) == ["s0"]
    assert not (tmp_path / "img.zarr.voxblock").exists()


def test_mode_on_float_input_and_a_plain_input_without_output_are_refused(tmp_path):
    source = ome_image(
        tmp_path / "img.zarr", sample("float32", (8, 8, 8), 1), (1, 1, 1), (0, 0, 0), (8, 8, 8)
    )
    with pytest.raises(VoxblockError, match="needs integer labels"):
        downsample_blockwise(source, mode="mode", progress=False)
    result = CliRunner().invoke(main, ["downsample", source, "--mode", "mode", "--no-progress"])
    assert result.exit_code != 0 and "needs integer labels" in result.output
    with pytest.raises(VoxblockError, match="positive integers"):  # the worker checks too (voxblock run)
        from funlib.geometry import Roi

        from voxblock import run_blockwise

        block = Roi((0, 0, 0), (4, 4, 4))
        worker = Downsample(input=source, output=f"{tmp_path}/img.zarr/s1", factors=[2, 0, 2])
        run_blockwise(worker, Roi((0, 0, 0), (4, 8, 8)), block, block, num_workers=1, progress=False)
    assert not (tmp_path / "img.zarr/s1").exists()
