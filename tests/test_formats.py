"""OME-NGFF and N5 inputs, as the field's own tools write them, run through the real scheduler.

Volumes are written by ome-zarr-py (0.4 on zarr v2, 0.5 on zarr v3), iohub
and tensorstore's n5 driver; ROIs are in nanometers; the output is compared
with the whole-volume threshold and its placement read back by the formats'
own readers (ome-zarr-py's Reader, ome-zarr-models, funlib.persistence).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from funlib.geometry import Coordinate, Roi
from funlib.persistence import open_ds

import voxblock
from voxblock import arrays, formats

SHAPE = (20, 24, 28)  # z, y, x voxels
VOXEL_NM = (8, 4, 4)
OFFSET_NM = (80, 40, 400)
# a region inside the volume, on its voxel grid, in nanometers
TOTAL = Roi((80 + 16, 40 + 8, 400 + 12), (8 * 12, 4 * 16, 4 * 16))
BLOCK = Roi((0, 0, 0), (8 * 8, 4 * 8, 4 * 8))


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def volume(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def voxels(roi: Roi, offset=OFFSET_NM, voxel=VOXEL_NM) -> tuple[slice, ...]:
    begin = [(b - o) // v for b, o, v in zip(roi.begin, offset, voxel)]
    return tuple(slice(b, b + s // v) for b, s, v in zip(begin, roi.shape, voxel))


def set_translation(group: Path, translation: list[float]) -> None:
    """Give level 0 a translation (ome-zarr-py writes zeros; webknossos and iohub write others)."""
    node = zarr.open_group(str(group), mode="r+")
    attrs = node.attrs.asdict()
    holder = attrs.get("ome", attrs)
    transforms = holder["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    for transform in transforms:
        if transform["type"] == "translation":
            transform["translation"] = translation
    node.attrs.update(attrs)


def write_ome_zarr_py(path: Path, data: np.ndarray, version: str, axes: str = "zyx") -> None:
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt = FormatV04() if version == "0.4" else FormatV05()
    root = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    um = [v / 1000 for v in VOXEL_NM]
    scale = {"z": um[0], "y": um[1], "x": um[2]}
    units = {a: "micrometer" for a in "zyx"}
    if "t" in axes:
        scale["t"], units["t"] = 1.0, "second"
    chunks = (1,) * (len(axes) - 3) + (8, 8, 8)
    write_image(
        data,
        root,
        axes=axes,
        scale=scale,
        axes_units=units,
        fmt=fmt,
        scale_factors=[],
        storage_options={"chunks": chunks},
    )
    set_translation(path, [0.0] * (len(axes) - 3) + [o / 1000 for o in OFFSET_NM])


def threshold(input: str, output: str, **kwargs) -> bool:
    return voxblock.run_blockwise(
        "threshold",
        TOTAL,
        BLOCK,
        BLOCK,
        progress=False,
        num_workers=2,
        input=input,
        output=output,
        threshold=0.5,
        **kwargs,
    )


def ome_reader_transforms(image: Path) -> tuple[list[dict], list[dict]]:
    """ome-zarr-py's Reader: the image's axes and the first level's coordinateTransformations."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    node = next(iter(Reader(parse_url(str(image)))()))
    return node.metadata["axes"], node.metadata["coordinateTransformations"][0]


