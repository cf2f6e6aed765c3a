"""segment_blockwise takes what real users pass: dacapo's ROI convention as well as voxblock's,
dacapo segment functions that index past the input, pre-created empty outputs; and refuses,
before any work, what it would otherwise run wrongly (connectivity 1, ambiguous ROIs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from funlib.geometry import Coordinate, Roi
from funlib.persistence import open_ds, prepare_ds
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

import voxblock
from voxblock.arrays import open_array
from voxblock.segment.functions import ZeroPadded, connectivities, connectivity_rank
from voxblock.segment.pipeline import block_rois
from voxblock_testing.volumes import write_array

SHAPE = (24, 24, 24)
BLOCK = 8


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory under `root` (as tests/test_bad_input.py)."""
    return {
        str(path.relative_to(root)): (path.read_bytes() if path.is_file() else None)
        for path in sorted(root.rglob("*"))
    }


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True if `a` and `b` are the same labelling up to a permutation that keeps 0."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    if np.any((pairs[0] == 0) != (pairs[1] == 0)):
        return False
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def blobs(shape: tuple[int, ...] = SHAPE, seed: int = 3) -> np.ndarray:
    """Foreground blobs crossing block borders, and a sheet touching the volume's faces."""
    data = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 1.5)
    data = (data > np.quantile(data, 0.6)).astype(np.float32)
    data[:, shape[1] // 2] = 1.0
    return data


def write_volume(root: Path, data: np.ndarray, voxel: int = 1, name: str = "raw") -> str:
    return write_array(
        f"{root}/v.zarr/{name}", data, voxel_size=(voxel,) * data.ndim, chunk_shape=(BLOCK,) * data.ndim
    )


def dacapo_rois(write_shape: Coordinate, context: Coordinate) -> tuple[Roi, Roi]:
    """(read ROI, write ROI) as dacapo's CLI (get_rois) makes them: the read ROI holds the context."""
    return Roi((0,) * len(write_shape), write_shape + context * 2), Roi(context, write_shape)


def voxblock_rois(write_shape: Coordinate) -> tuple[Roi, Roi]:
    write = Roi((0,) * len(write_shape), write_shape)
    return write, write


def segment(function: str, total: Roi, rois: tuple[Roi, Roi], context: Coordinate, **kwargs: Any) -> bool:
    kwargs.setdefault("num_workers", 2)
    return voxblock.segment_blockwise(function, context, total, *rois, progress=False, **kwargs)


# -- (2) the ROI conventions ----------------------------------------------------------


@st.composite
def geometries(draw):
    ndim = draw(st.integers(1, 3))
    offset = Coordinate(draw(st.lists(st.integers(-20, 20), min_size=ndim, max_size=ndim)))
    shape = Coordinate(draw(st.lists(st.integers(1, 12), min_size=ndim, max_size=ndim)))
    context = Coordinate(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    return Roi(offset, shape), context


@settings(max_examples=300, deadline=None)
@given(geometry=geometries(), shift=st.lists(st.integers(-3, 3), min_size=3, max_size=3))
def test_either_convention_reads_the_write_roi_grown_by_the_context(geometry, shift):
    write, context = geometry
    grown = write.grow(context, context)
    at_origin = Roi((0,) * write.dims, write.shape)
    expected = (at_origin.grow(context, context), at_origin)
    assert block_rois(write, write, context) == expected  # voxblock: read = write
    assert block_rois(grown, write, context) == expected  # dacapo: read = write grown by the context
    # a common shift of both ROIs names the same blocks: only their relative placement counts
    moved = Coordinate(shift[: write.dims])
    assert block_rois(grown.shift(moved), write.shift(moved), context) == expected


@settings(max_examples=300, deadline=None)
@given(
    geometry=geometries(),
    begin=st.lists(st.integers(-6, 6), min_size=3, max_size=3),
    end=st.lists(st.integers(-6, 6), min_size=3, max_size=3),
)
def test_any_other_read_roi_is_refused_naming_both_conventions(geometry, begin, end):
    write, context = geometry
    ndim = write.dims
    read = Roi(write.begin + Coordinate(begin[:ndim]), write.shape + Coordinate(end[:ndim]))
    if read in (write, write.grow(context, context)) or read.empty:
        return
    with pytest.raises(voxblock.VoxblockError, match=r"read ROI = write ROI.*grown by the context"):
        block_rois(read, write, context)


@pytest.mark.parametrize(
    ("stitch", "total"),
    [
        ("context", Roi((0, 0, 0), SHAPE)),  # the whole volume
        ("faces", Roi((8, 0, 8), (16, 24, 8))),  # a crop on the block grid: blocks label it alone
    ],
)
def test_both_roi_conventions_cover_exactly_the_total_roi(tmp_path, stitch, total):
    data = blobs()
    raw = write_volume(tmp_path, data)
    context, write_shape = Coordinate((1, 1, 1)), Coordinate((BLOCK,) * 3)
    crop = data[total.to_slices()]
    expected = ndimage.label(crop > 0.5)[0]
    results = {}
    for convention, rois in (
        ("voxblock", voxblock_rois(write_shape)),
        ("dacapo", dacapo_rois(write_shape, context)),
    ):
        output = f"{tmp_path}/v.zarr/{convention}"
        assert segment("threshold-label", total, rois, context, input=raw, output=output, stitch=stitch)
        written = open_ds(output)
        assert written.roi == total, f"{convention}: the output covers {written.roi}, not {total}"
        results[convention] = written[total]
        assert same_partition(results[convention], expected), convention
    np.testing.assert_array_equal(results["voxblock"], results["dacapo"])

    # the run's key is the same for both conventions: dacapo's resumes voxblock's, redoing nothing
    before = snapshot(tmp_path / "v.zarr")
    rois = dacapo_rois(write_shape, context)
    assert segment(
        "threshold-label",
        total,
        rois,
        context,
        input=raw,
        output=f"{tmp_path}/v.zarr/voxblock",
        stitch=stitch,
    )
    report = json.loads((tmp_path / "v.zarr.voxblock" / "voxblock" / "fragments" / "report.json").read_text())
    assert report["processed"] == 0 and report["skipped"] == report["total_blocks"]
    assert snapshot(tmp_path / "v.zarr") == before


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("read", "write"),
    [
        (Roi((0, 0, 0), (12, 12, 12)), Roi((1, 1, 1), (8, 8, 8))),  # bigger than write by 2x, not the context
        (Roi((0, 0, 0), (10, 10, 10)), Roi((0, 0, 0), (8, 8, 8))),  # write + 2 context, offsets not shifted
        (Roi((0, 0, 0), (8, 8, 8)), Roi((2, 2, 2), (8, 8, 8))),  # same shape, different offsets
        (Roi((0, 0, 0), (10, 10, 12)), Roi((1, 1, 1), (8, 8, 8))),  # the context on two axes only
        (Roi((1, 1, 1), (6, 6, 6)), Roi((0, 0, 0), (8, 8, 8))),  # smaller than the write ROI
    ],
)
def test_an_ambiguous_roi_convention_is_refused_before_any_work(tmp_path, monkeypatch, read, write):
    monkeypatch.chdir(tmp_path)
    raw = write_volume(tmp_path, blobs())
    before = snapshot(tmp_path)
    with pytest.raises(voxblock.VoxblockError, match=r"neither convention.*read ROI = write ROI"):
        segment(
            "threshold-label",
            Roi((0, 0, 0), SHAPE),
            (read, write),
            Coordinate((1, 1, 1)),
            input=raw,
            output=f"{tmp_path}/v.zarr/seg",
        )
    assert snapshot(tmp_path) == before


# -- (9) dacapo segment functions index past the input --------------------------------

INDEXING_FUNCTION = """
import numpy as np
from scipy import ndimage


def segment_function(input_array, block, threshold=0.5):
    data = input_array[block.read_roi]  # leaves the input at border blocks: zeros there
    assert data.shape == tuple(block.read_roi.shape / input_array.voxel_size)
    labels, _ = ndimage.label(data > threshold)
    return labels.astype(np.uint32)
"""


@pytest.mark.parametrize("convention", ["voxblock", "dacapo"])
def test_a_segment_function_indexing_its_read_roi_reads_zeros_past_the_input(tmp_path, convention):
    data = blobs((22, 26, 20), seed=5)  # not a multiple of the block: blocks overhang the input
    voxel = 2
    raw = write_volume(tmp_path, data, voxel)
    function = tmp_path / "segment.py"
    function.write_text(INDEXING_FUNCTION)
    context, write_shape = Coordinate((voxel,) * 3), Coordinate((BLOCK * voxel,) * 3)
    rois = voxblock_rois(write_shape) if convention == "voxblock" else dacapo_rois(write_shape, context)
    total = Roi((0, 0, 0), tuple(s * voxel for s in data.shape))
    output = f"{tmp_path}/v.zarr/seg"
    assert segment(str(function), total, rois, context, input=raw, output=output)
    written = open_ds(output)
    assert written.roi == total
    assert same_partition(written[total], ndimage.label(data > 0.5)[0])


def test_zero_padded_reads_zeros_past_the_input_and_is_the_array_otherwise(tmp_path):
    data = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6) + 1
    array = open_array(Path(write_volume(tmp_path, data, 2)))
    view = ZeroPadded(array)
    roi = Roi((-2, 2, 4), (6, 8, 10))  # one voxel before the input on the first axis, past its end
    got = view[roi]
    expected = np.zeros((3, 4, 5), np.float32)
    expected[1:, :3, :4] = data[:, 1:, 2:]
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(view.to_ndarray(roi), expected)
    np.testing.assert_array_equal(view.to_ndarray(roi, fill_value=7)[0], np.full((4, 5), 7))
    np.testing.assert_array_equal(view[array.roi], data)
    np.testing.assert_array_equal(view[0, 1], data[0, 1])
    assert (view.roi, view.voxel_size, view.dtype, view.shape) == (
        array.roi,
        array.voxel_size,
        array.dtype,
        array.shape,
    )
    with pytest.raises(IndexError):  # the array itself keeps funlib.persistence's semantics
        array[roi]


