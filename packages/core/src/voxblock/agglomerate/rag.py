"""The region graph (RAG) of fragments and affinities, block by block, exactly.

Affinities as mwatershed and volara read them: channel c at voxel p is the
affinity between p and p + offsets[c] (offsets in voxels, one per channel).
The graph has one node per fragment id > 0 (`size`: its voxels; `position`:
its centre of mass, `offset + voxel_size * mean voxel index`, the world
coordinate of a voxel being that of its corner, as funlib's ROIs and lsd's
and volara's fragment centres have it) and one edge per unordered pair of
distinct touching fragments u < v (`count`: the voxel pairs (p, p + o_c) with
u at one end and v at the other, in either order; `affinity`: the mean of
affs[c][p] over them). Background (0) is in no node and no edge.

Exactly once across blocks: a block owns the voxels of its write ROI and the
voxel pairs whose FIRST voxel p lies there. The second voxel p + o may lie in
the context, so the read ROI must reach, on each axis, max(0, -o) before and
max(0, o) after the write ROI for every offset o (`rag_context(offsets)`, the
symmetric max |o| per axis, is enough); `rag_partials` refuses less. Past the
volume, fragments must read 0 (as an "overhang" block reads): pairs leaving
the volume then take part in no edge, and the affinities there are never read.

The partials of one block, and of any sum of blocks (`sum_partials`), are a
mapping of str to numpy arrays, n nodes and m edges, ndim the volume's axes:

    "ids"          uint64 (n,)        fragment ids > 0, ascending, unique
    "sizes"        int64 (n,)         voxels of each fragment in the write ROI(s)
    "index_sums"   int64 (n, ndim)    sums of those voxels' GLOBAL voxel indices, per axis
    "u", "v"       uint64 (m,)        edges, u < v, ascending by (u, v), unique
    "affinity_sum" float64 (m,)       sum of affs[c][p] over the owned pairs
    "count"        int64 (m,)         the owned pairs

A dict of exactly these keys: `np.savez(path, **partials)` stores it and
`np.load(path)` reads back something `merge_partials` takes. Sizes, index
sums and counts are integers, so they merge exactly in any order; only the
affinity sums round (float64).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from voxblock.errors import VoxblockError

NODE_FIELDS = ("ids", "sizes", "index_sums")
EDGE_FIELDS = ("u", "v", "affinity_sum", "count")
PARTIAL_FIELDS = NODE_FIELDS + EDGE_FIELDS

Partials = dict[str, np.ndarray]


def rag_context(offsets: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The context (voxels per axis, both sides) that makes every block's pairs its own: max |o|."""
    return tuple(int(c) for c in np.abs(np.asarray(offsets, dtype=np.int64)).max(axis=0))


def empty_partials(ndim: int) -> Partials:
    return {
        "ids": np.zeros(0, np.uint64),
        "sizes": np.zeros(0, np.int64),
        "index_sums": np.zeros((0, ndim), np.int64),
        "u": np.zeros(0, np.uint64),
        "v": np.zeros(0, np.uint64),
        "affinity_sum": np.zeros(0, np.float64),
        "count": np.zeros(0, np.int64),
    }


