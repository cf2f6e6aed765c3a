"""The global agglomeration of a region graph: fragment -> segment lookup tables (LUTs).

Two methods on the finalized graph (`graphdb.finalize`: one edge per touching pair with its
mean `affinity`):

- `threshold`: connected components of the edges whose affinity is above the threshold, exactly
  (scipy's compiled components, through `segment_lut`).
- `mws`: mutex watershed on the graph, as volara's GraphMWS with one weight `affinity - threshold`:
  edges are taken by decreasing |affinity - threshold|, those above the threshold attract (join
  two segments unless a repulsion already separates them) and the others repel. mwatershed's
  compiled `cluster` does the work; ties are broken by (u, v) so the answer does not depend on the
  order edges were stored in.

Both return the table `segment_lut` returns: every node of the graph, segments consecutive from 1
in the order of their smallest fragment. Memory grows with nodes and edges, not voxels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from voxblock.errors import VoxblockError
from voxblock.segment.solve import segment_lut

METHODS = ("mws", "threshold")
Method = Literal["mws", "threshold"]


def check_threshold(threshold: float) -> float:
    """Affinities are in [0, 1]: a threshold outside it merges everything or nothing."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise VoxblockError(f"threshold must be a number in [0, 1]; got {threshold!r}") from None
    if not 0.0 <= value <= 1.0 or value != value:
        raise VoxblockError(f"threshold must be in [0, 1] (affinities are in [0, 1]); got {threshold!r}")
    return value


def check_method(method: str) -> Method:
    if method not in METHODS:
        raise VoxblockError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    return method  # type: ignore[return-value]


def threshold_lut(
    nodes: np.ndarray, u: np.ndarray, v: np.ndarray, affinity: np.ndarray, threshold: float
) -> np.ndarray:
    """Connected components of the edges with affinity > threshold."""
    above = np.asarray(affinity) > threshold
    merges = np.stack([np.asarray(u, dtype=np.uint64)[above], np.asarray(v, dtype=np.uint64)[above]], axis=1)
    return segment_lut(np.asarray(nodes, dtype=np.uint64), merges)


def mws_lut(
    nodes: np.ndarray, u: np.ndarray, v: np.ndarray, affinity: np.ndarray, threshold: float
) -> np.ndarray:
    """Mutex watershed on the graph: attractive above the threshold, repulsive at or below it."""
    import mwatershed

    u = np.asarray(u, dtype=np.uint64)
    v = np.asarray(v, dtype=np.uint64)
    score = np.asarray(affinity, dtype=np.float64) - threshold
    order = np.lexsort((v, u, -np.abs(score)))  # by |score| descending, then (u, v)
    edges = list(zip((score[order] > 0).tolist(), u[order].tolist(), v[order].tolist()))
    clustered = mwatershed.cluster(edges) if edges else []
    merges = np.asarray(clustered, dtype=np.uint64).reshape(-1, 2)  # (fragment, its segment's root)
    merges = merges[merges[:, 0] != merges[:, 1]]
    return segment_lut(np.asarray(nodes, dtype=np.uint64), merges)


def solve(
    nodes: np.ndarray, u: np.ndarray, v: np.ndarray, affinity: np.ndarray, method: str, threshold: float
) -> np.ndarray:
    """The LUT of a graph given as arrays (node ids; edges u, v with their mean affinity)."""
    method = check_method(method)
    threshold = check_threshold(threshold)
    return (mws_lut if method == "mws" else threshold_lut)(nodes, u, v, affinity, threshold)


def graph_lut(db: str | Path, method: str, threshold: float) -> np.ndarray:
    """The LUT of the finalized region graph in `db` (an SQLite file or a postgresql:// URL)."""
    from voxblock.agglomerate.graphdb import read_graph_arrays

    method = check_method(method)
    threshold = check_threshold(threshold)
    nodes, u, v, affinity = read_graph_arrays(db)
    return solve(nodes, u, v, affinity, method, threshold)


def lut_name(method: str, threshold: float) -> str:
    """A file name for a LUT: method and threshold readable, exact (repr of the float)."""
    return f"{method}-{float(threshold)!r}"
