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


def check_output_placement(output: str, unit: str = "micrometer", per_nm: float = 1000) -> None:
    """The output lies at TOTAL: in nanometers for funlib, in its input's `unit` for OME-NGFF readers."""
    name = arrays.ArrayName.parse(output)
    assert open_ds(str(name.path)).roi == TOTAL  # funlib's attributes on the array
    axes, transforms = ome_reader_transforms(name.path.parent)
    assert [a["name"] for a in axes][-3:] == ["z", "y", "x"]
    assert [a.get("unit") for a in axes][-3:] == [unit] * 3
    by_type = {t["type"]: t for t in transforms}
    # as the input writes them: 0.004, not 0.0040000000000000001
    assert by_type["scale"]["scale"][-3:] == [v / per_nm for v in VOXEL_NM]
    assert by_type["translation"]["translation"][-3:] == [b / per_nm for b in TOTAL.begin]
    from ome_zarr_models import open_ome_zarr

    open_ome_zarr(zarr.open_group(str(name.path.parent), mode="r"))  # validates


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_py_image_in_micrometers_runs_at_its_place_in_nanometers(tmp_path, version):
    """Blocks and funlib's attributes in nanometers; the output's OME-NGFF metadata in micrometers."""
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
    # iohub's space axes are in micrometers: read in nanometers
    scale, translation = [v / 1000 for v in VOXEL_NM], [o / 1000 for o in OFFSET_NM]
    with open_ome_zarr(tmp_path / "image.zarr", layout="fov", mode="w-", channel_names=["em"]) as image:
        image.create_image(
            "0",
            data,
            chunks=(1, 1, 8, 8, 8),
            transform=[
                TransformationMeta(type="scale", scale=[1.0, 1.0, *scale]),
                TransformationMeta(type="translation", translation=[0.0, 0.0, *translation]),
            ],
        )
        assert [getattr(a, "unit", None) for a in image.axes][-3:] == ["micrometer"] * 3
    source = arrays.open_input("image.zarr/0")
    assert source.roi.begin == OFFSET_NM and source.voxel_size == VOXEL_NM
    assert source.units == ["nanometer"] * 3

    assert threshold("image.zarr/0", "image.zarr/labels/mask/0", channel=0)

    result = np.asarray(zarr.open_array("image.zarr/labels/mask/0", mode="r")[...])
    np.testing.assert_array_equal(result, (data[0, 0] > 0.5).astype(np.uint8)[voxels(TOTAL)])
    labels = zarr.open_group("image.zarr/labels", mode="r").attrs.asdict()
    assert (labels.get("ome") or labels)["labels"] == ["mask"]
    # iohub reads the input's placement as voxblock does
    with open_ome_zarr(tmp_path / "image.zarr", mode="r") as image:
        assert image.get_effective_scale("0")[-3:] == pytest.approx(scale)
        assert image.get_effective_translation("0")[-3:] == pytest.approx(translation)


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
    check_output_placement("out.zarr/mask/s0", "nanometer", 1)  # the N5 input's unit


def test_n5_conventions_of_bigdataviewer_and_cellmap():
    dims = {"dimensions": [28, 24, 20]}
    bdv = formats.n5_geometry({**dims, "pixelResolution": {"dimensions": [4, 4, 8], "unit": "um"}}, 3, "a")
    assert (bdv.voxel_size, bdv.units) == ([8000, 4000, 4000], ["nanometer"] * 3)  # um: a length
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
        (4.5, "nanometer", r"not whole numbers of nanometers"),
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


# -- N5 pyramids: which attribute means what -----------------------------------------------------