def check_output_placement(output: str) -> None:
    """The output lies at TOTAL, in nanometers, for funlib and for OME-NGFF readers."""
    name = arrays.ArrayName.parse(output)
    assert open_ds(str(name.path)).roi == TOTAL  # funlib's attributes on the array
    axes, transforms = ome_reader_transforms(name.path.parent)
    assert [a["name"] for a in axes][-3:] == ["z", "y", "x"]
    assert [a.get("unit") for a in axes][-3:] == ["nanometer"] * 3
    by_type = {t["type"]: t for t in transforms}
    assert by_type["scale"]["scale"][-3:] == list(VOXEL_NM)
    assert by_type["translation"]["translation"][-3:] == list(TOTAL.begin)
    from ome_zarr_models import open_ome_zarr

    open_ome_zarr(zarr.open_group(str(name.path.parent), mode="r"))  # validates


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_py_image_in_micrometers_runs_at_its_place_in_nanometers(tmp_path, version):
    data = volume()
    write_ome_zarr_py(tmp_path / "image.zarr", data, version)
    source = arrays.open_input("image.zarr/s0")
    assert source.voxel_size == VOXEL_NM and source.roi.begin == OFFSET_NM
    assert source.units == ["nanometer"] * 3  # 0.004 micrometer is 4 nanometer, not 0

    assert threshold("image.zarr/s0", "out.zarr/mask/s0")

    result = np.asarray(zarr.open_array("out.zarr/mask/s0", mode="r")[...])
    np.testing.assert_array_equal(result, (data > 0.5).astype(np.uint8)[voxels(TOTAL)])
    check_output_placement("out.zarr/mask/s0")
    # the output's OME-NGFF version follows its zarr format
    out = zarr.open_group("out.zarr/mask", mode="r")
    assert (out.metadata.zarr_format, "ome" in out.attrs) in ((3, True), (2, False))


def test_ome_zarr_py_tczyx_with_one_time_point_and_channels(tmp_path):
    data = volume(seed=2, shape=(1, 2, *SHAPE))
    write_ome_zarr_py(tmp_path / "image.zarr", data, "0.5", axes="tczyx")
    source = arrays.open_input("image.zarr/s0")
    assert source.shape == (2, *SHAPE) and source.types == ["channel", "space", "space", "space"]
    assert source.roi == Roi(OFFSET_NM, tuple(s * v for s, v in zip(SHAPE, VOXEL_NM)))

    assert threshold("image.zarr/s0", "out.zarr/mask/s0", channel=1)

    result = np.asarray(zarr.open_array("out.zarr/mask/s0", mode="r")[...])
    np.testing.assert_array_equal(result, (data[0, 1] > 0.5).astype(np.uint8)[voxels(TOTAL)])
    check_output_placement("out.zarr/mask/s0")


def test_iohub_image_runs_at_its_place_and_labels_go_into_the_image(tmp_path):
    from iohub.ngff import TransformationMeta, open_ome_zarr

    data = volume(seed=3, shape=(1, 1, *SHAPE))
    with open_ome_zarr(tmp_path / "image.zarr", layout="fov", mode="w-", channel_names=["em"]) as image:
        image.create_image(
            "0",
            data,
            chunks=(1, 1, 8, 8, 8),
            transform=[
                TransformationMeta(type="scale", scale=[1.0, 1.0, *VOXEL_NM]),
                TransformationMeta(type="translation", translation=[0.0, 0.0, *OFFSET_NM]),
            ],
        )
    source = arrays.open_input("image.zarr/0")
    assert source.roi.begin == OFFSET_NM and source.voxel_size == VOXEL_NM

    assert threshold("image.zarr/0", "image.zarr/labels/mask/0", channel=0)

    result = np.asarray(zarr.open_array("image.zarr/labels/mask/0", mode="r")[...])
    np.testing.assert_array_equal(result, (data[0, 0] > 0.5).astype(np.uint8)[voxels(TOTAL)])
    labels = zarr.open_group("image.zarr/labels", mode="r").attrs.asdict()
    assert (labels.get("ome") or labels)["labels"] == ["mask"]
    # iohub reads the input's placement as voxblock does
    with open_ome_zarr(tmp_path / "image.zarr", mode="r") as image:
        assert image.get_effective_scale("0")[-3:] == list(VOXEL_NM)
        assert image.get_effective_translation("0")[-3:] == list(OFFSET_NM)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_the_parser_agrees_with_funlib_open_ome_ds_on_whole_nanometers(tmp_path, version):
    """funlib's reader (iohub) on an image in whole nanometers with a multiscale-level translation."""
    from funlib.persistence import open_ome_ds
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    root = zarr.open_group(str(tmp_path / "nm.zarr"), mode="w", zarr_format=2 if version == "0.4" else 3)
    write_image(
        volume(),
        root,
        axes="zyx",
        scale=dict(zip("zyx", map(float, VOXEL_NM))),
        axes_units={a: "nanometer" for a in "zyx"},
        fmt=FormatV04() if version == "0.4" else FormatV05(),
        scale_factors=[{"z": 2, "y": 2, "x": 2}],
        storage_options={"chunks": (8, 8, 8)},
    )
    set_translation(tmp_path / "nm.zarr", [float(o) for o in OFFSET_NM])
    attrs = root.attrs.asdict()
    holder = attrs.get("ome", attrs)
    holder["multiscales"][0]["coordinateTransformations"] = [
        {"type": "scale", "scale": [1.0, 1.0, 1.0]},
        {"type": "translation", "translation": [8.0, 0.0, 4.0]},
    ]
    root.attrs.update(attrs)
    for level in ("s0", "s1"):
        mine = arrays.open_input(f"nm.zarr/{level}")
        theirs = open_ome_ds(tmp_path / "nm.zarr", level)
        assert (mine.roi, mine.voxel_size) == (theirs.roi, theirs.voxel_size)
        assert mine.axis_names == theirs.axis_names and mine.units == theirs.units


