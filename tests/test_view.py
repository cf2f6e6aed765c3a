"""`voxblock view`: arrays, an OME-NGFF pyramid and a run's done/failed blocks in neuroglancer,
loaded by a real headless Chromium (Debian's, installed by ci/chromium.sh) and checked on the
screenshot's pixels: the image's grey values vary, the segmentation's colours are many, the
done blocks' borders are green, the failed block's red, and a pyramid lands where its level 0 does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from funlib.geometry import Roi

import voxblock
from voxblock import view
from voxblock_testing.volumes import blobs, random_labels
from voxblock_testing.workers import Flaky

CHROMIUM_SH = Path(__file__).resolve().parents[1] / "ci" / "chromium.sh"
SHAPE = (32, 64, 64)
VOXEL = (8, 4, 4)
OFFSET = (80, 40, 40)
BLOCK = Roi((0, 0, 0), (128, 64, 64))
TOTAL = Roi(OFFSET, tuple(s * v for s, v in zip(SHAPE, VOXEL)))


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and headless Chromium is not available: {reason}")
    pytest.skip(f"headless Chromium is not available: {reason}")


@pytest.fixture(scope="session")
def chromium() -> dict[str, str]:
    """Chromium and ChromeDriver (installed by ci/chromium.sh if missing), as voxblock view's env."""
    try:
        import neuroglancer  # noqa: F401
    except ImportError as error:
        _unavailable(f"the view extra is not installed: {error}")
    try:
        found = subprocess.run([str(CHROMIUM_SH)], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as error:
        _unavailable(f"ci/chromium.sh: {error}")
    if found.returncode != 0:
        _unavailable(f"ci/chromium.sh exited {found.returncode}: {found.stderr.strip()[-500:]}")
    browser, driver = found.stdout.split()[:2]
    return {"VOXBLOCK_CHROMIUM": browser, "VOXBLOCK_CHROMEDRIVER": driver}


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Smooth float blobs, a label volume, and a run over 2x4x4 blocks (a copy of the blobs) whose
    block at the central section's top-left corner failed."""
    d = tmp_path_factory.mktemp("view")
    kw = dict(voxel_size=VOXEL, offset=OFFSET, chunk_shape=(16, 32, 32))
    raw = blobs(f"{d}/v.zarr/raw", SHAPE, binary=False, sigma=3, **kw)
    seg = random_labels(f"{d}/v.zarr/seg", SHAPE, cell=8, num_labels=40, **kw)
    worker = Flaky(
        input=raw,
        output=f"{d}/v.zarr/out",
        attempts_dir=f"{d}/attempts",
        fail_times=99,
        fail_at=[250, 60, 60],
    )
    ok = voxblock.run_blockwise(worker, TOTAL, BLOCK, BLOCK, num_workers=2, max_retries=0, progress=False)
    assert not ok
    return {"raw": raw, "seg": seg, "run_dir": f"{d}/v.zarr.voxblock/out", "dir": str(d)}


def rgb(png: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(png).convert("RGB")).astype(int)


# -- what is shown: pure functions -------------------------------------------------------------------


def test_layer_kind_from_dtype():
    assert view.layer_kind("uint64") == view.layer_kind(np.uint32) == "segmentation"
    for dtype in ("uint8", "uint16", "int64", "float32", "bool"):
        assert view.layer_kind(dtype) == "image"


def test_transform_puts_voxels_in_nanometers_and_channels_on_a_channel_axis():
    v = view.ArrayView(
        "a", "/x", "zarr3", "float32", (3, 10, 20), ("channel", "space", "space"), (4, 2), (8, 6)
    )
    transform = view.source_transform(v, ["y", "x"])
    assert transform["outputDimensions"] == {"c^": [1.0, ""], "y": [4.0, "nm"], "x": [2.0, "nm"]}
    assert list(transform["inputDimensions"]) == ["dim_0", "dim_1", "dim_2"]
    assert [row[-1] for row in transform["matrix"]] == [0.0, 2.0, 3.0]  # offset in voxels
    shader, controls = view.image_shader(v)
    assert "emitRGB" in shader and set(controls) == {"red", "green", "blue"}
    layer = view.data_layer(v, "zarr3://http://h/0/", ["y", "x"])
    assert layer["type"] == "image" and layer["source"]["transform"] == transform


def test_state_centres_the_first_array_and_boxes_the_blocks(scene):
    views = [view.describe(scene["raw"])[0], view.describe(scene["seg"])[0]]
    assert views[0].value_range is not None and views[1].fmt in ("zarr2", "zarr3")
    boxes = view.block_boxes(scene["run_dir"])
    assert boxes.done_total == 31 and len(boxes.done) == 31
    assert boxes.failed == [([208, 40, 40], [336, 104, 104])]
    state = view.viewer_state(views, ["u0", "u1"], ["d0", "d1", "d2"], [boxes])
    assert [layer["type"] for layer in state["layers"]] == [
        "image",
        "segmentation",
        "annotation",
        "annotation",
    ]
    assert state["dimensions"] == {"d0": [8.0, "nm"], "d1": [4.0, "nm"], "d2": [4.0, "nm"]}
    assert state["position"] == [26.5, 42.5, 42.5]  # (80 + 128) / 8, (40 + 128) / 4
    assert state["displayDimensions"] == ["d2", "d1", "d0"]
    failed = state["layers"][3]
    assert failed["annotationColor"] == view.FAILED_COLOR and len(failed["annotations"]) == 1


# -- a real browser -----------------------------------------------------------------------------------


def test_screenshot_shows_image_segmentation_and_blocks(scene, chromium, tmp_path):
    png = tmp_path / "view.png"
    command = [sys.executable, "-m", "voxblock", "view", scene["raw"], scene["seg"]]
    command += ["--run-dir", scene["run_dir"], "--screenshot", str(png)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, **chromium}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "blocks flaky: 31 done, 1 failed" in result.stdout
    pixels = rgb(png)
    assert pixels.shape == (768, 1024, 3)
    colours = {tuple(p) for p in pixels.reshape(-1, 3)[::7]}
    assert len(colours) > 200, "the segmentation over the image shows many colours"
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    green = (g > 180) & (r < 110) & (b < 130)  # done blocks' borders (#33dd55)
    red = (r > 200) & (g < 90) & (b < 110)  # the failed block's border (#ff3344)
    assert green.sum() > 2000 and red.sum() > 1000, (green.sum(), red.sum())
    # the failed block is the top-left one of the section: its border lies left of the middle
    xs = np.nonzero(red)[1]
    assert np.median(xs) < pixels.shape[1] / 2


def test_pyramid_is_one_layer_where_its_level_0_is(scene, chromium, tmp_path, monkeypatch):
    pytest.importorskip("voxblock_workers")
    from voxblock_workers.downsample import downsample_blockwise

    for key, value in chromium.items():
        monkeypatch.setenv(key, value)
    pyramid = f"{scene['dir']}/v.zarr/pyr"
    done = downsample_blockwise(scene["raw"], levels=2, factors="1,2,2", output=pyramid, progress=False)
    assert done.succeeded
    assert view.describe(pyramid)[0].levels == ("s0", "s1", "s2")
    bounds = []
    for name in (scene["raw"], pyramid):
        served = view.serve([name])
        with served.viewer.txn() as state:
            state.cross_section_scale = 0.4  # zoomed out: the pyramid draws from a coarse level
        pixels = rgb(view.screenshot(served, tmp_path / f"{Path(name).name}.png"))
        grey = pixels[..., 0]
        inside = grey[300:460, 430:590]
        assert inside.std() > 15, "the image's values vary"
        # the volume's outline (neuroglancer draws it yellow)
        yellow = (pixels[..., 0] > 200) & (pixels[..., 1] > 200) & (pixels[..., 2] < 80)
        ys, xs = np.nonzero(yellow)
        bounds.append(np.array([xs.min(), xs.max(), ys.min(), ys.max()]))
    assert np.abs(bounds[0] - bounds[1]).max() <= 3, bounds
