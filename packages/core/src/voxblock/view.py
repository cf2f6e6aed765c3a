"""`voxblock view`: local arrays, pyramids and a run's done/failed blocks in neuroglancer.

How the data gets to the browser: neuroglancer's own zarr reader fetches the chunk
files straight from disk through a static file route added to neuroglancer's Python
server (one port for the page, its state and the data). Python never decodes a chunk:
the browser reads only the chunks (and, of a sharded zarr v3 array, the byte ranges
of the shards) it draws, whatever the volume's size, and an OME-NGFF image is one
multiscale layer read level by level as neuroglancer zooms out. (`LocalVolume`, the
alternative, reads and re-encodes every chunk in Python and builds coarse levels by
downsampling full-resolution data on the fly: slow on big volumes, and blind to a
pyramid that is already on disk.) N5 datasets, which neuroglancer's n5 reader lays
out in its own axis order, are served through `LocalVolume` from voxblock's reader.

Everything that decides what is shown is a pure function of what voxblock reads
(`ArrayView`, `BlockBoxes`) giving neuroglancer state JSON: the layer kind from the
dtype, the coordinate space (nanometers, voxblock's offsets and voxel sizes), the
shader and its range, the boxes of done and failed blocks. `serve` is the I/O edge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from voxblock.errors import VoxblockError

DATA_ROUTE = "voxblock-data"
DONE_COLOR = "#33dd55"
FAILED_COLOR = "#ff3344"
# boxes: a thick border and a light fill where the section cuts them
BOX_SHADER = """void main() {
  setColor(defaultColor());
  setBoundingBoxBorderWidth(3.0);
  setBoundingBoxFillColor(vec4(defaultColor(), 0.15));
}
"""
# more boxes than this make the annotation layer slow to draw: the rest are left out
MAX_BOXES = 20000
# how much of an image is read to pick its contrast range
SAMPLE_VOXELS = 64**3


# -- what is shown: pure functions ------------------------------------------------------------------


@dataclass(frozen=True)
class ArrayView:
    """What voxblock reads of one array (or OME-NGFF image: `levels` > 1), for neuroglancer."""

    name: str  # the layer's name
    path: str  # the array, or the OME-NGFF image group
    fmt: str  # "zarr2", "zarr3", "n5"
    dtype: str
    shape: tuple[int, ...]  # of the array (level 0)
    types: tuple[str, ...]  # per axis: "space", "time" or "channel"
    voxel_size: tuple[int, ...]  # spatial axes, nm (of level 0)
    offset: tuple[int, ...]  # spatial axes, nm
    levels: tuple[str, ...] = ()  # the OME-NGFF image's levels, finest first; () for one array
    value_range: tuple[float, float] | None = None  # of a sample, for the image's contrast
    source_names: tuple[str, ...] = ()  # the axis names neuroglancer's reader gives the array

    @property
    def channels(self) -> int:
        return int(np.prod([s for s, t in zip(self.shape, self.types) if t == "channel"], dtype=int))

    @property
    def spatial_dims(self) -> int:
        return sum(t != "channel" for t in self.types)


def layer_kind(dtype: Any) -> str:
    """ "segmentation" for unsigned 32- and 64-bit integers (label ids), else "image"."""
    dt = np.dtype(dtype)
    return "segmentation" if dt.kind == "u" and dt.itemsize in (4, 8) else "image"


def world_names(views: Sequence[ArrayView], axis_names: Sequence[Sequence[str]]) -> list[str]:
    """The viewer's spatial dimension names: the first array's spatial axis names (d0, d1... or
    z, y, x), so that every layer of the same rank lands in one space."""
    for view, names in zip(views, axis_names):
        spatial = [n for n, t in zip(names, view.types) if t != "channel"]
        if spatial:
            return [n.rstrip("^'") for n in spatial]
    return []


def coordinate_space(names: Sequence[str], scales: Sequence[float]) -> dict[str, list[Any]]:
    """A neuroglancer coordinate space in nanometers."""
    return {name: [float(scale), "nm"] for name, scale in zip(names, scales)}


def source_transform(view: ArrayView, world: Sequence[str]) -> dict[str, Any]:
    """The data source's transform: voxel index -> world nm (voxel size, offset from voxblock's
    metadata), spatial axes renamed to `world`, channel axes to neuroglancer channel dims c^..."""
    rank = len(view.types)
    spatial = [i for i, t in enumerate(view.types) if t != "channel"]
    if len(spatial) != len(world):
        raise VoxblockError(f"{view.name}: {len(spatial)} spatial axes, but the viewer shows {len(world)}")
    names: list[str] = []
    scales: list[float] = []
    units: list[str] = []
    translation: list[float] = []
    channel = 0
    for axis, kind in enumerate(view.types):
        if kind == "channel":
            names.append("c^" if channel == 0 else f"c{channel}^")
            scales.append(1.0)
            units.append("")
            translation.append(0.0)
            channel += 1
        else:
            k = spatial.index(axis)
            names.append(world[k])
            scales.append(float(view.voxel_size[k]))
            units.append("nm")
            # neuroglancer's OME-NGFF reader applies the image's translation itself
            translation.append(0.0 if view.levels else view.offset[k] / view.voxel_size[k])
    dims = {n: [s, u] for n, s, u in zip(names, scales, units)}
    matrix = [[1.0 if c == r else 0.0 for c in range(rank)] + [translation[r]] for r in range(rank)]
    # the source's own axes (unitless voxel indices) given the output's scales: the matrix then
    # maps voxels to voxels, its last column the offset in voxels
    source = view.source_names or tuple(f"dim_{i}" for i in range(rank))
    inputs = {s: [sc, u] for s, sc, u in zip(source, scales, units)}
    return {"outputDimensions": dims, "inputDimensions": inputs, "matrix": matrix}


def image_shader(view: ArrayView) -> tuple[str, dict[str, Any]]:
    """The shader of an image layer and its controls: grey over the sampled value range, or RGB
    for three channels."""
    low, high = view.value_range or default_range(view.dtype)
    if high <= low:
        high = low + 1
    value = {"range": [low, high]}
    if view.channels == 3:
        shader = "\n".join(
            [f"#uicontrol invlerp {c}(channel=[{i}])" for i, c in enumerate(("red", "green", "blue"))]
            + ["void main() {", "  emitRGB(vec3(red(), green(), blue()));", "}"]
        )
        return shader, {c: value for c in ("red", "green", "blue")}
    shader = "#uicontrol invlerp normalized\nvoid main() {\n  emitGrayscale(normalized());\n}\n"
    return shader, {"normalized": value}


def default_range(dtype: Any) -> tuple[float, float]:
    dt = np.dtype(dtype)
    if dt.kind in "ui":
        info = np.iinfo(dt)
        return float(info.min), float(info.max)
    if dt.kind == "b":
        return 0.0, 1.0
    return 0.0, 1.0


def value_range(sample: np.ndarray) -> tuple[float, float] | None:
    """The 0.5 and 99.5 percentiles of the finite values of a sample (None if it has none)."""
    values = np.asarray(sample, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    low, high = np.percentile(values, [0.5, 99.5])
    if high <= low:
        low, high = float(values.min()), float(values.max())
    return float(low), float(high)


def source_url(view: ArrayView, base_url: str) -> str:
    """The neuroglancer data source URL of a zarr array or OME-NGFF image served at `base_url`."""
    return f"{view.fmt}://{base_url.rstrip('/')}"


def data_layer(view: ArrayView, url: str, world: Sequence[str]) -> dict[str, Any]:
    """The neuroglancer layer JSON of one array: segmentation or image, at its place in the world.

    An OME-NGFF image is read by neuroglancer's own OME-NGFF reader (every level; the
    translation too): the transform only renames its axes and gives them voxblock's scales."""
    source: dict[str, Any] = {"url": url, "transform": source_transform(view, world)}
    if layer_kind(view.dtype) == "segmentation" and view.channels == 1:
        return {"type": "segmentation", "source": source, "name": view.name, "selectedAlpha": 0.4}
    shader, controls = image_shader(view)
    return {
        "type": "image",
        "source": source,
        "name": view.name,
        "shader": shader,
        "shaderControls": controls,
        "opacity": 1.0,
    }


