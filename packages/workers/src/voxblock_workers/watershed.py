"""`watershed`: mutex watershed fragments from affinities (mwatershed).

Each block runs mutex watershed on its read ROI (the write ROI plus
context), crops the result to its write ROI and renumbers it 1..n. IDs are
made unique across the volume from the block's position on the block grid
(`block_ids = True`, `ArrayWorker.global_ids`: block k owns k * V + 1 ..
(k + 1) * V, V the voxels of a write block), so they do not depend on the
order blocks run in, a rerun of one block writes the same IDs, and 0 stays
background.

With a foreground `mask` (nonzero = foreground, read over the read ROI like the
affinities, background past the mask array), every affinity edge with an end
outside the mask is dropped (weight 0: never joins) and voxels outside the mask
are 0: a block's fragments are mutex watershed on the foreground voxels alone,
so no fragment joins through background and nothing outside the mask (no
merge, no mutex) changes a fragment inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from voxblock import (
    ArrayName,
    ArrayWorker,
    VoxblockError,
    affinity_offsets,
    check_affinities,
    crop_to,
    open_input,
    option,
    read,
)

if TYPE_CHECKING:
    from voxblock import Array


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass
class Watershed(ArrayWorker):
    """Mutex watershed on channels-first affinities, one channel per offset."""

    name = "watershed"
    fit = "shrink"  # any block size: border blocks are clipped to the volume
    block_ids = True  # fragment IDs from the block's position on the grid (global_ids)

    offsets: list = option(
        [], help="one offset per affinity channel (default: the input's 'offsets' attribute)"
    )
    bias: Any = option(
        -0.5, help="added to the affinities before mutex watershed: one float, or one per offset"
    )
    strides: list = option([], help="optional stride per offset (mwatershed strides)")
    randomized_strides: bool = option(False, help="use strides as probabilities of keeping an edge")
    min_size: int = option(0, help="fragments with fewer voxels than this (in the read ROI) become 0")
    mask: str = option(
        "",
        help="foreground mask, CONTAINER/DATASET (nonzero = foreground, integer or bool, the "
        "affinities' voxel size, covering them): no fragment outside it, none joined across it",
    )

    def context_inputs(self) -> list[str]:
        return [self.input, self.mask] if self.mask else [self.input]

    def _offsets(self, source: Array) -> list[list[int]]:
        return affinity_offsets(self.offsets, source, "watershed", self.input)

    def _bias(self, n: int) -> np.ndarray:
        bias = self.bias
        if isinstance(bias, (int, float)) and not isinstance(bias, bool):
            return np.full(n, float(bias))
        if (
            isinstance(bias, (list, tuple))
            and len(bias) == n
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bias)
        ):
            return np.asarray(bias, dtype=np.float64)
        raise VoxblockError(
            f"watershed: bias must be a number or a list of {n} numbers (one per offset); got {bias!r}"
        )

    def check_input(self, source: Array) -> None:
        check_affinities(source, self.input, "watershed: input ")
        offsets = self._offsets(source)
        self._bias(len(offsets))
        if self.strides and (
            len(self.strides) != len(offsets)
            or not all(
                isinstance(s, (list, tuple))
                and len(s) == len(offsets[0])
                and all(_is_int(v) and v > 0 for v in s)
                for s in self.strides
            )
        ):
            raise VoxblockError(
                f"watershed: strides must be one list of positive integers per offset; got {self.strides!r}"
            )
        if not _is_int(self.min_size) or self.min_size < 0:
            raise VoxblockError(f"watershed: min_size must be an integer >= 0; got {self.min_size!r}")
        if self.mask:
            self._check_mask(source)

    def _check_mask(self, source: Array) -> None:
        """Refuse a mask that cannot be read block by block beside the affinities."""
        if not isinstance(self.mask, str):
            raise VoxblockError(f"watershed: mask must be an array name CONTAINER/DATASET; got {self.mask!r}")
        what = f"watershed: mask {self.mask}"
        if self.output and ArrayName.parse(self.mask) == ArrayName.parse(self.output):
            raise VoxblockError(f"{what} is also the output; write the fragments to another array")
        try:
            mask = open_input(self.mask, role="watershed: mask")
        except VoxblockError as error:
            raise VoxblockError(f"{error}; pass an existing foreground mask, or no mask") from None
        if mask.channel_dims:
            raise VoxblockError(
                f"{what} has {mask.channel_dims} channel axes; a mask has none (one value per voxel): "
                "pass a single-channel mask, e.g. threshold one channel first"
            )
        dtype = np.dtype(mask.dtype)
        if dtype.kind not in "iub":
            raise VoxblockError(
                f"{what} has dtype {dtype}; a mask is integer or bool (nonzero = foreground): "
                "threshold it first (voxblock run threshold)"
            )
        if mask.voxel_size != source.voxel_size:
            raise VoxblockError(
                f"{what} has voxel size {tuple(mask.voxel_size)}, the affinities {self.input} "
                f"{tuple(source.voxel_size)}; pass a mask at the affinities' resolution"
            )
        if any((m - a) % v for m, a, v in zip(mask.offset, source.offset, source.voxel_size)):
            raise VoxblockError(
                f"{what} has offset {tuple(mask.offset)}, off the voxel grid of the affinities "
                f"(offset {tuple(source.offset)}, voxel size {tuple(source.voxel_size)}); pass a mask "
                "on the same grid"
            )
        if not mask.roi.contains(source.roi):
            raise VoxblockError(
                f"{what} covers {mask.roi}, not all of the affinities {self.input} ({source.roi}); "
                "pass a mask that covers the affinities (0 where there is no foreground)"
            )

    def output_dtype(self, source: Array) -> np.dtype:
        return np.dtype(np.uint64)

    def setup(self) -> None:
        super().setup()
        self._offsets_used = self._offsets(self.source)
        self._bias_used = self._bias(len(self._offsets_used))
        # an attribute of the worker, so that the job gives it its halo (a context input)
        self._mask_array = open_input(self.mask) if self.mask else None

    def _foreground(self, roi: Any) -> np.ndarray | None:
        """The mask over `roi` as bool (False past the mask array); None without a mask."""
        if not self.mask:
            return None
        if getattr(self, "_mask_array", None) is None:
            self._mask_array = open_input(self.mask)
        return np.asarray(read(self._mask_array, roi, 0)) != 0

    def segment(self, source: Array, block: Any) -> np.ndarray:
        """Fragments over the block's whole read ROI, for `segment_blockwise`.

        Local labels only: segment_blockwise gives them block-position IDs,
        merges them across blocks and relabels.
        """
        if getattr(self, "_offsets_used", None) is None:
            self.check_input(source)
            self._offsets_used = self._offsets(source)
            self._bias_used = self._bias(len(self._offsets_used))
        affinities = source.to_ndarray(block.read_roi)  # zeros outside the region segmented
        return self.fragments(affinities, self._foreground(block.read_roi))

    def fragments(self, affinities: np.ndarray, foreground: np.ndarray | None = None) -> np.ndarray:
        """Mutex watershed on one region: uint64 labels, 0 where no fragment formed.

        `foreground` (bool, the region's spatial shape): edges with an end outside it get
        weight 0 (never merged), and voxels outside it are 0.
        """
        import mwatershed

        affs = affinities.astype(np.float64)
        if affinities.dtype == np.uint8:
            affs /= 255.0
        affs += self._bias_used.reshape((-1,) + (1,) * (affs.ndim - 1))
        if foreground is not None:
            drop_edges_leaving(affs, foreground, self._offsets_used)
        labels = mwatershed.agglom(
            affs,
            self._offsets_used,
            strides=self.strides or None,
            randomized_strides=self.randomized_strides,
        )
        if foreground is not None:
            labels[~foreground] = 0
        if self.min_size > 1:
            ids, counts = np.unique(labels, return_counts=True)
            small = ids[(counts < self.min_size) & (ids != 0)]
            if small.size:
                labels[np.isin(labels, small)] = 0
        return labels

    def compute(self, data: np.ndarray, block: Any) -> np.ndarray:
        import fastremap

        labels = self.fragments(data, self._foreground(block.read_roi))
        labels = crop_to(labels, block.read_roi, block.write_roi, self.source.voxel_size)
        labels, _ = fastremap.renumber(np.ascontiguousarray(labels), preserve_zero=True, in_place=False)
        labels = labels.astype(np.uint64, copy=False)
        return self.global_ids(labels, block)


def drop_edges_leaving(weights: np.ndarray, foreground: np.ndarray, offsets: list[list[int]]) -> None:
    """Set to 0, in place, the weight of every edge (channel c at voxel u: u -- u + offsets[c])
    with an end outside `foreground`; edges leaving the region are not edges (mwatershed)."""
    for channel, offset in zip(weights, offsets):
        if any(abs(o) >= s for s, o in zip(foreground.shape, offset)):
            continue  # every edge of this offset leaves the region
        keep = foreground.copy()
        here = tuple(slice(max(0, -o), s - max(0, o)) for s, o in zip(foreground.shape, offset))
        there = tuple(slice(max(0, o), s - max(0, -o)) for s, o in zip(foreground.shape, offset))
        keep[here] &= foreground[there]
        channel[~keep] = 0.0
