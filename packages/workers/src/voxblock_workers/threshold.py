"""`threshold`: a 0/1 uint8 mask from one channel (or a single-channel volume)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from voxblock import ArrayWorker, VoxblockError, option

if TYPE_CHECKING:
    from voxblock import Array


@dataclass
class Threshold(ArrayWorker):
    """1 where the input is above the threshold (at or above, if inclusive), else 0."""

    name = "threshold"
    fit = "shrink"  # any block size: border blocks are clipped to the volume

    threshold: float = option(0.5, help="the threshold value")
    channel: int = option(-1, help="channel to threshold; -1: the input has no channel axis")
    inclusive: bool = option(False, help="use >= instead of >")

    def check_input(self, source: Array) -> None:
        dtype = np.dtype(source.dtype)
        if dtype.kind not in "biuf":
            raise VoxblockError(f"threshold: input {self.input} has dtype {dtype}; it must be numeric")
        channels = source.shape[: source.channel_dims]
        if len(channels) > 1:
            raise VoxblockError(
                f"threshold: input {self.input} has {len(channels)} channel axes {tuple(channels)}; "
                "at most one is supported"
            )
        if self.channel == -1:
            if channels:
                raise VoxblockError(
                    f"threshold: input {self.input} has {channels[0]} channels; "
                    f"choose one with channel=0..{channels[0] - 1}"
                )
        elif not channels:
            raise VoxblockError(
                f"threshold: channel={self.channel} was given but input {self.input} has no channel axis "
                "(leave channel at -1)"
            )
        elif not 0 <= self.channel < channels[0]:
            raise VoxblockError(
                f"threshold: channel={self.channel} is out of range; input {self.input} has "
                f"{channels[0]} channels"
            )

    def output_dtype(self, source: Array) -> np.dtype:
        return np.dtype(np.uint8)

    def compute(self, data: np.ndarray, block: Any) -> np.ndarray:
        if self.channel >= 0:
            data = data[self.channel]
        mask = data >= self.threshold if self.inclusive else data > self.threshold
        return mask.astype(np.uint8)