# -- (10) threshold-label's parameters ------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(ndim=st.integers(1, 4), value=st.integers(-2, 90))
def test_only_valid_connectivities_have_a_rank(ndim, value):
    valid = connectivities(ndim)
    if value in valid:
        rank = connectivity_rank(ndim, value)
        assert 1 <= rank <= ndim
    else:
        with pytest.raises(voxblock.VoxblockError, match=r"connectivity .* is not valid"):
            connectivity_rank(ndim, value)


def test_connectivities_are_cc3d_s():
    assert connectivities(3) == {6: 1, 18: 2, 26: 3}
    assert {k: v for k, v in connectivities(2).items() if k in (4, 8)} == {4: 1, 8: 2}
    assert connectivity_rank(2, 6) == 1 and connectivity_rank(2, 26) == 2  # as cc3d reads them in 2-D
    for value in (True, 6.5, "26", None):
        with pytest.raises(voxblock.VoxblockError, match="not valid"):
            connectivity_rank(3, value)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("ndim", "parameters", "message"),
    [
        (3, {"connectivity": 1}, "connectivity 1 is not valid in 3-D; it takes 6, 18, 26"),
        (3, {"connectivity": 5}, "connectivity 5 is not valid in 3-D"),
        (3, {"connectivity": 4}, "connectivity 4 is not valid in 3-D"),
        (3, {"connectivity": 8}, "connectivity 8 is not valid in 3-D"),
        (3, {"connectivity": True}, "connectivity True is not valid"),
        (3, {"connectivity": "full"}, "connectivity 'full' is not valid"),
        (2, {"connectivity": 1}, "connectivity 1 is not valid in 2-D; it takes 4, 6, 8, 18, 26"),
        (2, {"connectivity": 5}, "connectivity 5 is not valid in 2-D"),
        (3, {"treshold": 0.3}, "no parameter treshold; it takes channel, connectivity, threshold"),
        (3, {"threshold": "high"}, "threshold must be a finite number; got 'high'"),
        (3, {"threshold": float("nan")}, "threshold must be a finite number"),
        (3, {"threshold": None}, "threshold must be a finite number"),
        (3, {"channel": "0"}, "channel must be an integer"),
    ],
)
def test_bad_threshold_label_parameters_are_refused_before_any_work(
    tmp_path, monkeypatch, ndim, parameters, message
):
    monkeypatch.chdir(tmp_path)
    raw = write_volume(tmp_path, blobs(SHAPE[:ndim]))
    existing = write_array(f"{tmp_path}/v.zarr/seg", np.full(SHAPE[:ndim], 3, np.uint64))
    before = snapshot(tmp_path)
    with pytest.raises(voxblock.VoxblockError, match=message.replace("(", r"\(").replace(")", r"\)")):
        segment(
            "threshold-label",
            Roi((0,) * ndim, SHAPE[:ndim]),
            voxblock_rois(Coordinate((BLOCK,) * ndim)),
            Coordinate((1,) * ndim),
            input=raw,
            output=existing,
            parameters=parameters,
            overwrite=True,
        )
    assert snapshot(tmp_path) == before


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("channels", "channel", "message"),
    [
        (None, 0, "channel=0 needs an input with one channel axis; it has none"),
        (2, None, r"the input has channels \(2,\); pick one with -p channel=INDEX"),
        (2, 2, "channel 2 is not one of the input's 2"),
    ],
)
def test_a_channel_that_does_not_fit_the_input_is_refused_before_any_work(
    tmp_path, monkeypatch, channels, channel, message
):
    monkeypatch.chdir(tmp_path)
    data = blobs()
    if channels is not None:
        data = np.stack([data] * channels)
    raw = write_array(
        f"{tmp_path}/v.zarr/raw", data, chunk_shape=(BLOCK,) * 3, channel_dims=int(channels is not None)
    )
    before = snapshot(tmp_path)
    with pytest.raises(voxblock.VoxblockError, match=message):
        segment(
            "threshold-label",
            Roi((0, 0, 0), SHAPE),
            voxblock_rois(Coordinate((BLOCK,) * 3)),
            Coordinate((1, 1, 1)),
            input=raw,
            output=f"{tmp_path}/v.zarr/seg",
            parameters={} if channel is None else {"channel": channel},
        )
    assert snapshot(tmp_path) == before


