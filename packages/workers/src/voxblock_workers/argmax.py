"""`argmax`: channels-first class scores -> one label per voxel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from voxblock import ArrayWorker, VoxblockError, option, smallest_unsigned

if TYPE_CHECKING:
    from voxblock import Array


@dataclass
class Argmax(ArrayWorker):
    """The index of the largest channel (or channel group) at each voxel.

    Without options the label is the channel index. With `channels`, label k
    means channel `channels[k]`; with `groups`, label k means group k, whose
    score is the sum of its channels. Ties go to the lowest label.
    """

    name = "argmax"
    fit = "shrink"  # any block size: border blocks are clipped to the volume

    channels: list = option([], help="channel indices to compare (default: all); label k = channels[k]")
    groups: list = option([], help="lists of channel indices summed into one class each; label k = group k")

    def _classes(self, num_channels: int) -> list[list[int]]:
        if self.channels and self.groups:
            raise VoxblockError("argmax: give channels or groups, not both")
        if self.groups:
            classes = self.groups
            what = "groups"
            if not all(isinstance(g, (list, tuple)) and len(g) > 0 for g in classes):
                raise VoxblockError(
                    f"argmax: groups must be a list of non-empty lists of channel indices; got {classes!r}"
                )
            classes = [list(g) for g in classes]
        elif self.channels:
            classes = [[c] for c in self.channels]
            what = "channels"
        else:
            return [[c] for c in range(num_channels)]
        for group in classes:
            for c in group:
                if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
                    raise VoxblockError(f"argmax: {what} must hold integer channel indices; got {c!r}")
                if not 0 <= c < num_channels:
                    raise VoxblockError(
                        f"argmax: channel {c} in {what} is out of range; "
                        f"the input has {num_channels} channels"
                    )
        return classes

    def check_input(self, source: Array) -> None:
        if source.channel_dims != 1:
            raise VoxblockError(
                f"argmax: input {self.input} must have exactly one channel axis (channels first); "
                f"it has {source.channel_dims}"
            )
        if np.dtype(source.dtype).kind not in "biuf":
            raise VoxblockError(f"argmax: input {self.input} has dtype {source.dtype}; it must be numeric")
        self._classes(source.shape[0])

    def output_dtype(self, source: Array) -> np.dtype:
        return smallest_unsigned(len(self._classes(source.shape[0])) - 1)

    def compute(self, data: np.ndarray, block: Any) -> np.ndarray:
        classes = self._classes(data.shape[0])
        if all(len(group) == 1 for group in classes):
            picked = [group[0] for group in classes]
            # all channels in order: use the block as read (a copy costs more than the argmax)
            scores = data if picked == list(range(data.shape[0])) else data[picked]
        else:
            accumulate = np.float64 if data.dtype.kind == "f" else np.int64
            scores = np.stack([data[group].sum(axis=0, dtype=accumulate) for group in classes])
        return np.argmax(scores, axis=0)
