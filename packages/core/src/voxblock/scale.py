"""`scale`: the example worker in core, y = factor * x + shift.

Small on purpose: it is what core's own tests run, and the shape every
other worker copies (options as fields, an output dtype, `compute`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from voxblock.errors import VoxblockError
from voxblock.workers import ArrayWorker, option

if TYPE_CHECKING:
    from voxblock.arrays import Array


@dataclass
class Scale(ArrayWorker):
    """Multiply by a factor and add a shift, voxel by voxel."""

    name = "scale"

    factor: float = option(1.0, help="multiply every voxel by this")
    shift: float = option(0.0, help="then add this")
    dtype: str = option("", help="output dtype (default: the input's)")

    def check_input(self, source: Array) -> None:
        if self.dtype:
            try:
                np.dtype(self.dtype)
            except TypeError:
                raise VoxblockError(f"scale: unknown dtype {self.dtype!r}") from None

    def output_dtype(self, source: Array) -> np.dtype:
        return np.dtype(self.dtype) if self.dtype else np.dtype(source.dtype)

    def output_channels(self, source: Array) -> tuple[int, ...]:
        return tuple(source.shape[: source.channel_dims])

    def compute(self, data: np.ndarray, block: Any) -> np.ndarray:
        return data * self.factor + self.shift