def test_a_channel_of_a_multichannel_input_is_segmented(tmp_path):
    data = blobs()
    raw = write_array(
        f"{tmp_path}/v.zarr/raw", np.stack([1 - data, data]), chunk_shape=(BLOCK,) * 3, channel_dims=1
    )
    total, output = Roi((0, 0, 0), SHAPE), f"{tmp_path}/v.zarr/seg"
    rois = voxblock_rois(Coordinate((BLOCK,) * 3))
    assert segment(
        "threshold-label", total, rois, Coordinate((1, 1, 1)), input=raw, output=output,
        parameters={"channel": 1}, serial=True,
    )  # fmt: skip
    assert same_partition(open_ds(output)[total], ndimage.label(data > 0.5)[0])


@pytest.mark.bad_input
def test_the_cli_refuses_connectivity_1_naming_the_valid_values(tmp_path, monkeypatch):
    from voxblock.cli import main

    monkeypatch.chdir(tmp_path)
    write_volume(tmp_path, blobs())
    before = snapshot(tmp_path)
    arguments = ["segment", "threshold-label", "--input", "v.zarr/raw", "--output", "v.zarr/seg"]
    arguments += ["--block-size", "8", "-p", "connectivity=1", "--no-progress"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code != 0
    assert "connectivity 1 is not valid in 3-D; it takes 6, 18, 26" in result.output
    assert snapshot(tmp_path) == before


def test_every_valid_connectivity_runs_as_asked(tmp_path):
    """Two voxels touching only at a corner: one segment with 26, two with 6 and 18."""
    data = np.zeros((16, 16, 16), np.float32)
    data[7, 7, 7] = data[8, 8, 8] = 1.0
    raw = write_volume(tmp_path, data)
    total, rois = Roi((0, 0, 0), (16, 16, 16)), voxblock_rois(Coordinate((BLOCK,) * 3))
    for connectivity, count in ((6, 2), (18, 2), (26, 1)):
        output = f"{tmp_path}/v.zarr/seg{connectivity}"
        parameters = {"connectivity": connectivity}
        assert segment(
            "threshold-label",
            total,
            rois,
            Coordinate((1, 1, 1)),
            input=raw,
            output=output,
            parameters=parameters,
            serial=True,
        )
        assert len(np.unique(open_ds(output)[total])) - 1 == count


# -- (11) pre-created outputs, and what the CLI teaches ---------------------------------


@pytest.mark.parametrize("stitch", ["faces", "context"])
def test_an_empty_pre_created_output_is_accepted(tmp_path, stitch):
    data = blobs()
    raw = write_volume(tmp_path, data)
    total = Roi((0, 0, 0), SHAPE)
    output = f"{tmp_path}/v.zarr/seg"
    prepare_ds(
        output, shape=SHAPE, offset=(0, 0, 0), voxel_size=(1, 1, 1), chunk_shape=(BLOCK,) * 3, dtype=np.uint64
    )
    rois = voxblock_rois(Coordinate((BLOCK,) * 3))
    assert segment(
        "threshold-label", total, rois, Coordinate((1, 1, 1)), input=raw, output=output, stitch=stitch
    )
    assert same_partition(open_ds(output)[total], ndimage.label(data > 0.5)[0])


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("dtype", "shape", "fill", "overwrite", "message"),
    [
        (np.float32, SHAPE, None, False, "different dtype float32"),
        (np.float32, SHAPE, None, True, "different dtype float32"),  # pass 3 would refuse it: refused now
        (np.uint64, (16, 24, 24), None, False, "does not contain the written ROI"),
        (np.uint64, SHAPE, 5, False, "data this segmentation did not write"),  # holds data: not empty
    ],
)
def test_a_pre_created_output_that_does_not_fit_is_refused_before_any_work(
    tmp_path, monkeypatch, dtype, shape, fill, overwrite, message
):
    monkeypatch.chdir(tmp_path)
    raw = write_volume(tmp_path, blobs())
    output = f"{tmp_path}/v.zarr/seg"
    array = prepare_ds(
        output, shape=shape, offset=(0, 0, 0), voxel_size=(1, 1, 1), chunk_shape=(BLOCK,) * 3, dtype=dtype
    )
    if fill is not None:
        array._source_data[:] = fill
    before = snapshot(tmp_path)
    with pytest.raises(voxblock.VoxblockError, match=message):
        segment(
            "threshold-label",
            Roi((0, 0, 0), SHAPE),
            voxblock_rois(Coordinate((BLOCK,) * 3)),
            Coordinate((1, 1, 1)),
            input=raw,
            output=output,
            overwrite=overwrite,
        )
    assert snapshot(tmp_path) == before


