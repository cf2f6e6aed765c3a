"""A worker from outside voxblock: `invert`, max - x for integers, 1 - x for floats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from voxblock import ArrayWorker, VoxblockError

if TYPE_CHECKING:
    from voxblock import Array


@dataclass
class Invert(ArrayWorker):
    """Invert intensities: the dtype's maximum minus x (unsigned), or 1 - x (float)."""

    name = "invert"

    def check_input(self, source: Array) -> None:
        if np.dtype(source.dtype).kind not in "uf":
            raise VoxblockError(f"invert: input dtype {source.dtype} is neither unsigned nor float")

    def output_channels(self, source: Array) -> tuple[int, ...]:
        return tuple(source.shape[: source.channel_dims])

    def compute(self, data: np.ndarray, block: Any) -> np.ndarray:
        if data.dtype.kind == "u":
            return np.iinfo(data.dtype).max - data
        return 1 - data