@dataclass
class BlockBoxes:
    """The write ROIs (world units) of a task's done and failed blocks."""

    task: str
    done: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (begin, end)
    failed: list[tuple[list[int], list[int]]] = field(default_factory=list)
    done_total: int = 0  # done blocks, also those past MAX_BOXES


def block_boxes(run_dir: str | Path) -> BlockBoxes:
    """Done blocks from daisy's done markers, failed ones as `voxblock status` finds them."""
    from voxblock import status as status_module
    from voxblock.rundir import RunDirectory

    run = RunDirectory(Path(run_dir))
    task = run.read_task() or {}
    found = status_module.task_status(run.path)
    boxes = BlockBoxes(task=found.task_id)
    for block in found.failed_blocks:
        if block.write_roi is not None:
            begin = [int(v) for v in block.write_roi["offset"]]
            boxes.failed.append((begin, [b + int(s) for b, s in zip(begin, block.write_roi["shape"])]))
    blocking = status_module._blocking(task.get("identity") or {})
    tracking = run.tracking_arrays()
    if blocking is None or tracking is None:
        return boxes
    done = np.argwhere(np.asarray(tracking[0]) > 0)
    boxes.done_total = len(done)
    axes = [blocking._axis_blocks(d) for d in range(blocking.total_roi.dims)]
    for index in done[:MAX_BOXES]:
        _, write = status_module._grid_rois(tuple(int(i) for i in index), axes)
        if write is not None:
            begin = write["offset"]
            boxes.done.append((begin, [b + s for b, s in zip(begin, write["shape"])]))
    return boxes