def test_a_foreign_array_where_an_intermediate_goes_is_refused_unless_overwrite(tmp_path, monkeypatch):
    """The same ownership check as the output's (outputs.check_output), with the intermediates' rule."""
    import zarr

    monkeypatch.chdir(tmp_path)
    raw = write_volume(tmp_path, blobs())
    output = f"{tmp_path}/v.zarr/seg"
    zarr.create_array(store=f"{tmp_path}/v.zarr/seg_lut", shape=(2, 3), dtype=np.uint64)
    args = (
        "threshold-label",
        Roi((0, 0, 0), SHAPE),
        voxblock_rois(Coordinate((BLOCK,) * 3)),
        Coordinate((1,) * 3),
    )
    before = snapshot(tmp_path)
    with pytest.raises(voxblock.VoxblockError, match="seg_lut already holds data voxblock did not write"):
        segment(*args, input=raw, output=output)
    assert snapshot(tmp_path) == before
    assert segment(*args, input=raw, output=output, overwrite=True)
    assert zarr.open_array(f"{tmp_path}/v.zarr/seg_lut").attrs["rows"] == ["fragment", "segment"]


@pytest.mark.bad_input
@pytest.mark.parametrize("stitch", ["faces", "context"])
@pytest.mark.parametrize(
    ("container", "message"),
    [
        ("notes.zarr", "is a directory but not a zarr container"),  # a user's folder: not made a group
        ("out.zarr", "is a file, not a zarr container"),  # refused before pass 1, not a FileExistsError after
    ],
)
def test_an_output_container_that_is_not_one_is_refused_before_any_work(
    tmp_path, monkeypatch, stitch, container, message
):
    monkeypatch.chdir(tmp_path)
    raw = write_volume(tmp_path, blobs())
    if container == "notes.zarr":
        (tmp_path / container).mkdir()
        (tmp_path / container / "notes.txt").write_text("mine\n")
    else:
        (tmp_path / container).write_text("not a container\n")
    before = snapshot(tmp_path)
    with pytest.raises(voxblock.VoxblockError, match=message):
        segment(
            "threshold-label",
            Roi((0, 0, 0), SHAPE),
            voxblock_rois(Coordinate((BLOCK,) * 3)),
            Coordinate((1, 1, 1)),
            input=raw,
            output=f"{tmp_path}/{container}/seg",
            stitch=stitch,
        )
    assert snapshot(tmp_path) == before


