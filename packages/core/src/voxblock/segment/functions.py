"""Segment functions: `f(input_array, block, **parameters) -> labels over block.read_roi`.

Three sources, one calling convention:
- a Python file defining `segment_function` (and optionally
  `default_parameters`), as dacapo's segment_blockwise expects;
- `threshold-label`, built in: threshold then connected components;
- a registered worker whose class has a `segment(input_array, block)`
  method (e.g. `watershed`), built from the parameters as its options.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from funlib.geometry import Roi

from voxblock import arrays
from voxblock.compat import load_worker_module
from voxblock.errors import VoxblockError
from voxblock.geometry import roi_slices
from voxblock.workers import worker_class

BUILT_IN = ("threshold-label",)
BUILT_IN_SUMMARIES = {"threshold-label": "threshold, then connected components of the foreground"}


def neighbours(ndim: int, rank: int) -> int:
    """How many neighbours a voxel has when one step may move on up to `rank` of `ndim` axes."""
    return sum(math.comb(ndim, k) * 2**k for k in range(1, rank + 1))


def connectivities(ndim: int) -> dict[int, int]:
    """The connectivity values threshold-label takes in `ndim` dimensions, and the rank of each.

    In 3-D 6, 18, 26; in 2-D 4, 8 and, as cc3d reads them there, 6 (= 4), 18 and 26 (= 8), so
    that the default 6 means faces in 2-D too; other dimensions: the neighbour count of each
    rank (2*ndim ... 3**ndim - 1), and 6 for faces.
    """
    values = {neighbours(ndim, rank): rank for rank in range(1, ndim + 1)}
    if ndim == 2:
        values.update({6: 1, 18: 2, 26: 2})
    elif ndim != 3:
        values.setdefault(6, 1)
    return values


def connectivity_rank(ndim: int, connectivity: Any) -> int:
    """On how many axes one step between connected voxels may move: 1 faces only, ndim fully.

    A value outside `connectivities(ndim)` is refused: cc3d would run full connectivity.
    """
    values = connectivities(ndim)
    if isinstance(connectivity, bool) or connectivity not in values:
        named = ", ".join(str(v) for v in sorted(values))
        raise VoxblockError(
            f"threshold-label: connectivity {connectivity!r} is not valid in {ndim}-D; it takes {named}"
            + (" (6 faces, 18 and edges, 26 and corners)" if ndim == 3 else "")
            + (" (4 faces, 8 and corners; 6, 18, 26 as cc3d reads them in 2-D: 4, 8, 8)" if ndim == 2 else "")
        )
    return values[connectivity]


THRESHOLD_LABEL_PARAMETERS = {
    "threshold": "a voxel is foreground where input > threshold",
    "connectivity": "6 (faces), 18 (and edges) or 26 (and corners) in 3-D; 4 or 8 in 2-D",
    "channel": "the channel to threshold, for an input with a channel axis",
}


def check_threshold_label(parameters: Mapping[str, Any]) -> None:
    """Refuse parameters threshold-label would misread: unknown names, a threshold that is no number.

    The connectivity needs the input's dimensions: `connectivity_rank` checks it.
    """
    unknown = set(parameters) - set(THRESHOLD_LABEL_PARAMETERS)
    if unknown:
        raise VoxblockError(
            f"threshold-label has no parameter {', '.join(sorted(unknown))}; "
            f"it takes {', '.join(sorted(THRESHOLD_LABEL_PARAMETERS))}"
        )
    threshold = parameters.get("threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
        raise VoxblockError(f"threshold-label: threshold must be a finite number; got {threshold!r}")
    channel = parameters.get("channel")
    if channel is not None and (isinstance(channel, bool) or not isinstance(channel, numbers.Integral)):
        raise VoxblockError(f"threshold-label: channel must be an integer index; got {channel!r}")


def check_channel(channels: tuple[int, ...], channel: int | None) -> None:
    """threshold-label thresholds one spatial volume: a channel where there is one, none otherwise.

    Without this, `channel=0` on an input without channels would take its first spatial slice.
    """
    if channel is None and channels:
        raise VoxblockError(
            f"threshold-label: the input has channels {channels}; pick one with -p channel=INDEX"
        )
    if channel is not None and len(channels) != 1:
        has = channels or "none"
        raise VoxblockError(
            f"threshold-label: channel={channel} needs an input with one channel axis; it has {has}"
        )
    if channel is not None and not -channels[0] <= channel < channels[0]:
        raise VoxblockError(f"threshold-label: channel {channel} is not one of the input's {channels[0]}")


def built_in_parameters(name: str) -> list[tuple[str, Any, str]]:
    """(parameter, default, what it does) of a built-in segment function, for help texts."""
    if name != "threshold-label":
        raise VoxblockError(f"{name!r} is not a built-in segment function; they are {', '.join(BUILT_IN)}")
    defaults = inspect.signature(threshold_label).parameters
    return [(key, defaults[key].default, text) for key, text in THRESHOLD_LABEL_PARAMETERS.items()]


def built_in_help() -> list[str]:
    """One line per built-in segment function and one per parameter (name=default: what it does)."""
    lines = []
    for name in BUILT_IN:
        lines.append(f"{name}: {BUILT_IN_SUMMARIES[name]}")
        for key, default, text in built_in_parameters(name):
            lines.append(f"  -p {f'{key}={default}':18s} {text}")
    return lines


class ZeroPadded:
    """The input as a segment function sees it: `array[roi]` and `array.to_ndarray(roi)` read
    zeros outside the region segmented (the total ROI, within the input).

    Border blocks read past it (with fit="overhang" their read ROI leaves the input; funlib's
    arrays raise there), and a crop of a larger input must not be joined through voxels outside
    the crop: with them, the labelling of a crop changed with the block size. Everything else
    is the wrapped array's own.
    """

    __slots__ = ("array", "region")

    def __init__(self, array: Any, region: Roi | None = None):
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "region", array.roi if region is None else array.roi.intersect(region))

    def read(self, roi: Roi, fill_value: Any = 0) -> np.ndarray:
        """The data in `roi`, `fill_value` outside the region."""
        inside = self.region.intersect(roi)
        if inside == roi:
            return arrays.read(self.array, roi, fill_value)
        channels = arrays.channel_shape(self.array)
        data = np.full(channels + tuple(roi.shape / self.array.voxel_size), fill_value, self.array.dtype)
        if not inside.empty:
            target = roi_slices(inside, roi.begin, self.array.voxel_size)
            data[(slice(None),) * len(channels) + target] = arrays.read(self.array, inside, fill_value)
        return data

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, Roi):
            return self.read(key)
        return self.array[key]

    def to_ndarray(self, roi: Roi | None = None, fill_value: Any = 0) -> np.ndarray:
        return self.read(self.region if roi is None else roi, fill_value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.array, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.array, name, value)  # e.g. the chunk I/O arrays.read keeps on the array

    def __repr__(self) -> str:
        return f"ZeroPadded({self.array!r}, region={self.region})"


def read_block(input_array: Any, roi: Roi) -> np.ndarray:
    """What a segment function reads over `roi`: zeros outside its region, or outside the input."""
    if isinstance(input_array, ZeroPadded):
        return input_array.read(roi)
    return arrays.read(input_array, roi)


def threshold_label(
    input_array: Any,
    block: Any,
    threshold: float = 0.5,
    connectivity: int = 6,
    channel: int | None = None,
) -> np.ndarray:
    """Foreground (> threshold) split into connected components (cc3d, 2-3x scipy's speed).

    Labels are consecutive from 1: segment_blockwise's face stitching relies on it.
    """
    check_channel(arrays.channel_shape(input_array), channel)
    data = read_block(input_array, block.read_roi)
    if channel is not None:
        data = data[channel]
    foreground = data > threshold
    rank = connectivity_rank(foreground.ndim, connectivity)
    if foreground.ndim in (2, 3):
        import cc3d

        # uint8, not bool: cc3d 4.1 mislabels some bool 2-D images with 8-connectivity;
        # uint32 labels (a block has fewer voxels than that) halve what later steps move
        out_dtype = np.uint32 if foreground.size < 2**32 else np.uint64
        return cc3d.connected_components(
            foreground.view(np.uint8),
            connectivity={(2, 1): 4, (2, 2): 8, (3, 1): 6, (3, 2): 18, (3, 3): 26}[foreground.ndim, rank],
            out_dtype=out_dtype,
        )
    from scipy import ndimage

    labels, _ = ndimage.label(foreground, structure=ndimage.generate_binary_structure(foreground.ndim, rank))
    return labels.astype(np.uint64)


@dataclass
class SegmentFunction:
    """A picklable handle on a segment function and its parameters."""

    spec: str
    parameters: dict[str, Any] = field(default_factory=dict)
    # [offset, shape] of the region segmented: the function reads zeros outside it
    region: list | None = None

    def __post_init__(self) -> None:
        self._function: Any = None

    @property
    def kind(self) -> str:
        if self.spec in BUILT_IN:
            return "built-in"
        if self.spec.endswith(".py") or Path(self.spec).is_file():
            return "file"
        return "worker"

    def load(self) -> SegmentFunction:
        """Resolve the function now (and validate the parameters): VoxblockError if impossible."""
        if self._function is not None:
            return self
        if self.kind == "built-in":
            check_threshold_label(self.parameters)
            self._function = threshold_label
        elif self.kind == "file":
            module = load_worker_module(Path(self.spec))
            function = getattr(module, "segment_function", None)
            if not callable(function):
                raise VoxblockError(f"{self.spec} defines no segment_function(input_array, block, ...)")
            defaults = dict(getattr(module, "default_parameters", {}) or {})
            self.parameters = {**defaults, **self.parameters}
            self._function = function
        else:
            cls = worker_class(self.spec)
            if not callable(getattr(cls, "segment", None)):
                raise VoxblockError(
                    f"worker {self.spec!r} cannot segment blocks (it has no segment method); "
                    f"use a segment function file, threshold-label, or a worker such as watershed"
                )
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = set(self.parameters) - names
            if unknown:
                raise VoxblockError(
                    f"worker {self.spec!r} has no option {', '.join(sorted(unknown))}; "
                    f"its options are {', '.join(sorted(names))}"
                )
            worker = cls(**self.parameters)

            def function(input_array: Any, block: Any) -> np.ndarray:
                return worker.segment(input_array, block)

            self._function = function
        return self

    def check_input(self, source: Any) -> None:
        """Refuse, before any work, parameters that do not fit the input (threshold-label's
        connectivity for its dimensions, its channel for its channel axes)."""
        if self.kind == "built-in":
            connectivity_rank(source.voxel_size.dims, self.parameters.get("connectivity", 6))
            check_channel(arrays.channel_shape(source), self.parameters.get("channel"))
        elif self.kind == "worker":
            # the worker's own checks of its options (watershed's offsets, its mask), in the driver
            check = getattr(worker_class(self.spec)(**self.parameters), "check_input", None)
            if callable(check):
                check(source)

    def stitch_rank(self, ndim: int) -> int | None:
        """The connectivity rank if labels are connected components of a per-voxel foreground
        (blocks can then be stitched exactly at their faces); None if they may need context."""
        if self.kind == "built-in":
            return connectivity_rank(ndim, self.parameters.get("connectivity", 6))
        return None

    def __call__(self, input_array: Any, block: Any) -> np.ndarray:
        self.load()
        if not isinstance(input_array, ZeroPadded):
            region = Roi(*self.region) if self.region else None
            input_array = ZeroPadded(input_array, region)
        if self.kind == "worker":
            return self._function(input_array, block)
        return self._function(input_array, block, **self.parameters)

    def __getstate__(self) -> Mapping[str, Any]:
        return {"spec": self.spec, "parameters": self.parameters, "region": self.region}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.spec = state["spec"]
        self.region = state.get("region")
        self.parameters = dict(state["parameters"])
        self._function = None