def box_layer(
    name: str, boxes: Sequence[tuple[list[int], list[int]]], world: Sequence[str], color: str
) -> dict:
    """An annotation layer of axis-aligned boxes (world nm) in one colour."""
    annotations = [
        {"type": "axis_aligned_bounding_box", "id": f"{i:x}", "pointA": list(a), "pointB": list(b)}
        for i, (a, b) in enumerate(boxes)
    ]
    return {
        "type": "annotation",
        "name": name,
        "source": {
            "url": "local://annotations",
            "transform": {"outputDimensions": coordinate_space(world, [1] * len(world))},
        },
        "annotationColor": color,
        "shader": BOX_SHADER,
        "annotations": annotations,
    }


def viewer_state(
    views: Sequence[ArrayView],
    urls: Sequence[str],
    world: Sequence[str],
    boxes: Sequence[BlockBoxes] = (),
) -> dict[str, Any]:
    """The whole viewer state: the data layers in the order given, then each task's blocks."""
    layers = [data_layer(v, u, world) for v, u in zip(views, urls)]
    for found in boxes:
        prefix = f"{found.task}: " if len(boxes) > 1 else ""
        layers.append(box_layer(f"{prefix}done blocks", found.done, world, DONE_COLOR))
        layers.append(box_layer(f"{prefix}failed blocks", found.failed, world, FAILED_COLOR))
    state: dict[str, Any] = {"layers": layers, "layout": "xy"}
    first = next((v for v in views if not v.levels), views[0] if views else None)
    if first is not None and world:
        spatial = [s for s, t in zip(first.shape, first.types) if t != "channel"]
        centre = [o + v * s / 2 for o, v, s in zip(first.offset, first.voxel_size, spatial)]
        state["dimensions"] = coordinate_space(world, first.voxel_size)
        # x across, y down: voxblock's axes are slowest first (z, y, x)
        state["displayDimensions"] = list(reversed(world))[:3]
        # the middle of the central voxel (a section on a voxel's border would cut block borders)
        state["position"] = [math.floor(c / v) + 0.5 for c, v in zip(centre, first.voxel_size)]
        extent = max(v * s for v, s in zip(first.voxel_size, spatial))
        # the zoom, in the finest voxel per screen pixel: the whole extent in ~700 pixels
        state["crossSectionScale"] = max(extent / 700 / min(first.voxel_size), 1e-3)
        if layers:
            state["selectedLayer"] = {"layer": layers[0]["name"], "visible": False}
    return state


# -- reading: voxblock's metadata -------------------------------------------------------------------


