"""Scores of a segmentation against a ground truth (VOI split/merge, adapted Rand error), out of core.

Every score here is a function of the contingency table alone: how many voxels
carry each (segment id, ground-truth id) pair. The table is summed slab by slab,
so memory grows with the number of distinct pairs, never with the volume, and
a table of fragments against the ground truth turns into the table of any
agglomeration of them through its lookup table (`lut_table`), without reading
the volume again: a threshold sweep costs one pass.

Definitions are scikit-image's (`skimage.metrics.variation_of_information`,
`adapted_rand_error`), called with the ground truth first:

- voi_split = H(segmentation | ground truth), voi_merge = H(ground truth |
  segmentation), in bits (skimage's `variation_of_information(gt, seg)`).
- arand = skimage's adapted Rand error with alpha 0.5 (pairs of distinct voxels).
  `precision` is the fraction of voxel pairs joined in the segmentation that
  the ground truth joins too; `recall` the fraction of pairs joined in the
  ground truth that the segmentation joins. That is skimage's documented
  meaning; its code returns the two the other way round (scikit-image issue
  #6485), so `precision` here is the third value skimage returns, `recall` the
  second.

Label 0: by default voxels whose ground truth is 0 (unlabelled) are not
counted, the field's convention and skimage's `ignore_labels=(0,)` (the
default of `adapted_rand_error`; `variation_of_information`'s default counts
them). Segmentation label 0 is an ordinary label, as in skimage: background
voxels inside a labelled object count as one segment (a merge).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from voxblock.errors import VoxblockError

if TYPE_CHECKING:
    from funlib.geometry import Roi

    from voxblock.metadata import Array

IGNORE_GT = (0,)  # ground-truth labels not counted by default: 0, unlabelled
MAX_VOXELS = 1 << 21  # voxels read at once per array (16 MiB of uint64): larger slabs were no faster


class Table(NamedTuple):
    """A contingency table, sparse: `counts[k]` voxels are `seg[k]` in the segmentation and `gt[k]`
    in the ground truth. Pairs are unique and sorted by (seg, gt); ids keep their signedness
    (uint64 or int64)."""

    seg: np.ndarray
    gt: np.ndarray
    counts: np.ndarray

    @property
    def voxels(self) -> int:
        return int(self.counts.sum())


@dataclass(frozen=True)
class Scores:
    """Lower is better for voi_split, voi_merge and arand; precision and recall are in [0, 1].
    NaN where a score is undefined (no voxel counted, or no pair of voxels joined)."""

    voi_split: float
    voi_merge: float
    arand: float
    precision: float
    recall: float
    voxels: int  # voxels counted (those of ignored ground-truth labels not among them)

    @property
    def voi(self) -> float:
        return self.voi_split + self.voi_merge

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "voi": self.voi}


def _ids(values: np.ndarray) -> np.ndarray:
    """Labels as uint64 or int64: tables of one array's blocks then concatenate without promotion."""
    kind = np.dtype(values.dtype).kind
    if kind not in "ui":
        raise VoxblockError(f"labels must be integers; got dtype {values.dtype}")
    return values.astype(np.uint64 if kind == "u" else np.int64, copy=False)