def _check_block(
    fragments: np.ndarray,
    affinities: np.ndarray,
    offsets: np.ndarray,
    write: Sequence[slice],
    origin: Sequence[int],
) -> tuple[slice, ...]:
    """The write slices, with start and stop; refuses what would count a pair wrongly."""
    ndim = fragments.ndim
    if fragments.dtype.kind != "u":
        raise VoxblockError(f"rag: fragments must be unsigned integers, got {fragments.dtype}")
    if affinities.dtype.kind not in "fiu":
        raise VoxblockError(f"rag: affinities must be numeric, got {affinities.dtype}")
    if offsets.ndim != 2 or offsets.shape[1] != ndim:
        raise VoxblockError(f"rag: offsets must be {ndim}-D voxel offsets, got {offsets.tolist()}")
    if affinities.shape != (len(offsets), *fragments.shape):
        raise VoxblockError(
            f"rag: affinities of shape {affinities.shape} do not match {len(offsets)} offsets "
            f"over fragments of shape {fragments.shape}"
        )
    if len(write) != ndim or len(origin) != ndim:
        raise VoxblockError(f"rag: write slices {write} or origin {origin} are not {ndim}-D")
    slices = tuple(slice(*s.indices(n)) for s, n in zip(write, fragments.shape))
    if any(s.step != 1 or s.start > s.stop for s in slices):
        raise VoxblockError(f"rag: write slices {write} are not a box inside the read ROI")
    before = np.maximum(0, -offsets.min(axis=0))
    after = np.maximum(0, offsets.max(axis=0))
    for axis, (s, n) in enumerate(zip(slices, fragments.shape)):
        if s.start < before[axis] or n - s.stop < after[axis]:
            raise VoxblockError(
                f"rag: on axis {axis} the read ROI reaches {s.start} voxels before and {n - s.stop} "
                f"after the write ROI; offsets {offsets.tolist()} need {before[axis]} and {after[axis]}"
            )
    return slices


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels renumbered 1..k (0 stays 0) and the labels back (ids[compact] == labels).

    fastremap's hash table, not a sort: np.unique over millions of uint64 is the slow part otherwise.
    """
    import fastremap

    compact, remap = fastremap.renumber(labels, preserve_zero=True, in_place=False)
    ids = np.zeros(max(remap.values(), default=0) + 1, np.uint64)
    ids[np.fromiter(remap.values(), np.int64, len(remap))] = np.fromiter(remap.keys(), np.uint64, len(remap))
    return compact, ids


def _runs(sorted_keys: np.ndarray) -> np.ndarray:
    """Where each run of equal sorted keys starts."""
    return (
        np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]) if sorted_keys.size else sorted_keys
    )


def rag_partials(
    fragments: np.ndarray,
    affinities: np.ndarray,
    offsets: Sequence[Sequence[int]],
    write: Sequence[slice],
    origin: Sequence[int],
) -> Partials:
    """One block's nodes (its write ROI's voxels) and edges (pairs whose first voxel is there).

    `fragments` (ndim) and `affinities` (channels first, one per offset) cover
    the block's read ROI; `write` are the write ROI's slices of them; `origin`
    is the global voxel index of the write ROI's first voxel.
    """
    if len(offsets) == 0:
        raise VoxblockError("rag: no offsets: affinities pair each voxel with another by an offset")
    offsets = np.asarray(offsets, dtype=np.int64).reshape(len(offsets), -1)
    write = _check_block(fragments, affinities, offsets, write, origin)
    if fragments.size == 0:
        return empty_partials(fragments.ndim)
    compact, ids = _compact(fragments)
    labels = len(ids)

    # nodes: one bincount per axis of the LOCAL index (small, exact in float64), then the origin in int64
    own = compact[write].ravel()
    sizes = np.bincount(own, minlength=labels).astype(np.int64)
    shape = compact[write].shape
    index_sums = np.empty((labels, len(shape)), np.int64)
    for axis, n in enumerate(shape):
        index = np.broadcast_to(
            np.arange(n).reshape([-1 if a == axis else 1 for a in range(len(shape))]), shape
        )
        local = np.bincount(own, weights=index.ravel(), minlength=labels)
        index_sums[:, axis] = np.rint(local).astype(np.int64) + int(origin[axis]) * sizes
    present = np.flatnonzero(sizes[1:]) + 1
    node_order = np.argsort(ids[present])
    present = present[node_order]

    # edges: per offset the owned pairs of distinct fragments, keyed by their unordered compact pair
    keys, values = [], []
    for channel, offset in enumerate(offsets):
        second = tuple(slice(s.start + o, s.stop + o) for s, o in zip(write, offset))
        a, b = compact[write], compact[second]
        touching = (a != b) & (a > 0) & (b > 0)
        a, b = a[touching].astype(np.int64), b[touching].astype(np.int64)
        keys.append(np.minimum(a, b) * labels + np.maximum(a, b))
        values.append(affinities[channel][write][touching].astype(np.float64))
    # the pairs numbered 1..m by a hash table, then one bincount each: an argsort of the pairs is 5x slower
    pair, pair_keys = _compact(np.concatenate(keys).astype(np.uint64))
    affinity_sum = np.bincount(pair, weights=np.concatenate(values), minlength=len(pair_keys))[1:]
    count = np.bincount(pair, minlength=len(pair_keys))[1:].astype(np.int64)
    lo, hi = np.divmod(pair_keys[1:].astype(np.int64), labels)
    u, v = ids[lo], ids[hi]
    u, v = np.minimum(u, v), np.maximum(u, v)  # compact order is not id order
    edge_order = np.lexsort((v, u))
    return {
        "ids": ids[present],
        "sizes": sizes[present],
        "index_sums": index_sums[present],
        "u": u[edge_order],
        "v": v[edge_order],
        "affinity_sum": affinity_sum[edge_order].astype(np.float64),
        "count": count[edge_order],
    }


def sum_partials(partials: Iterable[Mapping[str, np.ndarray]], ndim: int | None = None) -> Partials:
    """Partials of many blocks as those of their union: sums per id and per (u, v).

    Associative, so blocks may be summed in any grouping (per worker, then
    all); `ndim` is needed only when there are no partials.
    """
    parts = [{field: np.asarray(p[field]) for field in PARTIAL_FIELDS} for p in partials]
    if not parts:
        return empty_partials(ndim or 0)
    ndim = parts[0]["index_sums"].shape[1]
    joined = {field: np.concatenate([p[field] for p in parts]) for field in PARTIAL_FIELDS}

    order = np.argsort(joined["ids"], kind="stable")
    ids = joined["ids"][order]
    starts = _runs(ids)
    nodes = {
        "ids": ids[starts].astype(np.uint64),
        "sizes": np.add.reduceat(joined["sizes"][order], starts).astype(np.int64)
        if ids.size
        else np.zeros(0, np.int64),
        "index_sums": np.add.reduceat(joined["index_sums"][order], starts, axis=0).astype(np.int64)
        if ids.size
        else np.zeros((0, ndim), np.int64),
    }

    order = np.lexsort((joined["v"], joined["u"]))
    u, v = joined["u"][order], joined["v"][order]
    starts = np.flatnonzero(np.r_[True, (u[1:] != u[:-1]) | (v[1:] != v[:-1])]) if u.size else u
    edges = {
        "u": u[starts].astype(np.uint64),
        "v": v[starts].astype(np.uint64),
        "affinity_sum": np.add.reduceat(joined["affinity_sum"][order].astype(np.float64), starts)
        if u.size
        else np.zeros(0, np.float64),
        "count": np.add.reduceat(joined["count"][order], starts).astype(np.int64)
        if u.size
        else np.zeros(0, np.int64),
    }
    return nodes | edges


def merge_partials(
    partials: Iterable[Mapping[str, np.ndarray]],
    voxel_size: Sequence[float] | None = None,
    offset: Sequence[float] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The region graph from all blocks' partials: (nodes, edges).

    nodes: "id" uint64, "size" int64, "position" float64 (n, ndim), world
    units: offset + voxel_size * mean global voxel index (default: voxel
    units, offset 0). edges: "u", "v" uint64 (u < v), "affinity" float64
    (the mean), "count" int64. Both sorted by id, by (u, v).
    """
    ndim = None if voxel_size is None else len(voxel_size)
    total = sum_partials(partials, ndim)
    ndim = total["index_sums"].shape[1]
    scale = np.ones(ndim) if voxel_size is None else np.asarray(voxel_size, np.float64)
    shift = np.zeros(ndim) if offset is None else np.asarray(offset, np.float64)
    mean_index = total["index_sums"] / np.maximum(total["sizes"], 1)[:, None]
    nodes = {"id": total["ids"], "size": total["sizes"], "position": shift + scale * mean_index}
    edges = {
        "u": total["u"],
        "v": total["v"],
        "affinity": total["affinity_sum"] / np.maximum(total["count"], 1),
        "count": total["count"],
    }
    return nodes, edges