def describe(name: str) -> tuple[ArrayView, list[str]]:
    """Open ARRAY (CONTAINER/DATASET: an array, or an OME-NGFF image group) with voxblock's
    readers; the view and the axis names."""
    from voxblock import formats
    from voxblock.metadata import open_input
    from voxblock.names import ArrayName
    from voxblock.nodes import group_format

    array_name = ArrayName.parse(name)
    path = array_name.path
    levels: tuple[str, ...] = ()
    ome_axes: tuple[str, ...] = ()
    kind = group_format(path) if path.is_dir() else None
    if kind is not None and not formats.in_n5(path):
        attrs = formats.group_attrs(path)
        multiscales = formats.multiscales_of(attrs[0]) if attrs else None
        if not multiscales:
            raise VoxblockError(
                f"{array_name} is a zarr group without OME-NGFF multiscales: name an array in it"
            )
        levels = tuple(str(d["path"]).strip("/") for d in multiscales[0].get("datasets", []))
        ome_axes = tuple(str(a.get("name", "")) for a in multiscales[0].get("axes", []))
        if not levels:
            raise VoxblockError(f"{array_name}: its OME-NGFF multiscales list no datasets")
        array = open_input(ArrayName(array_name.container, f"{array_name.dataset}/{levels[0]}"))
        fmt = f"zarr{kind}" if kind == 2 else "zarr3"
    else:
        array = open_input(array_name)
        fmt = "n5" if formats.in_n5(path) else "zarr3" if (path / "zarr.json").is_file() else "zarr2"
    view = ArrayView(
        name=array_name.dataset,
        path=str(path.resolve()),
        fmt=fmt,
        dtype=str(array.dtype),
        shape=tuple(int(s) for s in array.shape),
        types=tuple(array.types),
        voxel_size=tuple(int(v) for v in array.voxel_size),
        offset=tuple(int(v) for v in array.offset),
        levels=levels,
        source_names=ome_axes if levels else source_names(path, fmt, len(array.shape)),
    )
    if layer_kind(view.dtype) == "image":
        view = _with_range(view, array)
    return view, list(array.axis_names)


def source_names(path: Path, fmt: str, rank: int) -> tuple[str, ...]:
    """The names neuroglancer's zarr reader gives the axes of the array at `path`: zarr v3's
    dimension_names, zarr v2's xarray `_ARRAY_DIMENSIONS`, else dim_0, dim_1..."""
    import json

    names: list[Any] = []
    try:
        if fmt == "zarr3":
            names = list(json.loads((path / "zarr.json").read_text()).get("dimension_names") or [])
        elif fmt == "zarr2" and (path / ".zattrs").is_file():
            names = list(json.loads((path / ".zattrs").read_text()).get("_ARRAY_DIMENSIONS") or [])
    except (OSError, ValueError, AttributeError):
        names = []
    if len(names) != rank:
        names = [None] * rank
    return tuple(str(n) if n else f"dim_{i}" for i, n in enumerate(names))