def n5_pyramid(root: Path, levels: dict[str, dict], group: dict | None = None) -> None:
    """Levels (z, y, x volumes halved per level) written by tensorstore, with these attributes."""
    for i, (name, attrs) in enumerate(levels.items()):
        shape = tuple(s // 2**i for s in SHAPE)
        write_n5(root / name, volume(seed=i, shape=shape), attrs)
    if group is not None:
        meta = root / "attributes.json"
        old = json.loads(meta.read_text()) if meta.exists() else {}
        meta.write_text(json.dumps({**old, **group}))


def test_n5_viewer_pyramid_levels_are_s0_resolution_times_their_downsampling_factors(tmp_path):
    """n5-spark writes s0's pixelResolution on every level, and the level's downsamplingFactors."""
    pytest.importorskip("tensorstore")
    s0 = {"pixelResolution": {"unit": "nm", "dimensions": [4, 4, 8]}}
    s1 = {**s0, "downsamplingFactors": [2, 2, 2]}
    n5_pyramid(tmp_path / "bdv.n5" / "em", {"s0": s0, "s1": s1})
    level0, level1 = arrays.open_input("bdv.n5/em/s0"), arrays.open_input("bdv.n5/em/s1")
    assert level0.voxel_size == (8, 4, 4) and level1.voxel_size == (16, 8, 8)  # not [8, 4, 4]
    assert level0.roi.begin == level1.roi.begin == (0, 0, 0)  # corners stay (BDV's shift is to centres)
    assert level1.units == ["nanometer"] * 3

    world = Roi((0, 0, 0), (16 * 8, 8 * 8, 8 * 8))
    block = Roi((0, 0, 0), (16 * 4, 8 * 4, 8 * 4))
    assert voxblock.run_blockwise(
        "threshold", world, block, block, progress=False, num_workers=2,
        input="bdv.n5/em/s1", output="out.zarr/mask/s0", threshold=0.5,
    )  # fmt: skip
    data = np.asarray(zarr.open_array("out.zarr/mask/s0", mode="r")[...])
    np.testing.assert_array_equal(data, (volume(seed=1, shape=(10, 12, 14)) > 0.5)[:8, :8, :8])
    assert open_ds("out.zarr/mask/s0").voxel_size == (16, 8, 8)


def test_n5_viewer_group_defaults_and_n5_ij_plain_lists(tmp_path):
    """pixelResolution and scales on the group (n5-viewer's defaults); n5-ij's plain list."""
    pytest.importorskip("tensorstore")
    group = {
        "pixelResolution": {"unit": "um", "dimensions": [0.004, 0.004, 0.008]},
        "scales": [[1] * 3, [2] * 3],
    }
    n5_pyramid(tmp_path / "c.n5" / "c0", {"s0": {}, "s1": {}}, group)
    assert arrays.open_input("c.n5/c0/s1").voxel_size == (16, 8, 8)
    assert arrays.open_input("c.n5/c0/s0").units == ["nanometer"] * 3

    n5_pyramid(tmp_path / "ij.n5" / "img", {"s0": {"pixelResolution": [4, 4, 8]}})  # no unit
    plain = arrays.open_input("ij.n5/img/s0")
    assert (plain.voxel_size, plain.units) == ((8, 4, 4), [""] * 3)

    # funlib's resolution is the level's own: never multiplied
    n5_pyramid(tmp_path / "f.n5" / "raw", {"s0": {"resolution": [4, 4, 8]}, "s1": {"resolution": [8, 8, 16]}})
    assert arrays.open_input("f.n5/raw/s1").voxel_size == (16, 8, 8)
    # a unit that is no length voxblock knows keeps its numbers
    n5_pyramid(tmp_path / "p.n5" / "raw", {"s0": {"resolution": [2, 2, 2], "units": ["pixel"] * 3}})
    assert arrays.open_input("p.n5/raw/s0").units == ["pixel"] * 3


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"pixelResolution": [1.5, 1.5, 1.5]}, r"not whole numbers"),  # n5-ij's list, read, not skipped
        ({"pixelResolution": {"unit": "nm"}}, r'pixelResolution=.*no "dimensions"'),
        ({"pixelResolution": "4nm"}, r"pixelResolution=.*cannot be read"),
        ({"resolution": ["a", "b", "c"]}, r"resolution=.*cannot be read"),
        ({"resolution": [4, 4]}, r"resolution=.*3 positive numbers"),
        ({"resolution": [4, 4, 8], "offset": [0, 0, None]}, r"offset=.*cannot be read"),
        ({"resolution": [4, 4, 8], "units": "nm"}, r"units=.*cannot be read"),
        (
            {"pixelResolution": [4, 4, 8], "downsamplingFactors": [2, 2]},
            r"downsamplingFactors=.*cannot be read",
        ),
        ({"transform": {"axes": ["z", "y", "x"]}}, r'transform=.*"scale"'),
        ({"resolution": [8, 8, 16], "downsamplingFactors": [2, 2, 2]}, r"read two ways"),
        ({"resolution": [4, 4, 8], "pixelResolution": [8, 8, 8]}, r"place the voxels differently"),
    ],
)
def test_n5_attributes_that_cannot_be_read_are_refused_not_replaced_by_one(tmp_path, attrs, message):
    pytest.importorskip("tensorstore")
    write_n5(tmp_path / "bad.n5" / "s0", volume(), attrs)
    before = snapshot(tmp_path)
    with pytest.raises(voxblock.VoxblockError, match=message):
        voxblock.run_blockwise(
            "threshold", Roi((0, 0, 0), (20, 24, 28)), Roi((0, 0, 0), (8, 8, 8)), Roi((0, 0, 0), (8, 8, 8)),
            progress=False, num_workers=2, input="bad.n5/s0", output="out.zarr/mask",
        )  # fmt: skip
    assert snapshot(tmp_path) == before


