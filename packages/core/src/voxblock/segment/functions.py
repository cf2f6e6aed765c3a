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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from voxblock import arrays
from voxblock.errors import VoxblockError
from voxblock.workers import load_worker_module, worker_class

BUILT_IN = ("threshold-label",)


def connectivity_rank(ndim: int, connectivity: int) -> int:
    """On how many axes one step between connected voxels may move: 1 faces only, ndim fully.

    In 2-D and 3-D: 4/6 -> 1, 8/18 -> 2, 26 -> 3; an unknown value means the
    face connectivity if it is 4 or 6, else full. Other dimensions: 4/6 -> 1, else full.
    """
    if ndim in (2, 3):
        allowed = {2: (4, 8), 3: (6, 18, 26)}[ndim]
        if connectivity not in allowed:
            connectivity = allowed[0] if connectivity in (4, 6) else allowed[-1]
        return {4: 1, 8: 2, 6: 1, 18: 2, 26: 3}[connectivity]
    return 1 if connectivity in (4, 6) else ndim


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
    data = arrays.read(input_array, block.read_roi)
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
            known = {"threshold", "connectivity", "channel"}
            unknown = set(self.parameters) - known
            if unknown:
                raise VoxblockError(
                    f"threshold-label has no parameter {', '.join(sorted(unknown))}; "
                    f"it takes {', '.join(sorted(known))}"
                )
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

    def stitch_rank(self, ndim: int) -> int | None:
        """The connectivity rank if labels are connected components of a per-voxel foreground
        (blocks can then be stitched exactly at their faces); None if they may need context."""
        if self.kind == "built-in":
            return connectivity_rank(ndim, int(self.parameters.get("connectivity", 6)))
        return None

    def __call__(self, input_array: Any, block: Any) -> np.ndarray:
        self.load()
        if self.kind == "worker":
            return self._function(input_array, block)
        return self._function(input_array, block, **self.parameters)

    def __getstate__(self) -> Mapping[str, Any]:
        return {"spec": self.spec, "parameters": self.parameters}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.spec = state["spec"]
        self.parameters = dict(state["parameters"])
        self._function = None
