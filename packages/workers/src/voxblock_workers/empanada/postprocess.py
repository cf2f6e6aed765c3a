"""Panoptic-DeepLab heads -> instance labels: pure functions of arrays (numpy, scipy), no model.

The steps, in the order the worker runs them (the rule in words: the
worker's docstring): `plane_instances` (foreground, centres, grouping per
plane), `link_planes` (2-D instances of consecutive planes -> 3-D),
`consensus` (several axes -> one labelling), `final_labels` (filters,
consecutive IDs). Overlaps of two labellings are voxblock's `contact_edges`
and joining labels along merge pairs is voxblock's `segment_lut`, the code
segment_blockwise merges fragments with.
"""

from __future__ import annotations

import numpy as np

from voxblock import contact_edges, segment_lut


def plane_instances(
    logits: np.ndarray,
    heatmap: np.ndarray,
    offsets: np.ndarray,
    semantic_threshold: float,
    center_threshold: float,
    nms_kernel: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Foreground (P, H, W) and 2-D instances per plane, IDs unique across the stack, from the
    heads of a stack of P planes: logits and heatmap (P, H, W), offsets (P, 2, H, W)."""
    from scipy import ndimage
    from scipy.spatial import cKDTree
    from scipy.special import expit

    foreground = expit(logits) > semantic_threshold
    pooled = ndimage.maximum_filter(heatmap, size=(1, nms_kernel, nms_kernel), mode="constant", cval=-np.inf)
    peaks = (heatmap == pooled) & (heatmap > center_threshold)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = True
    peak_labels, num_peaks = ndimage.label(peaks, structure=in_plane)
    labels = np.zeros(logits.shape, dtype=np.int64)
    if num_peaks == 0:
        return foreground, labels
    index = np.arange(1, num_peaks + 1)
    centres = np.array(ndimage.center_of_mass(peaks, peak_labels, index))  # (K, 3): plane, row, col
    plane_of = np.rint(centres[:, 0]).astype(np.int64)
    for plane in np.unique(plane_of):
        rows, cols = np.nonzero(foreground[plane])
        if rows.size == 0:
            continue
        ids = index[plane_of == plane]
        shift = offsets[plane][:, rows, cols]  # (2, pixels): towards the centre, rows then columns
        targets = np.stack([rows + shift[0], cols + shift[1]], axis=1)
        _, nearest = cKDTree(centres[ids - 1, 1:]).query(targets)
        labels[plane, rows, cols] = ids[nearest]
    return foreground, labels


def overlaps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label pairs (2, E) where `a` and `b` (same shape, 0 none) overlap, and their voxel counts (E,)."""
    both = (a > 0) & (b > 0)
    edges = contact_edges(a[both], b[both])  # (a, b, count, ...), sorted by (a, b)
    return edges[:, :2].T.astype(np.int64), edges[:, 2].astype(np.int64)


def joined(pairs: np.ndarray, count: int) -> np.ndarray:
    """A table from each label 0..count-1 to its group (1..; 0 stays 0) once `pairs` (2, E) are joined."""
    table = segment_lut(np.arange(1, count, dtype=np.uint64), pairs.T)
    group = np.zeros(count, dtype=np.int32 if count < 2**31 else np.int64)  # int32: half the traffic
    group[table[0].astype(np.int64)] = table[1]
    return group


def link_planes(labels: np.ndarray, link_iou: float, link_ioa: float) -> np.ndarray:
    """Join 2-D instances of consecutive planes (axis 0) into 3-D instances: IoU >= `link_iou`
    or intersection over the smaller one >= `link_ioa`."""
    if labels.shape[0] < 2 or not labels.any():
        return labels
    size = np.bincount(labels.ravel())
    pairs, overlap = overlaps(labels[:-1], labels[1:])
    if pairs.size == 0:
        return labels
    size_a, size_b = size[pairs[0]], size[pairs[1]]
    iou = overlap / (size_a + size_b - overlap)
    ioa = overlap / np.minimum(size_a, size_b)
    keep = (iou >= link_iou) | (ioa >= link_ioa)
    return joined(pairs[:, keep], len(size))[labels]


def consensus(foregrounds: list[np.ndarray], labels: list[np.ndarray], consensus_iou: float) -> np.ndarray:
    """One labelling from several axes': foreground where most axes say so; instances of two axes
    with IoU >= `consensus_iou` (within that foreground) one cluster; each voxel the cluster most
    of its axes put it in (ties: the first axis)."""
    votes = np.sum(foregrounds, axis=0)
    foreground = 2 * votes > len(foregrounds)
    shifted, base = [], 0
    for found in labels:
        shifted.append(np.where(found > 0, found + base, 0)[foreground])
        base += int(found.max(initial=0)) + 1
    size = np.bincount(np.concatenate(shifted), minlength=base)
    edges = []
    for i in range(len(shifted)):
        for j in range(i + 1, len(shifted)):
            pairs, overlap = overlaps(shifted[i], shifted[j])
            if pairs.size:
                iou = overlap / (size[pairs[0]] + size[pairs[1]] - overlap)
                edges.append(pairs[:, iou >= consensus_iou])
    cluster = joined(np.concatenate(edges, axis=1) if edges else np.zeros((2, 0), np.int64), base)
    choices = np.stack([cluster[s] for s in shifted])  # (axes, voxels); 0: no instance
    agree = np.stack([((choices == c) & (c > 0)).sum(axis=0) for c in choices])
    chosen = choices[np.argmax(agree, axis=0), np.arange(choices.shape[1])]
    result = np.zeros(foreground.shape, dtype=np.int64)
    result[foreground] = chosen
    return result


def filtered(labels: np.ndarray, min_size: int, min_extent: int) -> np.ndarray:
    """Consecutive labels with instances of fewer than `min_size` voxels, or shorter than
    `min_extent` voxels along any axis, set to 0."""
    if labels.max(initial=0) == 0 or (min_size <= 1 and min_extent <= 1):
        return labels
    from scipy import ndimage

    count = int(labels.max())
    drop = np.zeros(count + 1, dtype=bool)
    if min_size > 1:
        drop |= np.bincount(labels.ravel(), minlength=count + 1) < min_size
    if min_extent > 1:
        for i, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is not None and min(s.stop - s.start for s in box) < min_extent:
                drop[i] = True
    drop[0] = False
    if drop.any():
        labels = np.where(drop[labels], 0, labels)
    return labels


def final_labels(labels: np.ndarray, min_size: int, min_extent: int) -> np.ndarray:
    """Instances as the worker returns them: filtered, uint64, consecutive from 1 (0 background)."""
    import fastremap

    labels, _ = fastremap.renumber(np.ascontiguousarray(labels), preserve_zero=True, in_place=True)
    labels = filtered(labels.astype(np.int64, copy=False), min_size, min_extent)
    labels, _ = fastremap.renumber(labels, preserve_zero=True, in_place=True)
    return labels.astype(np.uint64, copy=False)