# -- one unit for every level and every array -----------------------------------------------------


def test_levels_of_one_image_read_in_one_unit_and_outputs_take_the_inputs(tmp_path):
    """s0 at 1 micrometer and s1 at 2 (translation 0.5): both in nanometers, not 1 um and 2000 nm."""
    from ome_zarr.writer import write_image

    root = zarr.open_group(str(tmp_path / "um.zarr"), mode="w", zarr_format=3)
    write_image(
        volume(),
        root,
        axes="zyx",
        scale={"z": 1.0, "y": 1.0, "x": 1.0},
        axes_units={a: "micrometer" for a in "zyx"},
        scale_factors=[{"z": 2, "y": 2, "x": 2}],
        storage_options={"chunks": (8, 8, 8)},
    )
    attrs = root.attrs.asdict()
    for transform in attrs["ome"]["multiscales"][0]["datasets"][1]["coordinateTransformations"]:
        if transform["type"] == "translation":
            transform["translation"] = [0.5, 0.5, 0.5]
    root.attrs.update(attrs)
    s0, s1 = arrays.open_input("um.zarr/s0"), arrays.open_input("um.zarr/s1")
    assert (s0.voxel_size, s0.units) == ((1000,) * 3, ["nanometer"] * 3)
    assert (s1.voxel_size, s1.roi.begin, s1.units) == ((2000,) * 3, (500,) * 3, ["nanometer"] * 3)

    total = Roi((0, 0, 0), (16000, 16000, 16000))
    block = Roi((0, 0, 0), (8000, 8000, 8000))
    run = dict(progress=False, num_workers=2, input="um.zarr/s0", threshold=0.5)
    assert voxblock.run_blockwise("threshold", total, block, block, output="out.zarr/mask/s0", **run)
    out = arrays.open_input("out.zarr/mask/s0")
    assert (out.voxel_size, out.units) == (s0.voxel_size, s0.units)
    axes, transforms = ome_reader_transforms(tmp_path / "out.zarr" / "mask")
    assert [a["unit"] for a in axes] == ["micrometer"] * 3  # as its input's s0
    assert {t["type"]: t for t in transforms}["scale"]["scale"] == [1.0] * 3


@pytest.mark.bad_input
def test_an_existing_output_in_other_units_is_refused_before_any_work(tmp_path):
    """The same numbers in another unit would be another place: not mixed into one task."""
    from funlib.persistence import prepare_ds

    write_ome_zarr_py(tmp_path / "image.zarr", volume(), "0.5")  # nanometers, once read
    prepare_ds(
        "out.zarr/mask", shape=SHAPE, offset=OFFSET_NM, voxel_size=VOXEL_NM, units=["pixel"] * 3,
        chunk_shape=(8, 8, 8), dtype=np.uint8,
    )  # fmt: skip
    before = snapshot(tmp_path)
    with pytest.raises(voxblock.VoxblockError, match=r"different units \['pixel'"):
        threshold("image.zarr/s0", "out.zarr/mask")
    assert snapshot(tmp_path) == before


# -- a dropped time axis keeps its shards ---------------------------------------------------------


def write_sharded_tzyx(path: Path, shards: tuple[int, ...] | None) -> None:
    """An empty uint8 OME-NGFF 0.5 image t,z,y,x with one time point, at the input's place (ome-zarr-py)."""
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_image

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    options = {"chunks": (1, 8, 8, 8), **({"shards": shards} if shards else {})}
    write_image(
        np.zeros((1, *SHAPE), np.uint8),
        root,
        axes="tzyx",
        scale={"t": 1.0, **dict(zip("zyx", [v / 1000 for v in VOXEL_NM]))},
        axes_units={"t": "second", **{a: "micrometer" for a in "zyx"}},
        fmt=FormatV05(),
        scale_factors=[],
        storage_options=options,
    )
    set_translation(path, [0.0] + [o / 1000 for o in OFFSET_NM])
    assert zarr.open_array(str(path / "s0"), mode="r").nchunks_initialized == 0  # zeros: no chunk kept