def _with_range(view: ArrayView, array: Any) -> ArrayView:
    """The view with the value range of a central crop of at most SAMPLE_VOXELS voxels."""
    import dataclasses

    spatial = [s for s, t in zip(view.shape, view.types) if t != "channel"]
    side = max(1, int(SAMPLE_VOXELS ** (1 / max(1, len(spatial)))))
    index = []
    for size, kind in zip(view.shape, view.types):
        if kind == "channel":
            index.append(slice(None))
        else:
            start = max(0, size // 2 - side // 2)
            index.append(slice(start, min(size, start + side)))
    try:
        sample = np.asarray(array._source_data[tuple(index)])
    except Exception:
        return view
    return dataclasses.replace(view, value_range=value_range(sample))


# -- serving: the I/O edge ---------------------------------------------------------------------------


@dataclass
class Served:
    viewer: Any
    url: str
    state: dict[str, Any]
    boxes: list[BlockBoxes]


def serve(
    arrays: Sequence[str],
    run_dirs: Sequence[str | Path] = (),
    bind: str = "127.0.0.1",
    port: int = 0,
) -> Served:
    """Start neuroglancer's server with a viewer of ARRAYS (and the blocks of each run directory)."""
    import secrets

    import neuroglancer
    import neuroglancer.server
    from neuroglancer.static_file_server import CorsStaticFileHandler

    described = [describe(a) for a in arrays]
    views = [d[0] for d in described]
    world = world_names(views, [d[1] for d in described])
    boxes = [block_boxes(r) for r in run_dirs]

    neuroglancer.set_server_bind_address(bind, port)
    viewer = neuroglancer.Viewer()
    server = neuroglancer.server.global_server
    token = secrets.token_urlsafe(12)
    handlers = []
    urls = []
    volumes: dict[int, Any] = {}
    for i, view in enumerate(views):
        if view.fmt == "n5":
            volumes[i] = _local_volume(view, arrays[i], world)
            urls.append("")
            continue
        handlers.append((rf"/{DATA_ROUTE}/{token}/{i}/(.*)", CorsStaticFileHandler, {"path": view.path}))
        urls.append(source_url(view, f"{server.server_url}/{DATA_ROUTE}/{token}/{i}/"))
    server.app.add_handlers(r".*", handlers)
    state = viewer_state(views, urls, world, boxes)
    for i, volume in volumes.items():
        state["layers"][i]["source"] = volume
    viewer.set_state(neuroglancer.ViewerState(state))
    return Served(viewer, viewer.get_viewer_url(), state, boxes)


def _local_volume(view: ArrayView, name: str, world: Sequence[str]) -> Any:
    """An array neuroglancer cannot read itself (N5), served chunk by chunk by voxblock's reader."""
    import neuroglancer

    from voxblock.metadata import open_input

    array = open_input(name)
    names, scales, units = [], [], []
    channel = 0
    spatial = iter(range(len(world)))
    for kind in view.types:
        if kind == "channel":
            names.append("c^" if channel == 0 else f"c{channel}^")
            scales.append(1)
            units.append("")
            channel += 1
        else:
            k = next(spatial)
            names.append(world[k])
            scales.append(view.voxel_size[k])
            units.append("nm")
    offset = []
    spatial = iter(range(len(world)))
    for kind in view.types:
        offset.append(0 if kind == "channel" else view.offset[(k := next(spatial))] // view.voxel_size[k])
    return neuroglancer.LocalVolume(
        data=array._source_data,
        dimensions=neuroglancer.CoordinateSpace(names=names, units=units, scales=scales),
        voxel_offset=offset,
        volume_type="segmentation" if layer_kind(view.dtype) == "segmentation" else "image",
    )


def screenshot(
    served: Served, png: str | Path, size: tuple[int, int] = (1024, 768), timeout: float = 60.0
) -> Path:
    """Load the viewer in headless Chromium, wait until every visible chunk is drawn, save a PNG."""
    import neuroglancer.webdriver

    chromium = find_chromium()
    if chromium is None:
        raise VoxblockError(
            "--screenshot needs Chromium and ChromeDriver: apt-get install chromium chromium-driver"
        )
    browser, driver = chromium
    import selenium.webdriver
    from selenium.webdriver.chrome.service import Service

    class _Driver(neuroglancer.webdriver.Webdriver):
        def _init_chrome(self) -> None:
            options = selenium.webdriver.ChromeOptions()
            options.enable_bidi = True
            options.binary_location = browser
            for arg in CHROMIUM_FLAGS:
                options.add_argument(arg)
            options.add_argument(f"--window-size={size[0] + 40},{size[1] + 120}")
            self.driver = selenium.webdriver.Chrome(options=options, service=Service(executable_path=driver))

    png = Path(png)
    with _Driver(served.viewer, headless=True, print_logs=False) as webdriver:
        webdriver.sync()
        image = _capture(served.viewer, size, timeout)
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(image)
    return png


def _capture(viewer: Any, size: tuple[int, int], timeout: float) -> bytes:
    import threading

    done = threading.Event()
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(viewer.screenshot(size=list(size)).screenshot.image)
        except Exception as error:  # pragma: no cover - the browser went away
            result.append(error)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    if not done.wait(timeout):
        raise VoxblockError(f"the viewer did not finish drawing within {timeout:g} s")
    if isinstance(result[0], Exception):
        raise VoxblockError(f"screenshot failed: {result[0]}")
    return result[0]


CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def find_chromium() -> tuple[str, str] | None:
    """(chromium, chromedriver) binaries, from PATH or $VOXBLOCK_CHROMIUM / $VOXBLOCK_CHROMEDRIVER."""
    import os
    import shutil

    browser = os.environ.get("VOXBLOCK_CHROMIUM") or next(
        (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None
    )
    driver = os.environ.get("VOXBLOCK_CHROMEDRIVER") or shutil.which("chromedriver")
    if browser is None or driver is None:
        return None
    return browser, driver


def describe_boxes(boxes: Sequence[BlockBoxes]) -> list[str]:
    """One line per task: what the block layers show."""
    lines = []
    for found in boxes:
        shown = "" if found.done_total <= len(found.done) else f" (the first {len(found.done)} shown)"
        lines.append(f"{found.task}: {found.done_total} done{shown}, {len(found.failed)} failed")
    return lines
