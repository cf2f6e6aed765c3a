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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from voxblock import ArrayWorker, VoxblockError, crop_to, option
from voxblock_workers.empanada import postprocess
from voxblock_workers.empanada.config import PLANES, check_block, check_options, parse_axes, read_config
from voxblock_workers.empanada.model import load_model, normalized, predict, probe
from voxblock_workers.torch_runtime import resolve_device, share_cpu_threads

if TYPE_CHECKING:
    from voxblock import Array, Blocking


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

    # -- checks and the model, once per process --------------------------------

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

    def _load(self, source: Array, read_shape: tuple[int, ...]) -> None:
        """Config, model and checks, once per process (driver: prepare; workers: setup)."""
        check_options(self)
        self.check_input(source)
        config = read_config(self.config)
        check_block(self.axes, read_shape, config)
        device = resolve_device(self.device, "empanada")
        model = load_model(config, device)
        probe(model, config, device, read_shape)
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

    def instances(self, data: np.ndarray) -> np.ndarray:
        """Instance labels (uint64, 1..n, 0 background) of one region (spatial axes only)."""
        planes = normalized(data, self._config)
        if planes.ndim == 2:
            _, labels = self._plane_instances(planes[np.newaxis])
            labels = labels[0]
        else:
            found = [self._axis_instances(planes, PLANES[a]) for a in parse_axes(self.axes, 3)]
            if len(found) == 1:
                labels = found[0][1]
            else:
                labels = self.consensus([f for f, _ in found], [lab for _, lab in found])
        return postprocess.final_labels(labels, self.min_size, self.min_extent)

    def _plane_instances(self, planes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Foreground and 2-D instances of a stack of normalised planes (P, H, W)."""
        heads = predict(self._model, planes, self._config.padding_factor, self.batch_size, self._device)
        thresholds = (self.semantic_threshold, self.center_threshold, self.nms_kernel)
        return postprocess.plane_instances(*heads, *thresholds)

    def _axis_instances(self, planes: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """Foreground and 3-D instances from the planes stacked along `axis`."""
        stack = np.ascontiguousarray(np.moveaxis(planes, axis, 0))
        foreground, labels = self._plane_instances(stack)
        labels = postprocess.link_planes(labels, self.link_iou, self.link_ioa)
        return np.moveaxis(foreground, 0, axis), np.moveaxis(labels, 0, axis)

    def consensus(self, foregrounds: list[np.ndarray], labels: list[np.ndarray]) -> np.ndarray:
        """One labelling from several axes' (see the module docstring for the rule)."""
        return postprocess.consensus(foregrounds, labels, self.consensus_iou)
