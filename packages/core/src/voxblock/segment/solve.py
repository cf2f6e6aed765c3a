"""The global solve: merge edges -> a fragment -> segment lookup table.

Connected components of the graph whose nodes are fragments and whose
edges are merges (the same answer as union-find, computed by scipy's
compiled graph code). Memory grows with fragments and edges, not voxels.
"""

from __future__ import annotations

import numpy as np


def segment_lut(fragments: np.ndarray, merges: np.ndarray) -> np.ndarray:
    """2xN uint64 table (fragment row, segment row); segments consecutive from 1.

    Segments are numbered in the order of their smallest fragment ID, so the
    table does not depend on the order edges were found in.
    """
    merges = np.asarray(merges, dtype=np.uint64).reshape(-1, 2)
    nodes = np.unique(np.concatenate([np.asarray(fragments, dtype=np.uint64).ravel(), merges.ravel()]))
    nodes = nodes[nodes > 0]
    if nodes.size == 0:
        return np.zeros((2, 0), dtype=np.uint64)
    from scipy.sparse import coo_matrix  # only the solve needs scipy: fragment workers skip it
    from scipy.sparse.csgraph import connected_components

    rows = np.searchsorted(nodes, merges[:, 0])
    cols = np.searchsorted(nodes, merges[:, 1])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(nodes.size,) * 2)
    _, component = connected_components(graph, directed=False)
    # renumber components by their first (smallest) fragment: deterministic
    _, first = np.unique(component, return_index=True)
    order = np.empty_like(first)
    order[np.argsort(first)] = np.arange(first.size)
    segments = order[component].astype(np.uint64) + np.uint64(1)
    return np.stack([nodes, segments])