@pytest.mark.bad_input
def test_the_cli_words_a_refused_segmentation_in_voxels_and_flags(tmp_path, monkeypatch):
    """As `voxblock run`: the API's world units and keyword arguments become voxels and flags."""
    import zarr

    from voxblock.cli import main

    monkeypatch.chdir(tmp_path)
    write_volume(tmp_path, blobs(), voxel=4)
    # an existing output in shards of 16^3 voxels: two workers writing 8^3 blocks would share them
    array = zarr.create_array(
        store=str(tmp_path / "v.zarr" / "seg"), shape=SHAPE, chunks=(8,) * 3, shards=(16,) * 3, dtype="uint64"
    )
    array.attrs.put({"voxel_size": [4, 4, 4], "offset": [0, 0, 0]})
    before = snapshot(tmp_path)
    arguments = ["segment", "threshold-label", "--input", "v.zarr/raw", "--output", "v.zarr/seg"]
    arguments += ["--block-size", "8", "--workers", "2", "--overwrite", "--no-progress"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # a ClickException, no traceback
    assert "shards of (16, 16, 16) voxels" in result.output, result.output
    assert "--workers 1" in result.output and "num_workers" not in result.output, result.output
    assert "world units" not in result.output, result.output
    assert snapshot(tmp_path) == before


def test_voxblock_workers_lists_the_segment_functions():
    from voxblock.cli import main

    result = CliRunner().invoke(main, ["workers"])
    assert result.exit_code == 0, result.output
    listed = result.output.split("Segment functions, for `voxblock segment FUNCTION`")[1]
    assert "threshold-label: threshold, then connected components" in listed
    assert "-p connectivity=6" in listed and "watershed" in listed


def test_voxblock_segment_help_teaches_threshold_label_s_parameters():
    from voxblock.cli import main

    result = CliRunner().invoke(main, ["segment", "--help"])
    assert result.exit_code == 0, result.output
    for text in (
        "threshold-label:",
        "-p threshold=0.5",
        "-p connectivity=6",
        "18 (and edges)",
        "-p channel=None",
    ):
        assert text in result.output