def _compact(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of each voxel's label in `ids`, ids): fastremap's hash renumbering, far faster than
    sorting the voxels."""
    import fastremap

    renumbered, mapping = fastremap.renumber(values, start=0, preserve_zero=False)
    ids = np.empty(len(mapping), dtype=values.dtype)
    ids[np.fromiter(mapping.values(), dtype=np.int64, count=len(mapping))] = np.fromiter(
        mapping.keys(), dtype=values.dtype, count=len(mapping)
    )
    return renumbered.reshape(-1).astype(np.int64, copy=False), ids


def contingency(segmentation: np.ndarray, ground_truth: np.ndarray) -> Table:
    """The table of two label arrays of one shape (a block of each)."""
    segmentation, ground_truth = np.asarray(segmentation), np.asarray(ground_truth)
    if segmentation.shape != ground_truth.shape:
        raise ValueError(
            f"shapes differ: segmentation {segmentation.shape}, ground truth {ground_truth.shape}"
        )
    seg, gt = _ids(segmentation), _ids(ground_truth)
    if seg.size == 0:
        return Table(seg.reshape(-1), gt.reshape(-1), np.zeros(0, np.int64))
    seg_index, seg_ids = _compact(seg)
    gt_index, gt_ids = _compact(gt)
    n_gt = len(gt_ids)
    key = seg_index * n_gt + gt_index  # < voxels**2: no overflow below 3e9 voxels a block
    if len(seg_ids) * n_gt <= 4 * key.size:
        counts = np.bincount(key, minlength=len(seg_ids) * n_gt)
        key = np.flatnonzero(counts)
        counts = counts[key]
    else:
        import fastremap

        key, counts = fastremap.unique(key, return_counts=True)
    seg, gt = seg_ids[key // n_gt], gt_ids[key % n_gt]
    order = np.lexsort((gt, seg))  # renumbering follows first appearance: sort the (few) pairs
    return Table(seg[order], gt[order], counts.astype(np.int64)[order])


def merge(tables: Iterable[Table]) -> Table:
    """One table from several (of blocks of one volume, or relabelled pairs): counts of equal
    pairs summed."""
    tables = list(tables)
    tables = [t for t in tables if len(t.counts)] or tables[:1]  # an empty one may be unsigned
    if not tables:
        return Table(np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int64))
    seg = np.concatenate([t.seg for t in tables])
    gt = np.concatenate([t.gt for t in tables])
    counts = np.concatenate([t.counts for t in tables]).astype(np.int64, copy=False)
    if seg.dtype.kind == "f" or gt.dtype.kind == "f":
        raise ValueError("tables of signed and unsigned ids cannot be merged")
    return _reduce(seg, gt, counts)


def _reduce(seg: np.ndarray, gt: np.ndarray, counts: np.ndarray) -> Table:
    """Sort by (seg, gt) and sum the counts of equal pairs."""
    if seg.size == 0:
        return Table(seg, gt, counts)
    order = np.lexsort((gt, seg))
    seg, gt, counts = seg[order], gt[order], counts[order]
    starts = np.flatnonzero(np.r_[True, (seg[1:] != seg[:-1]) | (gt[1:] != gt[:-1])])
    return Table(seg[starts], gt[starts], np.add.reduceat(counts, starts))


def lut_table(fragment_table: Table, lut: np.ndarray) -> Table:
    """The table of the segments that `lut` joins fragments into, from the fragments' table.

    `lut` is 2xN: row 0 fragment ids, row 1 their segment ids (what voxblock's solves write).
    A fragment absent from it stays a segment of its own, as the relabel worker keeps it: with
    its id, unless that id is one of the LUT's segments, where it gets a fresh id instead of
    silently joining that segment. Fragment 0 stays 0 whatever the LUT says (background joins
    no segment). Only ids are rewritten, so this is exact: the table of the relabelled volume.
    """
    lut = np.asarray(lut)
    if lut.ndim != 2 or lut.shape[0] != 2:
        raise VoxblockError(f"a lookup table is 2xN (fragments, segments); got shape {lut.shape}")
    if lut.shape[1] and lut.dtype.kind not in "ui":
        raise VoxblockError(f"a lookup table holds integer ids; got dtype {lut.dtype}")
    fragments = fragment_table.seg
    lut = lut.astype(fragments.dtype)
    order = np.argsort(lut[0], kind="stable")
    keys, values = lut[0][order], lut[1][order]
    clash = (keys[1:] == keys[:-1]) & (values[1:] != values[:-1])
    if np.any(clash):
        raise VoxblockError(f"the lookup table maps fragment {keys[1:][clash][0]} to more than one segment")
    segments = fragments.copy()
    found = np.zeros(fragments.shape, bool)
    if keys.size:
        at = np.minimum(np.searchsorted(keys, fragments), keys.size - 1)
        found = keys[at] == fragments
        segments[found] = values[at[found]]
        taken = ~found & (fragments != 0) & np.isin(fragments, values)
        if np.any(taken):  # fresh ids past every id in sight, one per absent fragment
            fresh_from = max(int(values.max()), int(fragments.max())) + 1
            absent, index = np.unique(fragments[taken], return_inverse=True)
            if fresh_from + absent.size - 1 > np.iinfo(fragments.dtype).max:
                raise VoxblockError("no ids left for the fragments absent from the lookup table")
            segments[taken] = fragments.dtype.type(fresh_from) + index.astype(fragments.dtype)
    segments[fragments == 0] = 0
    return _reduce(segments, fragment_table.gt, fragment_table.counts)


def _xlogx(x: np.ndarray) -> np.ndarray:
    return x * np.log2(x, where=x > 0, out=np.zeros_like(x))


def scores(table: Table, ignore_gt: Sequence[int] = IGNORE_GT) -> Scores:
    """VOI and adapted Rand scores of a table, as skimage computes them from the images (see the
    module's docstring); voxels whose ground truth is in `ignore_gt` are not counted."""
    keep = ~np.isin(table.gt, np.asarray(list(ignore_gt), dtype=table.gt.dtype)) if len(ignore_gt) else None
    seg, gt, counts = (table.seg, table.gt, table.counts) if keep is None else (a[keep] for a in table)
    counts = counts.astype(np.float64)
    total = counts.sum()
    if total == 0:
        nan = math.nan
        return Scores(nan, nan, nan, nan, nan, 0)
    seg_sizes = np.bincount(np.unique(seg, return_inverse=True)[1].reshape(-1), weights=counts)
    gt_sizes = np.bincount(np.unique(gt, return_inverse=True)[1].reshape(-1), weights=counts)
    # H(seg|gt) = H(seg, gt) - H(gt), H(gt|seg) = H(seg, gt) - H(seg); p log p with p = n / total
    joint = _xlogx(counts / total).sum()
    voi_split = float(_xlogx(gt_sizes / total).sum() - joint)
    voi_merge = float(_xlogx(seg_sizes / total).sum() - joint)
    # pairs of distinct voxels: both joined, joined in the segmentation, joined in the ground truth
    both = counts @ counts - total
    in_seg = seg_sizes @ seg_sizes - total
    in_gt = gt_sizes @ gt_sizes - total
    with np.errstate(invalid="ignore", divide="ignore"):
        arand = 1.0 - both / (0.5 * in_gt + 0.5 * in_seg)
        precision, recall = both / in_seg, both / in_gt
    return Scores(
        max(voi_split, 0.0),  # entropies are >= 0: -1e-16 is rounding
        max(voi_merge, 0.0),
        float(arand),
        float(precision),
        float(recall),
        int(total),
    )


def common_roi(arrays: Sequence[tuple[str, Array]], roi: Roi | None = None) -> Roi:
    """Where all the arrays, (name, array) pairs, have voxels, within `roi` if given; refuses
    arrays that cannot be compared voxel by voxel, saying what to do."""
    first_name, first = arrays[0]
    for name, array in arrays:
        if array.channel_dims:
            raise VoxblockError(
                f"{name} has {array.channel_dims} channel axis/axes; labels have none (evaluate one "
                "channel written as its own dataset)"
            )
        if np.dtype(array.dtype).kind not in "ui":
            raise VoxblockError(
                f"{name} has dtype {np.dtype(array.dtype)}; labels must be integers (threshold and "
                "label a prediction first, e.g. voxblock segment threshold-label)"
            )
        if array.voxel_size != first.voxel_size:
            raise VoxblockError(
                f"{name} has voxel size {tuple(array.voxel_size)}, {first_name} "
                f"{tuple(first.voxel_size)}; evaluate arrays of one voxel size (downsample the finer "
                "one, e.g. voxblock run scale)"
            )
        shift = array.roi.begin - first.roi.begin
        if any(s % v for s, v in zip(shift, first.voxel_size)):
            raise VoxblockError(
                f"the voxels of {name} (offset {tuple(array.roi.begin)}) and {first_name} (offset "
                f"{tuple(first.roi.begin)}) do not line up: their offsets differ by a fraction of a "
                "voxel; fix the offset attribute of one"
            )
    region = first.roi
    for _, array in arrays[1:]:
        region = region.intersect(array.roi)
    if roi is not None:
        region = region.intersect(roi)
    if region.empty:
        where = ", ".join(f"{name} {array.roi}" for name, array in arrays)
        extra = f" and the ROI {roi}" if roi is not None else ""
        raise VoxblockError(
            f"{where}{extra} do not overlap (world units); check the arrays' offsets, or pass a ROI "
            "inside all of them"
        )
    return region


def slabs(
    region: Roi, origin: Sequence[int], voxel_size: Sequence[int], chunk: Sequence[int], max_voxels: int
):
    """Pieces of `region` on the chunk grid that starts at `origin`: slabs along the first axis as
    thick as `max_voxels` allows (whole chunks), cut along later axes too where one chunk-thick
    slab holds more (so a read never exceeds max_voxels voxels, or one chunk)."""
    from funlib.geometry import Coordinate, Roi

    voxel_size = Coordinate(voxel_size)
    shape = list(region.shape / voxel_size)
    ndim = len(shape)
    piece = list(shape)
    for axis in range(ndim):  # axes before `axis` one chunk thick, those after it whole
        piece[:axis] = [min(s, c) for s, c in zip(shape[:axis], chunk[:axis])]
        allowed = max_voxels // (math.prod(piece[:axis]) * math.prod(shape[axis + 1 :]))
        if allowed >= chunk[axis] or axis == ndim - 1:
            piece[axis] = min(shape[axis], max(1, allowed // chunk[axis]) * chunk[axis])
            break
    # on the chunk grid where an axis is cut, from the region's first voxel where it is whole
    first = [(b - o) // v for b, o, v in zip(region.begin, origin, voxel_size)]
    start = [f if p >= s else f // c * c for f, p, s, c in zip(first, piece, shape, chunk)]
    steps = [range(s, (e - o) // v, p) for s, e, o, v, p in zip(start, region.end, origin, voxel_size, piece)]
    for corner in np.ndindex(*(len(r) for r in steps)):
        begin = Coordinate(r[i] for r, i in zip(steps, corner)) * voxel_size + Coordinate(origin)
        box = Roi(begin, Coordinate(piece) * voxel_size).intersect(region)
        if not box.empty:
            yield box


def tables_arrays(
    segmentations: Sequence[str],
    ground_truth: str,
    roi: Roi | None = None,
    max_voxels: int = MAX_VOXELS,
    progress: bool = False,
) -> tuple[list[Table], Roi]:
    """The tables of several segmentations (names "CONTAINER/DATASET") against one ground truth,
    in one pass over the arrays' common ROI (within `roi`); the ground truth is read once per
    slab. A plain loop over the slabs: reading and counting run one slab at a time.

    Memory: one slab of each array (at most `max_voxels` voxels), and the tables (which are
    merged as they grow, so they hold about the distinct pairs seen).
    """
    from voxblock import arrays
    from voxblock.metadata import spatial_chunk_shape

    if not segmentations:
        raise VoxblockError("evaluate needs at least one segmentation")
    opened = [(name, arrays.open_input(name, role="segmentation")) for name in segmentations]
    truth = arrays.open_input(ground_truth, role="ground truth")
    region = common_roi([*opened, (ground_truth, truth)], roi)
    first = opened[0][1]
    pieces = list(slabs(region, first.roi.begin, first.voxel_size, spatial_chunk_shape(first), max_voxels))
    done: list[Table] = [merge([]) for _ in opened]
    pending: list[list[Table]] = [[] for _ in opened]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pieces), unit="slab", desc="evaluate", leave=False)
    for box in pieces:
        gt = arrays.read(truth, box, fill_value=0)
        for i, (_, array) in enumerate(opened):
            pending[i].append(contingency(arrays.read(array, box, fill_value=0), gt))
            if sum(len(t.counts) for t in pending[i]) > max(len(done[i].counts), 1 << 20):
                done[i] = merge([done[i], *pending[i]])
                pending[i] = []
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return [merge([d, *p]) for d, p in zip(done, pending)], region


def evaluate_arrays(
    segmentation: str,
    ground_truth: str,
    roi: Roi | None = None,
    ignore_gt: Sequence[int] = IGNORE_GT,
    max_voxels: int = MAX_VOXELS,
) -> Scores:
    """The scores of the array `segmentation` against `ground_truth` (names "CONTAINER/DATASET")
    over their common ROI (within `roi`, world units); voxels whose ground truth is in
    `ignore_gt` (default: 0, unlabelled) are not counted. Reads slab by slab: memory stays
    bounded by `max_voxels` and the number of distinct (segment, ground truth) pairs."""
    (table,), region = tables_arrays([segmentation], ground_truth, roi, max_voxels)
    return checked_scores(table, ignore_gt, region)


def checked_scores(table: Table, ignore_gt: Sequence[int], region: Roi) -> Scores:
    """`scores`, refusing a table with no voxel to count (it would give NaN everywhere)."""
    result = scores(table, ignore_gt)
    if result.voxels == 0:
        ignored = ", ".join(map(str, ignore_gt))
        raise VoxblockError(
            f"the ground truth has no voxel to count in {region} (world units): all are labelled "
            f"{ignored}, which are ignored; evaluate a ROI where it is labelled, or count them too"
        )
    return result
