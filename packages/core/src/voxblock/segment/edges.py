"""Overlaps between a block's labels and its neighbours' fragments, as merge edges.

A block labels its whole read ROI. In the context (the read ROI less its
own write ROI) it sees fragments that neighbouring blocks already wrote:
wherever one of its labels and a neighbour's fragment cover the same voxel,
they are the same object (for a local function such as connected
components), so the pair is an edge. Overlap counts and sizes travel with
each edge so that functions that are not exactly local can merge only
above an overlap-fraction or IoU threshold.
"""

from __future__ import annotations

import numpy as np

EDGE_FIELDS = ("a", "b", "overlap", "size_a", "size_b")


def block_edges(own: np.ndarray, neighbours: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
    """Edges (a, b, overlap, size_a, size_b) between `own` and `neighbours` labels.

    `own` and `neighbours` cover the same voxels (0 is background or not yet
    written); `context` is True where the neighbours' fragments count (None:
    everywhere). Sizes are measured inside the region where both could be
    compared.
    """
    region = neighbours > 0 if context is None else context & (neighbours > 0)
    a = own[region].astype(np.uint64)
    b = neighbours[region].astype(np.uint64)
    both = (a > 0) & (b > 0)
    if not both.any():
        return np.zeros((0, 5), dtype=np.uint64)
    # compact indices instead of unique rows (np.unique(axis=0) sorts structured rows: slow)
    ids_a, index_a, count_a = np.unique(a, return_inverse=True, return_counts=True)
    ids_b, index_b, count_b = np.unique(b, return_inverse=True, return_counts=True)
    if ids_a[0] == 0:
        count_a[0] = 0  # background is not an object
    keys, overlap = np.unique(index_a[both].astype(np.int64) * ids_b.size + index_b[both], return_counts=True)
    pair_a, pair_b = np.divmod(keys, ids_b.size)
    return np.column_stack([ids_a[pair_a], ids_b[pair_b], overlap, count_a[pair_a], count_b[pair_b]]).astype(
        np.uint64
    )


def contact_edges(own: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """Edges (a, b, contacts, contacts of a, contacts of b) from pairs of touching labelled voxels.

    For stitching at faces, where every contact merges: one sort of the pairs
    instead of block_edges' three.
    """
    if own.size == 0:
        return np.zeros((0, 5), dtype=np.uint64)
    a = own.astype(np.uint64)
    b = theirs.astype(np.uint64)
    if int(a.max()) < 2**32 and int(b.max()) < 2**32:
        keys, overlap = np.unique((a << np.uint64(32)) | b, return_counts=True)
        pair_a, pair_b = keys >> np.uint64(32), keys & np.uint64(2**32 - 1)
    else:
        pairs, overlap = np.unique(np.stack([a, b], axis=1), axis=0, return_counts=True)
        pair_a, pair_b = pairs[:, 0], pairs[:, 1]
    sizes = []
    for ids in (pair_a, pair_b):
        _, index = np.unique(ids, return_inverse=True)
        sizes.append(np.bincount(index, weights=overlap)[index])
    return np.column_stack([pair_a, pair_b, overlap, *sizes]).astype(np.uint64)


def select_edges(edges: np.ndarray, merge: str = "any", threshold: float = 0.0) -> np.ndarray:
    """The (a, b) pairs to merge: any overlap, or overlap fraction / IoU >= threshold."""
    if edges.size == 0:
        return np.zeros((0, 2), dtype=np.uint64)
    overlap = edges[:, 2].astype(np.float64)
    if merge == "any":
        keep = overlap > 0
    elif merge == "overlap":
        keep = overlap / np.minimum(edges[:, 3], edges[:, 4]) >= threshold
    elif merge == "iou":
        keep = overlap / (edges[:, 3] + edges[:, 4] - overlap) >= threshold
    else:
        raise ValueError(f"merge must be 'any', 'overlap' or 'iou'; got {merge!r}")
    return edges[keep][:, :2]