@pytest.mark.bad_input
def test_an_existing_sharded_output_with_a_dropped_time_axis_is_refused_for_blocks_inside_a_shard(tmp_path):
    write_ome_zarr_py(tmp_path / "image.zarr", volume(), "0.5")
    write_sharded_tzyx(tmp_path / "out.zarr", shards=(1, 16, 16, 16))
    existing = arrays.open_input("out.zarr/s0", role="output")
    assert isinstance(existing._source_data, formats.DropAxes)
    assert existing._source_data.shards == (16, 16, 16) and existing._source_data.chunks == (8, 8, 8)
    assert arrays.is_sharded(existing) and arrays.spatial_write_unit(existing) == (16, 16, 16)
    before = snapshot(tmp_path)
    with pytest.raises(voxblock.VoxblockError, match=r"written in shards of \(128, 64, 64\)"):
        threshold("image.zarr/s0", "out.zarr/s0")  # blocks of 8 voxels, shards of 16: two writers
    assert snapshot(tmp_path) == before


def test_no_chunk_written_on_n5_and_a_dropped_time_axis(tmp_path):
    """segment's check of a pre-created output: N5 may hold data; a t,z,y,x zarr is counted."""
    write_sharded_tzyx(tmp_path / "t.zarr", shards=None)
    empty = arrays.open_input("t.zarr/s0")
    assert isinstance(empty._source_data, formats.DropAxes) and empty._source_data.shards is None
    assert arrays.no_chunk_written(empty)
    zarr.open_array(str(tmp_path / "t.zarr" / "s0"), mode="r+")[0, :8, :8, :8] = 1
    assert not arrays.no_chunk_written(arrays.open_input("t.zarr/s0"))
    pytest.importorskip("tensorstore")
    write_n5(tmp_path / "c.n5" / "em", volume(), {})
    assert not arrays.no_chunk_written(arrays.open_input("c.n5/em"))  # cannot tell: data may exist


# -- which zarr format new nodes take ---------------------------------------------------------------


def test_new_nodes_in_a_v2_container_without_root_metadata_are_v2(tmp_path):
    """funlib writes zarr v2 arrays and no group above them: outputs beside them are v2 too."""
    from voxblock import nodes

    data = volume()
    raw = zarr.create_array(
        store=str(tmp_path / "f.zarr" / "volumes" / "raw"), shape=SHAPE, chunks=(8, 8, 8), dtype=data.dtype,
        zarr_format=2,
    )  # fmt: skip
    raw[...] = data
    raw.attrs.put({"voxel_size": list(VOXEL_NM), "offset": list(OFFSET_NM), "units": ["nm"] * 3})
    assert not (tmp_path / "f.zarr" / ".zgroup").exists()
    assert nodes.node_format(tmp_path / "f.zarr") is None
    assert nodes.node_format(tmp_path / "f.zarr" / "volumes" / "raw") == 2
    assert nodes.container_format(arrays.ArrayName.parse("f.zarr/mask/s0")) == 2

    assert threshold("f.zarr/volumes/raw", "f.zarr/mask/s0")
    assert not list((tmp_path / "f.zarr").rglob("zarr.json"))  # no v3 node in a v2 container
    assert (tmp_path / "f.zarr" / ".zgroup").is_file() and (
        tmp_path / "f.zarr" / "mask" / ".zgroup"
    ).is_file()
    assert zarr.open_group(str(tmp_path / "f.zarr" / "mask"), mode="r").attrs["multiscales"]  # OME-NGFF 0.4
    result = np.asarray(zarr.open_array("f.zarr/mask/s0", mode="r")[...])
    np.testing.assert_array_equal(result, (data > 0.5).astype(np.uint8)[voxels(TOTAL)])
    # an empty container, or one with v3 nodes, gets v3
    assert nodes.container_format(arrays.ArrayName.parse("new.zarr/a")) == 3