def write_n5(path: Path, data: np.ndarray, attrs: dict) -> None:
    import tensorstore as ts

    spec = {
        "driver": "n5",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "dimensions": list(data.shape[::-1]),
            "blockSize": [8, 8, 8],
            "dataType": str(data.dtype),
            "compression": {"type": "gzip"},
        },
        "create": True,
    }
    store = ts.open(spec).result()
    store[...] = data.T  # N5 is x, y, z
    meta = json.loads((path / "attributes.json").read_text())
    (path / "attributes.json").write_text(json.dumps({**meta, **attrs}))


def test_n5_with_resolution_and_offset_runs_at_its_place(tmp_path):
    pytest.importorskip("tensorstore")
    data = volume(seed=4)
    attrs = {"resolution": list(VOXEL_NM[::-1]), "offset": list(OFFSET_NM[::-1]), "units": ["nm"] * 3}
    write_n5(tmp_path / "cell.n5" / "em" / "s0", data, attrs)
    source = arrays.open_input("cell.n5/em/s0")
    assert source.shape == SHAPE and source.voxel_size == VOXEL_NM and source.roi.begin == OFFSET_NM

    assert threshold("cell.n5/em/s0", "out.zarr/mask/s0")

    result = np.asarray(zarr.open_array("out.zarr/mask/s0", mode="r")[...])
    np.testing.assert_array_equal(result, (data > 0.5).astype(np.uint8)[voxels(TOTAL)])
    check_output_placement("out.zarr/mask/s0")


def test_n5_conventions_of_bigdataviewer_and_cellmap():
    dims = {"dimensions": [28, 24, 20]}
    bdv = formats.n5_geometry({**dims, "pixelResolution": {"dimensions": [4, 4, 8], "unit": "um"}}, 3, "a")
    assert (bdv.voxel_size, bdv.units) == ([8, 4, 4], ["um"] * 3)
    cellmap = {
        "transform": {
            "axes": ["z", "y", "x"],
            "ordering": "C",
            "scale": [8.0, 4.0, 4.0],
            "translate": [80.0, 40.0, 400.0],
            "units": ["nm", "nm", "nm"],
        }
    }
    geometry = formats.n5_geometry({**dims, **cellmap}, 3, "a")
    assert (geometry.voxel_size, geometry.offset, geometry.axis_names) == (
        [8, 4, 4],
        [80, 40, 400],
        list("zyx"),
    )
    # tensorstore reads `resolution` and `units` (x, y, z) itself: the same voxel size, reversed
    ts = pytest.importorskip("tensorstore")
    path = Path("r.n5/s0")
    write_n5(path, volume(), {"resolution": [4, 4, 8], "units": ["nm"] * 3})
    store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(path)}}).result()
    units = [(u.multiplier, u.base_unit) for u in store.dimension_units]
    assert units[::-1] == [(v, "nm") for v in arrays.open_input("r.n5/s0").voxel_size]


