"""`empanada`: panoptic instance segmentation (MitoNet style) block by block.

A Panoptic-DeepLab model in the style of empanada (volume-em/empanada,
MitoNet) predicts, for every 2-D plane, foreground logits, an instance
centre heatmap and offsets from each pixel to its instance centre. This
worker runs such a model (TorchScript) on every plane of a block and turns
the heads into instances with its own post-processing (numpy and scipy;
empanada's packages are not used: empanada-dl pins numpy 1.22
and empanada-napari pulls in napari):

1. foreground: sigmoid(semantic logits) > `semantic_threshold`;
2. centres: heatmap pixels > `center_threshold` that are the maximum of
   their `nms_kernel` x `nms_kernel` window (a plateau of touching maxima is
   one centre, at its mean position);
3. grouping: every foreground pixel p goes to the centre nearest to
   p + offset(p); foreground in a plane without centres stays 0;
4. 3-D: 2-D instances of consecutive planes are linked when their IoU >=
   `link_iou` or their intersection over the smaller one >= `link_ioa`;
5. ortho-plane consensus (`axes="xy,xz,yz"`): steps 1-4 along every axis;
   a voxel is foreground if more than half of the axes say so; instances of
   different axes whose IoU (within that foreground) >= `consensus_iou` form
   one cluster, and a foreground voxel takes the cluster most of its axes
   put it in (ties: the first axis in `axes`);
6. filters: instances with fewer than `min_size` voxels, or whose bounding
   box is shorter than `min_extent` voxels along any axis, become 0.

The model contract. The config (YAML or JSON, empanada's model-config keys)
names a TorchScript file (`model`, relative to the config's folder or
absolute; URLs are refused: download the file first), `norms: {mean, std}`,
`padding_factor` (default 16), `labels` and `thing_list` (one foreground
class, default [1]). The input plane is scaled to 0..1 (integer dtypes are
divided by their maximum, floats are used as they are), normalised to
(x - mean) / std and zero-padded at its high end to a multiple of
`padding_factor`. The model takes float32 (N, 1, H, W) and returns either a
dict with `sem_logits` (N, 1, H, W), `ctr_hmp` (N, 1, H, W) and `offsets`
(N, 2, H, W), as empanada's models do, or a tuple of those three tensors in
that order. Offsets are in pixels, channel 0 along the plane's rows, 1 along
its columns, pointing from the pixel to its centre.

Two ways to run it. `run_blockwise("empanada", ...)` writes every block's
instances over its write ROI with IDs unique across blocks (block k of the
grid owns IDs k * V + 1 .. (k + 1) * V, V the voxels of a write block:
`block_ids = True`, `ArrayWorker.global_ids`), but
an object cut by a block border gets one ID per block. The intended use is
`segment_blockwise("empanada", context, ..., parameters={"config": ...})`:
`segment(source, block)` labels the whole read ROI and segment_blockwise
merges instances across blocks into one consistent labelling. Filters run
per block (over its read ROI), so they match a whole-volume run only for
objects that fit in a block's read ROI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from voxblock import ArrayWorker, VoxblockError, crop_to, option
from voxblock_workers.torch_runtime import import_torch, resolve_device, share_cpu_threads

if TYPE_CHECKING:
    from voxblock import Array, Blocking

PLANES = {"xy": 0, "xz": 1, "yz": 2}  # the (z, y, x) axis each kind of plane is stacked along
HEADS = ("sem_logits", "ctr_hmp", "offsets")
HEAD_CHANNELS = {"sem_logits": 1, "ctr_hmp": 1, "offsets": 2}
PROBE_SIZE = 64


def _number(value: Any) -> float | None:
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelConfig:
    """An empanada-style model config, checked."""

    path: str
    model: str
    mean: float
    std: float
    padding_factor: int
    labels: tuple[int, ...]
    thing_list: tuple[int, ...]


def read_config(path: str) -> ModelConfig:
    """Parse and check a model config (YAML or JSON): VoxblockError saying what is wrong."""
    if not path:
        raise VoxblockError("empanada needs a model config: config=PATH (a YAML or JSON file)")
    file = Path(path)
    if not file.is_file():
        raise VoxblockError(f"empanada: config {path} does not exist")
    text = file.read_text()
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:
        raise VoxblockError(f"empanada: config {path} is not valid YAML/JSON: {error}") from error
    if not isinstance(data, dict):
        raise VoxblockError(f"empanada: config {path} must be a mapping (model, norms, padding_factor, ...)")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise VoxblockError(f"empanada: config {path} has no 'model' (the path of a TorchScript file)")
    if "://" in model:
        raise VoxblockError(
            f"empanada: config {path} names the model by URL ({model}); voxblock downloads nothing: "
            "download the file and set model to its path"
        )
    model_path = Path(model) if Path(model).is_absolute() else file.resolve().parent / model
    if not model_path.is_file():
        raise VoxblockError(f"empanada: the model file {model_path} named in {path} does not exist")
    norms = data.get("norms")
    mean = _number(norms.get("mean")) if isinstance(norms, dict) else None
    std = _number(norms.get("std")) if isinstance(norms, dict) else None
    if mean is None or std is None or not std > 0:
        raise VoxblockError(
            f"empanada: config {path} needs norms: {{mean: NUMBER, std: NUMBER > 0}}; got {norms!r}"
        )
    padding = data.get("padding_factor", 16)
    if not _int(padding) or padding < 1:
        raise VoxblockError(f"empanada: padding_factor in {path} must be an integer >= 1; got {padding!r}")
    labels = data.get("labels", [1])
    things = data.get("thing_list", labels)
    for key, value in (("labels", labels), ("thing_list", things)):
        if not isinstance(value, list) or not all(_int(v) for v in value):
            raise VoxblockError(f"empanada: {key} in {path} must be a list of integers; got {value!r}")
    if len(labels) != 1 or list(things) != list(labels):
        raise VoxblockError(
            f"empanada: config {path} has labels {labels} and thing_list {things}; this worker "
            "segments instances of one foreground class (labels: [1], thing_list: [1])"
        )
    return ModelConfig(
        path=str(file.resolve()),
        model=str(model_path),
        mean=mean,
        std=std,
        padding_factor=int(padding),
        labels=tuple(labels),
        thing_list=tuple(things),
    )


def load_model(config: ModelConfig, device: str) -> Any:
    """The config's TorchScript model on `device`, in eval mode."""
    torch = import_torch("empanada")
    try:
        model = torch.jit.load(config.model, map_location=device)
    except Exception as error:
        raise VoxblockError(f"empanada: {config.model} is not a TorchScript model ({error})") from error
    model.eval()
    return model