def test_an_output_of_a_funlib_input_in_micrometers_reads_back_as_its_input_and_resumes(tmp_path):
    """funlib's attributes (micrometer, whole numbers) on the input and the output: read as funlib reads
    them, so that the output, though its OME-NGFF metadata says micrometer too, matches on a rerun."""
    from funlib.persistence import prepare_ds

    data = volume()
    raw = prepare_ds(
        "f.zarr/raw", shape=SHAPE, offset=(0, 0, 0), voxel_size=(2, 1, 1), units=["um"] * 3,
        chunk_shape=(8, 8, 8), dtype=np.float32,
    )  # fmt: skip
    raw[raw.roi] = data
    world, block = Roi((0, 0, 0), (32, 16, 16)), Roi((0, 0, 0), (16, 8, 8))
    run = dict(progress=False, num_workers=2, input="f.zarr/raw", output="o.zarr/mask/s0", threshold=0.5)
    assert voxblock.run_blockwise("threshold", world, block, block, **run)
    out = arrays.open_input("o.zarr/mask/s0")
    assert (out.voxel_size, out.units) == ((2, 1, 1), ["um"] * 3)
    axes, _ = ome_reader_transforms(tmp_path / "o.zarr" / "mask")
    assert [a["unit"] for a in axes] == ["micrometer"] * 3
    assert voxblock.run_blockwise("threshold", world, block, block, **run)  # resumes: same units


# -- outputs in their input's units: a label layer napari draws on its image ---------------------------


@pytest.mark.parametrize(
    ("unit", "nanometers"),
    [
        ("micrometer", [4, 8, 3, 11, 800, 123457, 10**12 + 7]),
        ("angstrom", [3, 7, 1]),
        ("meter", [1, 999]),
        ("millimeter", [4, 250001]),
        ("picometer", [3]),
        ("nanometer", [5]),
    ],
)
def test_whole_nanometers_in_another_unit_read_back_exactly(unit, nanometers):
    for nm in nanometers:
        value = formats.in_unit(nm, "nanometer", unit)
        assert value is not None
        assert formats.integer_geometry("t", [value], [-value], [unit]) == ([nm], [-nm], ["nanometer"])
        if nm < 10**6:  # a short number, as a person writes it
            assert len(repr(value)) <= 12, value
    assert repr(formats.in_unit(4, "nanometer", "micrometer")) == "0.004"
    assert formats.in_unit(2, "um", "nanometer") == 2000.0
    assert formats.in_unit(4, "nanometer", "pixel") is None  # no length: not converted


def write_multiscale_um(path: Path, data: np.ndarray, version: str) -> dict:
    """One level written by ome-zarr-py's write_multiscale, in micrometers: its coordinateTransformations."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_multiscale

    transforms = [
        {"type": "scale", "scale": [v / 1000 for v in VOXEL_NM]},
        {"type": "translation", "translation": [o / 1000 for o in OFFSET_NM]},
    ]
    root = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    write_multiscale(
        [data],
        root,
        fmt=FormatV04() if version == "0.4" else FormatV05(),
        axes=[{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
        coordinate_transformations=[transforms],
        storage_options={"chunks": (8, 8, 8)},
    )
    return {t["type"]: t[t["type"]] for t in transforms}


def read_label_without_warnings(label: Path, version: str, caplog) -> tuple[list[dict], dict]:
    """ome-zarr-py's Reader (what napari's ome-zarr plugin uses) on a label group: axes, level 0's numbers."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    caplog.clear()
    with caplog.at_level("WARNING", logger="ome_zarr"):
        nodes = list(Reader(parse_url(str(label), fmt=FormatV04() if version == "0.4" else FormatV05()))())
    assert [r.getMessage() for r in caplog.records] == []  # no "no parent found for Label"
    node = next(n for n in nodes if n.load(Label))
    assert any(n.zarr.basename() == label.parent.parent.name for n in nodes)  # its image, as its parent
    numbers = {t["type"]: t[t["type"]] for t in node.metadata["coordinateTransformations"][0]}
    return node.metadata["axes"], numbers