def test_n5_without_tensorstore_says_how_to_install_it(tmp_path, monkeypatch):
    pytest.importorskip("tensorstore")
    write_n5(tmp_path / "cell.n5" / "em", volume(), {})
    monkeypatch.setitem(sys.modules, "tensorstore", None)
    with pytest.raises(voxblock.VoxblockError, match=r"pip install 'voxblock\[n5\]'"):
        arrays.open_input("cell.n5/em")


# -- refusals -------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(path.relative_to(root)): (path.read_bytes() if path.is_file() else None)
        for path in sorted(root.rglob("*"))
    }


@pytest.mark.bad_input
def test_n5_output_is_refused_before_anything_runs(tmp_path):
    write_ome_zarr_py(tmp_path / "image.zarr", volume(), "0.5")
    before = snapshot(tmp_path)
    with pytest.raises(voxblock.VoxblockError, match=r"does not write N5.*\.zarr"):
        threshold("image.zarr/s0", "out.n5/mask/s0")
    assert snapshot(tmp_path) == before


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("scale", "unit", "message"),
    [
        (4.5, "nanometer", r"not whole numbers of nanometers either"),
        (0.5, None, r"not whole numbers"),
    ],
)
def test_a_scale_that_is_no_whole_number_is_refused_not_rounded(tmp_path, scale, unit, message):
    from ome_zarr.writer import write_image

    root = zarr.open_group(str(tmp_path / "image.zarr"), mode="w")
    write_image(
        volume(),
        root,
        axes="zyx",
        scale={"z": 8.0, "y": scale, "x": scale},
        axes_units={a: unit for a in "zyx"} if unit else None,
        scale_factors=[],
        storage_options={"chunks": (8, 8, 8)},
    )
    before = snapshot(tmp_path)
    with pytest.raises(voxblock.VoxblockError, match=message):
        voxblock.run_blockwise(
            "threshold",
            Roi((0, 0, 0), (64, 32, 32)),
            BLOCK,
            BLOCK,
            progress=False,
            num_workers=2,
            input="image.zarr/s0",
            output="out.zarr/mask/s0",
        )
    assert snapshot(tmp_path) == before


@pytest.mark.bad_input
def test_a_new_level_in_the_input_image_is_refused(tmp_path):
    write_ome_zarr_py(tmp_path / "image.zarr", volume(), "0.4")
    before = snapshot(tmp_path)
    with pytest.raises(voxblock.VoxblockError, match=r"is an OME-NGFF image with levels s0"):
        threshold("image.zarr/s0", "image.zarr/s1")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["n5", "tczyx"])
def test_blocks_read_with_context_from_n5_and_dropped_time_axes(tmp_path, kind):
    """Reads past the write ROI (and halos of chunk faces, where voxblock keeps them) work on both."""
    if kind == "n5":
        pytest.importorskip("tensorstore")
        data = volume(seed=5)
        attrs = {"resolution": list(VOXEL_NM[::-1]), "offset": list(OFFSET_NM[::-1])}
        write_n5(tmp_path / "cell.n5" / "em", data, attrs)
        name, mask, channel = "cell.n5/em", data > 0.5, -1
    else:
        data = volume(seed=6, shape=(1, 1, *SHAPE))
        write_ome_zarr_py(tmp_path / "image.zarr", data, "0.4", axes="tczyx")
        name, mask, channel = "image.zarr/s0", data[0, 0] > 0.5, 0
    context = Roi((-8, -4, -4), BLOCK.shape + Coordinate((16, 8, 8)))
    assert voxblock.run_blockwise(
        "threshold",
        TOTAL,
        context,
        BLOCK,
        progress=False,
        num_workers=2,
        input=name,
        output="out.zarr/mask/s0",
        channel=channel,
        halo=True,
    )
    result = np.asarray(zarr.open_array("out.zarr/mask/s0", mode="r")[...])
    written = open_ds("out.zarr/mask/s0").roi
    np.testing.assert_array_equal(result, mask.astype(np.uint8)[voxels(written)])