def heads_of(output: Any, shape: tuple[int, ...]) -> tuple[Any, Any, Any]:
    """(semantic logits, centre heatmap, offsets) from a model's output, checked against `shape`."""
    if isinstance(output, dict):
        missing = [h for h in HEADS if h not in output]
        if missing:
            raise VoxblockError(
                f"empanada: the model returned a dict with keys {sorted(output)}; it needs "
                f"{', '.join(HEADS)} (missing {', '.join(missing)})"
            )
        heads = tuple(output[h] for h in HEADS)
    elif isinstance(output, (tuple, list)) and len(output) == 3:
        heads = tuple(output)
    else:
        raise VoxblockError(
            "empanada: the model must return a dict with sem_logits, ctr_hmp and offsets, or a tuple "
            f"of those three tensors; it returned {type(output).__name__}"
        )
    n, _, h, w = shape
    for name, head in zip(HEADS, heads):
        expected = (n, HEAD_CHANNELS[name], h, w)
        found = tuple(getattr(head, "shape", ()))
        if found != expected:
            raise VoxblockError(
                f"empanada: the model's {name} head has shape {found} for an input of shape {tuple(shape)}; "
                f"it must be {expected} (full resolution, {HEAD_CHANNELS[name]} channel(s))"
            )
    return heads