@pytest.mark.parametrize(("version", "stitch"), [("0.4", "faces"), ("0.5", "context")])
def test_labels_in_an_image_in_micrometers_carry_its_numbers_and_resume(
    tmp_path, capfd, caplog, version, stitch
):
    """A label layer napari draws on its image: scale and translation are the image's numbers, in its unit.

    napari's ome-zarr plugin takes the numbers and ignores units: nanometers on an image in micrometers
    were drawn 1000 times off. funlib's attributes stay in nanometers; a rerun resumes.
    """
    data = volume(seed=5)
    image = tmp_path / "v.zarr"
    level0 = write_multiscale_um(image, data, version)
    source = arrays.open_input("v.zarr/s0")
    assert (source.voxel_size, source.roi.begin) == (VOXEL_NM, OFFSET_NM)
    world, block = source.roi, Roi((0, 0, 0), (8 * 8, 4 * 8, 4 * 8))

    def segment() -> bool:
        return voxblock.segment_blockwise(
            "threshold-label", (8, 4, 4), world, block, block, num_workers=2, progress=False,
            input="v.zarr/s0", output="v.zarr/labels/cells/0", parameters={"threshold": 0.5}, stitch=stitch,
        )  # fmt: skip

    def run() -> bool:
        return voxblock.run_blockwise(
            "threshold", world, block, block, progress=False, num_workers=2,
            input="v.zarr/s0", output="v.zarr/labels/mask/0", threshold=0.5,
        )  # fmt: skip

    assert run() and segment()
    for name in ("mask", "cells"):
        axes, numbers = read_label_without_warnings(image / "labels" / name, version, caplog)
        assert [a.get("unit") for a in axes] == ["micrometer"] * 3
        assert numbers == level0  # the very numbers of the image's level 0
        out = open_ds(str(image / "labels" / name / "0"))  # funlib: nanometers, on the input
        assert (out.roi, out.voxel_size, out.units) == (source.roi, source.voxel_size, ["nanometer"] * 3)
    np.testing.assert_array_equal(zarr.open_array(str(image / "labels/mask/0"))[...], data > 0.5)
    cells = zarr.open_array(str(image / "labels/cells/0"))[...]
    assert ((cells > 0) == (data > 0.5)).all()
    labels = zarr.open_group(str(image / "labels"), mode="r").attrs.asdict()
    assert (labels.get("ome") or labels)["labels"] == ["mask", "cells"]
    from ome_zarr_models import open_ome_zarr

    for group in ("", "labels/mask", "labels/cells"):
        open_ome_zarr(zarr.open_group(str(image / group), mode="r"))  # validates

    capfd.readouterr()
    assert run() and segment()  # a rerun: everything already done
    printed = capfd.readouterr()
    lines = (printed.out + printed.err).splitlines()
    done = [line for line in lines if "blocks processed" in line]  # threshold, segment's pass 1 and relabel
    assert len(done) == 3 and all(" 0 blocks processed" in line for line in done), done
    # the solve reports once, in its own words; had it redone anything, the relabel would start afresh
    assert sum(line.startswith("solve: done") for line in lines) == 1


def test_a_new_level_takes_the_unit_of_the_levels_already_in_its_image(tmp_path):
    """s1 written from an input in nanometers into an image whose s0 is in micrometers: micrometers too."""
    from funlib.persistence import prepare_ds

    write_ome_zarr_py(tmp_path / "image.zarr", volume(), "0.5")
    assert threshold("image.zarr/s0", "out.zarr/mask/s0")
    prepare_ds(
        "out.zarr/mask/s1", shape=(10, 12, 14), offset=OFFSET_NM, voxel_size=(16, 8, 8), units=["nm"] * 3,
        axis_names=["z", "y", "x"],
        chunk_shape=(8, 8, 8), dtype=np.uint8,
    )  # fmt: skip
    s1 = arrays.open_array("out.zarr/mask/s1")
    assert formats.write_ome_metadata(Path("out.zarr"), "mask/s1", s1, ("nanometer",) * 3)
    axes, _ = ome_reader_transforms(tmp_path / "out.zarr" / "mask")
    assert [a["unit"] for a in axes] == ["micrometer"] * 3
    multiscale = zarr.open_group("out.zarr/mask", mode="r").attrs["ome"]["multiscales"][0]
    assert [d["path"] for d in multiscale["datasets"]] == ["s0", "s1"]
    scale, translation = multiscale["datasets"][1]["coordinateTransformations"]
    assert (scale["scale"], translation["translation"]) == ([0.016, 0.008, 0.008], [0.08, 0.04, 0.4])
    again = arrays.open_input("out.zarr/mask/s1")
    assert (again.voxel_size, again.roi.begin, again.units) == ((16, 8, 8), OFFSET_NM, ["nm"] * 3)