def _round_up(value: int, factor: int) -> int:
    return -(-value // factor) * factor


def parse_axes(axes: str, ndim: int) -> list[str]:
    names = [a.strip() for a in str(axes).split(",") if a.strip()]
    if not names or any(a not in PLANES for a in names) or len(set(names)) != len(names):
        raise VoxblockError(
            f"empanada: axes must be 'xy' or a comma-separated subset of xy, xz, yz; got {axes!r}"
        )
    if ndim == 2 and names != ["xy"]:
        raise VoxblockError(f"empanada: a 2-D input has only xy planes; got axes={axes!r}")
    return names


@dataclass
class Empanada(ArrayWorker):
    """Panoptic-DeepLab (empanada/MitoNet) instances: uint64 labels, 0 background."""

    name = "empanada"
    block_ids = True  # instance IDs from the block's position on the grid (global_ids)

    config: str = option("", help="empanada model config (YAML/JSON): model, norms, padding_factor")
    axes: str = option("xy", help="planes to predict on: xy, or xy,xz,yz for ortho-plane consensus")
    semantic_threshold: float = option(0.5, help="foreground where sigmoid(semantic logits) > this")
    center_threshold: float = option(0.1, help="centres are heatmap maxima above this")
    nms_kernel: int = option(7, help="odd window (pixels) a centre must be the heatmap maximum of")
    link_iou: float = option(0.25, help="3-D: link 2-D instances of consecutive planes at this IoU")
    link_ioa: float = option(0.25, help="... or at this intersection over the smaller instance")
    consensus_iou: float = option(0.5, help="ortho-plane: instances of two axes at this IoU are one")
    min_size: int = option(0, help="instances with fewer voxels than this become 0")
    min_extent: int = option(0, help="instances shorter than this (voxels) along any axis become 0")
    batch_size: int = option(16, help="planes per model call")
    device: str = option("auto", help="torch device; auto: cuda if available, else cpu")

    # -- checks ---------------------------------------------------------------

    def _check_options(self) -> None:
        for name in ("semantic_threshold", "link_iou", "link_ioa", "consensus_iou"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value <= 1:
                raise VoxblockError(f"empanada: {name} must be a number in [0, 1]; got {value!r}")
        if not _is_number(self.center_threshold):
            raise VoxblockError(f"empanada: center_threshold must be a number; got {self.center_threshold!r}")
        if not _int(self.nms_kernel) or self.nms_kernel < 1 or self.nms_kernel % 2 == 0:
            raise VoxblockError(f"empanada: nms_kernel must be an odd integer >= 1; got {self.nms_kernel!r}")
        for name in ("min_size", "min_extent"):
            value = getattr(self, name)
            if not _int(value) or value < 0:
                raise VoxblockError(f"empanada: {name} must be an integer >= 0; got {value!r}")
        if not _int(self.batch_size) or self.batch_size < 1:
            raise VoxblockError(f"empanada: batch_size must be an integer >= 1; got {self.batch_size!r}")

    def check_input(self, source: Array) -> None:
        channels = tuple(source.shape[: source.channel_dims])
        if channels not in ((), (1,)):
            raise VoxblockError(
                f"empanada: input {self.input} must be a single-channel image; "
                f"its channel shape is {channels}"
            )
        if source.spatial_dims not in (2, 3):
            raise VoxblockError(
                f"empanada: input {self.input} must be 2-D or 3-D; it has {source.spatial_dims} spatial axes"
            )
        dtype = np.dtype(source.dtype)
        if dtype.kind not in "biuf":
            raise VoxblockError(f"empanada: input {self.input} has dtype {dtype}; it must be numeric")
        parse_axes(self.axes, source.spatial_dims)

    def _check_block(self, read_shape: tuple[int, ...], config: ModelConfig) -> None:
        """Every plane of a block must be at least one padding factor wide on both axes."""
        for plane in parse_axes(self.axes, len(read_shape)):
            in_plane = [s for i, s in enumerate(read_shape) if len(read_shape) == 2 or i != PLANES[plane]]
            if min(in_plane) < config.padding_factor:
                raise VoxblockError(
                    f"empanada: the {plane} planes of a block are {tuple(in_plane)} voxels, smaller than "
                    f"the model's padding_factor {config.padding_factor}: the model would see mostly "
                    f"padding. Use read blocks of at least {config.padding_factor} voxels on every "
                    "axis the planes span"
                )

    def _probe(self, model: Any, config: ModelConfig, device: str, read_shape: tuple[int, ...]) -> None:
        """Run the model once on a small zero plane: the heads must have the contract's shapes."""
        torch = import_torch("empanada")
        size = [_round_up(min(s, PROBE_SIZE), config.padding_factor) for s in read_shape[-2:]]
        shape = (1, 1, *size)
        try:
            with torch.inference_mode():
                output = model(torch.zeros(shape, dtype=torch.float32, device=device))
        except Exception as error:
            raise VoxblockError(f"empanada: the model fails on an input of shape {shape}: {error}") from error
        heads_of(output, shape)

    def _load(self, source: Array, read_shape: tuple[int, ...]) -> None:
        """Config, model and checks, once per process (driver: prepare; workers: setup)."""
        self._check_options()
        self.check_input(source)
        config = read_config(self.config)
        self._check_block(read_shape, config)
        device = resolve_device(self.device, "empanada")
        model = load_model(config, device)
        self._probe(model, config, device, read_shape)
        self._config, self._model, self._device = config, model, device

    def check_blocking(self, blocking: Blocking, source: Array) -> None:
        """Options, config, block size and the model's heads, checked once in the driver."""
        self._load(source, tuple(blocking.read_roi.shape / source.voxel_size))
        self._model = None  # loaded again in each worker process

    def output_dtype(self, source: Array) -> np.dtype:
        return np.dtype(np.uint64)

    def setup(self) -> None:
        super().setup()
        device = resolve_device(self.device, "empanada")
        if device == "cpu":
            # share the cores between the worker processes instead of each taking all of them
            share_cpu_threads("empanada", self.preparation.num_workers if self.preparation else 1)
        self._config = read_config(self.config)
        self._device = device
        self._model = load_model(self._config, device)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_model", None)  # TorchScript modules are loaded per process, not pickled
        return state

    # -- blocks ---------------------------------------------------------------

    def compute(self, data: np.ndarray, block: Any) -> np.ndarray:
        import fastremap

        voxel_size = self.source.voxel_size
        if self.source.channel_dims:
            data = data[0]
        labels = crop_to(self.instances(data), block.read_roi, block.write_roi, voxel_size)
        labels, _ = fastremap.renumber(np.ascontiguousarray(labels), preserve_zero=True, in_place=True)
        return self.global_ids(labels, block)

    def segment(self, source: Array, block: Any) -> np.ndarray:
        """Local instance labels over the block's whole read ROI, for `segment_blockwise`.

        segment_blockwise gives them block-position IDs, merges instances
        across blocks where their contexts overlap and relabels. The model is
        loaded (and checked) on the first call in each process.
        """
        if getattr(self, "_model", None) is None:
            self._load(source, tuple(block.read_roi.shape / source.voxel_size))
        data = source.to_ndarray(block.read_roi)  # zeros outside the region segmented
        return self.instances(data[0] if source.channel_dims else data)

    # -- post-processing --------------------------------------------------------

    def normalized(self, data: np.ndarray) -> np.ndarray:
        """0..1 (integers divided by their dtype's maximum), then (x - mean) / std, float32."""
        config: ModelConfig = self._config
        data = np.asarray(data)
        if data.dtype.kind in "iu":
            scaled = data.astype(np.float32) / np.float32(np.iinfo(data.dtype).max)
        else:
            scaled = data.astype(np.float32)
        return (scaled - np.float32(config.mean)) / np.float32(config.std)

    def predict(self, planes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The model's heads for a stack of normalised planes (P, H, W), padded and cropped back."""
        torch = import_torch("empanada")
        factor = self._config.padding_factor
        count, height, width = planes.shape
        padded = np.zeros((count, 1, _round_up(height, factor), _round_up(width, factor)), np.float32)
        padded[:, 0, :height, :width] = planes
        semantic = np.empty((count, height, width), np.float32)
        centers = np.empty((count, height, width), np.float32)
        offsets = np.empty((count, 2, height, width), np.float32)
        with torch.inference_mode():
            for start in range(0, count, self.batch_size):
                batch = torch.from_numpy(padded[start : start + self.batch_size]).to(self._device)
                heads = heads_of(self._model(batch), tuple(batch.shape))
                sem, ctr, off = (h[..., :height, :width].float().cpu().numpy() for h in heads)
                end = start + batch.shape[0]
                semantic[start:end], centers[start:end], offsets[start:end] = sem[:, 0], ctr[:, 0], off
        return semantic, centers, offsets

    def plane_instances(self, planes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Foreground (P, H, W) and 2-D instances per plane, IDs unique across the stack."""
        from scipy import ndimage
        from scipy.spatial import cKDTree
        from scipy.special import expit

        logits, heatmap, offsets = self.predict(planes)
        foreground = expit(logits) > self.semantic_threshold
        pooled = ndimage.maximum_filter(
            heatmap, size=(1, self.nms_kernel, self.nms_kernel), mode="constant", cval=-np.inf
        )
        peaks = (heatmap == pooled) & (heatmap > self.center_threshold)
        in_plane = np.zeros((3, 3, 3), dtype=bool)
        in_plane[1] = True
        peak_labels, num_peaks = ndimage.label(peaks, structure=in_plane)
        labels = np.zeros(planes.shape, dtype=np.int64)
        if num_peaks == 0:
            return foreground, labels
        index = np.arange(1, num_peaks + 1)
        centres = np.array(ndimage.center_of_mass(peaks, peak_labels, index))  # (K, 3): plane, row, col
        plane_of = np.rint(centres[:, 0]).astype(np.int64)
        for plane in np.unique(plane_of):
            rows, cols = np.nonzero(foreground[plane])
            if rows.size == 0:
                continue
            ids = index[plane_of == plane]
            targets = np.stack(
                [rows + offsets[plane, 0, rows, cols], cols + offsets[plane, 1, rows, cols]], axis=1
            )
            _, nearest = cKDTree(centres[ids - 1, 1:]).query(targets)
            labels[plane, rows, cols] = ids[nearest]
        return foreground, labels

    def link_planes(self, labels: np.ndarray) -> np.ndarray:
        """Join 2-D instances of consecutive planes (axis 0) into 3-D instances."""
        if labels.shape[0] < 2 or not labels.any():
            return labels
        size = np.bincount(labels.ravel())
        pairs, overlap = _overlaps(labels[:-1].ravel(), labels[1:].ravel(), len(size))
        if pairs.size == 0:
            return labels
        size_a, size_b = size[pairs[0]], size[pairs[1]]
        iou = overlap / (size_a + size_b - overlap)
        ioa = overlap / np.minimum(size_a, size_b)
        keep = (iou >= self.link_iou) | (ioa >= self.link_ioa)
        return _merge(labels, pairs[:, keep], len(size))

    def axis_instances(self, normalized: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """Foreground and 3-D instances from the planes stacked along `axis`."""
        stack = np.ascontiguousarray(np.moveaxis(normalized, axis, 0))
        foreground, labels = self.plane_instances(stack)
        labels = self.link_planes(labels)
        return np.moveaxis(foreground, 0, axis), np.moveaxis(labels, 0, axis)

    def consensus(self, foregrounds: list[np.ndarray], labels: list[np.ndarray]) -> np.ndarray:
        """One labelling from several axes' (see the module docstring for the rule)."""
        votes = np.sum(foregrounds, axis=0)
        foreground = 2 * votes > len(foregrounds)
        shifted, base = [], 0
        for found in labels:
            shifted.append(np.where(found > 0, found + base, 0)[foreground])
            base += int(found.max(initial=0)) + 1
        size = np.bincount(np.concatenate(shifted), minlength=base)
        edges = []
        for i in range(len(shifted)):
            for j in range(i + 1, len(shifted)):
                pairs, overlap = _overlaps(shifted[i], shifted[j], base)
                if pairs.size:
                    iou = overlap / (size[pairs[0]] + size[pairs[1]] - overlap)
                    edges.append(pairs[:, iou >= self.consensus_iou])
        cluster = _components(np.concatenate(edges, axis=1) if edges else np.zeros((2, 0), int), base)
        choices = np.stack([np.where(s > 0, cluster[s], 0) for s in shifted])  # (axes, voxels)
        agree = np.stack([((choices == c) & (c > 0)).sum(axis=0) for c in choices])
        chosen = choices[np.argmax(agree, axis=0), np.arange(choices.shape[1])]
        result = np.zeros(foreground.shape, dtype=np.int64)
        result[foreground] = chosen
        return result

    def instances(self, data: np.ndarray) -> np.ndarray:
        """Instance labels (uint64, 1..n, 0 background) of one region (spatial axes only)."""
        import fastremap

        normalized = self.normalized(data)
        if normalized.ndim == 2:
            _, labels = self.plane_instances(normalized[np.newaxis])
            labels = labels[0]
        else:
            found = [self.axis_instances(normalized, PLANES[a]) for a in parse_axes(self.axes, 3)]
            if len(found) == 1:
                labels = found[0][1]
            else:
                labels = self.consensus([f for f, _ in found], [lab for _, lab in found])
        labels, _ = fastremap.renumber(np.ascontiguousarray(labels), preserve_zero=True, in_place=True)
        labels = self.filtered(labels.astype(np.int64, copy=False))
        labels, _ = fastremap.renumber(labels, preserve_zero=True, in_place=True)
        return labels.astype(np.uint64, copy=False)

    def filtered(self, labels: np.ndarray) -> np.ndarray:
        """`min_size` and `min_extent` filters on consecutive labels."""
        if labels.max(initial=0) == 0 or (self.min_size <= 1 and self.min_extent <= 1):
            return labels
        from scipy import ndimage

        count = int(labels.max())
        drop = np.zeros(count + 1, dtype=bool)
        if self.min_size > 1:
            drop |= np.bincount(labels.ravel(), minlength=count + 1) < self.min_size
        if self.min_extent > 1:
            for i, box in enumerate(ndimage.find_objects(labels), start=1):
                if box is not None and min(s.stop - s.start for s in box) < self.min_extent:
                    drop[i] = True
        drop[0] = False
        if drop.any():
            labels = np.where(drop[labels], 0, labels)
        return labels


def _overlaps(a: np.ndarray, b: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Label pairs (2, E) where `a` and `b` (labels < count, 0 none) overlap, and their voxel counts."""
    both = (a > 0) & (b > 0)
    keys, overlap = np.unique(a[both].astype(np.int64) * count + b[both], return_counts=True)
    return np.stack([keys // count, keys % count]), overlap


def _components(edges: np.ndarray, count: int) -> np.ndarray:
    """The connected component (0..) of each of `count` nodes joined by `edges` (2, E)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(edges.shape[1]), (edges[0], edges[1])), shape=(count, count))
    _, component = connected_components(graph, directed=False)
    return component + 1  # 0 is kept for "no label" by the callers


def _merge(labels: np.ndarray, edges: np.ndarray, count: int) -> np.ndarray:
    component = _components(edges, count)
    component[0] = 0
    return component[labels]
