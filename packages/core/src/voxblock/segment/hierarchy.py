"""The global solve, hierarchically: no process holds more than a super-block's fragments.

Fragment IDs are block-position ranges (`segment.ids.BlockGrid`: block k owns k*V+1 ...
(k+1)*V), so the block, and every super-block, of a fragment follows from its ID alone. A
unit of level L is a cube of `fanout`^L blocks per axis (level 0: the blocks); level H, the
first with one unit, covers the grid. Every step below runs per unit, as a block of a
blockwise task whose blocks are the level's units (so levels run in parallel, resume, and
survive a killed worker), and reads and writes records of a `Store` (per-worker packs):

up L (L = 1 .. H)   the merge edges of the unit's children: at level 1 every block's recorded
    edges (selected by the merge rule); above, the children's crossing edges, whose far end
    is first resolved through the tree of the level-(L-1) unit that owns it (one such table
    in memory at a time). Connected components of the edges inside the unit, each rooted at
    its smallest node, give the unit's `tree` (node -> root, identities left out); the edges
    leaving the unit, their near end replaced by its root, are its `out` edges, passed up.
    Nodes are fragment IDs throughout (a root is a component's smallest fragment), so the
    owner of a node at any level is known from its ID. Edges are recorded on one side only;
    the owner of the far end need not know of them: its tree leaves a node it does not
    merge out (identity), which is what the lookup returns.
down L (L = H .. 1) the unit's `down` table (node -> final root, the smallest fragment of the
    node's whole segment): its tree composed with its parent's down table, plus the parent's
    entries for the unit's own roots. At level 1 also the unit's final roots (its fragments
    that no table maps elsewhere) and how many each block holds (`count`).
count (the driver) per block, how many fragments, edges and segments (final roots): one
    integer per block each, their prefix sums in one file (nothing per fragment).
labels (level-1 units) a segment's ID is 1 + the number of final roots smaller than its own
    (IDs consecutive from 1 in the order of each segment's smallest fragment: the whole-graph
    solve's numbering, `solve.segment_lut`): the prefix count of the root's block plus its rank
    there. Roots in other units are ranked from their unit's `roots` record, one at a time. Each
    block's table (its fragments -> segments) is one `lut` record: the relabel of a block reads
    only its own.
export (chunks)  the whole 2 x N table and N x 5 edges, if wanted, chunk by chunk from the
    blocks' records (their positions from the prefix sums).

Memory per unit grows with its fragments (level 1) or with the edges crossing its children's
borders (above), not with the volume; the driver keeps a few integers per block.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from voxblock.errors import VoxblockError
from voxblock.segment.ids import BlockGrid

U64 = np.uint64
LEVEL_SHIFT = 40  # a record's key: level << 40 | unit
CHUNK = 1 << 20  # IDs at a time where a step needs several temporaries per ID


def default_fanout(ndim: int) -> int:
    """Blocks per axis of a level-1 unit: about 512 blocks per unit (8 per axis in 3-D)."""
    return max(2, round(512 ** (1 / max(1, ndim))))


def key(level: int, unit: int) -> int:
    return (level << LEVEL_SHIFT) | unit


def encode(*arrays: np.ndarray) -> bytes:
    """Arrays as one flat uint64 record: [count, length..., data...]."""
    parts = [np.asarray(a, dtype=U64).ravel() for a in arrays]
    head = np.array([len(parts), *(p.size for p in parts)], dtype=U64)
    return np.concatenate([head, *parts]).tobytes()


def decode(payload: bytes) -> list[np.ndarray]:
    flat = np.frombuffer(payload, U64)
    count = int(flat[0])
    lengths = flat[1 : 1 + count].astype(np.int64)
    at, out = 1 + count, []
    for length in lengths:
        out.append(flat[at : at + length])
        at += length
    if at != flat.size:
        raise VoxblockError("a solve record is damaged: rerun segment_blockwise with fresh=True")
    return out


class Store(Protocol):
    def get(self, kind: str, key: int) -> bytes | None: ...

    def put(self, kind: str, key: int, payload: bytes) -> None: ...


class MemoryStore:
    """Records in a dict: for tests and the in-memory reference (`solve_in_memory`)."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, int], bytes] = {}

    def get(self, kind: str, key: int) -> bytes | None:
        return self.records.get((kind, key))

    def put(self, kind: str, key: int, payload: bytes) -> None:
        self.records[(kind, key)] = payload


class PackStore:
    """Records in per-worker packs of one directory (`voxblock.packfile`), one kind per table;
    the newest record of a key counts (a unit redone writes the same one again)."""

    def __init__(self, directory: str) -> None:
        from voxblock.packfile import PackIndex, PackWriter

        self.directory = directory
        self._writer = PackWriter
        self._index = PackIndex
        self._writers: dict[str, object] = {}
        self._indexes: dict[str, object] = {}

    def get(self, kind: str, key: int) -> bytes | None:
        index = self._indexes.get(kind)
        if index is None:
            index = self._indexes[kind] = self._index(self.directory, kind)
            index.refresh()  # type: ignore[attr-defined]
        payload = index.get(key)  # type: ignore[attr-defined]
        if payload is None:
            index.refresh()  # type: ignore[attr-defined]
            payload = index.get(key)  # type: ignore[attr-defined]
        return payload

    def put(self, kind: str, key: int, payload: bytes) -> None:
        writer = self._writers.get(kind)
        if writer is None:
            writer = self._writers[kind] = self._writer(self.directory, kind)
        writer.append(key, payload)  # type: ignore[attr-defined]


def lookup(keys: np.ndarray, values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """`ids` mapped through the sorted table keys -> values; an ID not in it maps to itself."""
    ids = np.asarray(ids, dtype=U64)
    if keys.size == 0 or ids.size == 0:
        return ids.copy()
    where = np.searchsorted(keys, ids).clip(0, keys.size - 1)
    found = keys[where] == ids
    return np.where(found, values[where], ids)


def sorted_unique(values: np.ndarray, copy: bool = True) -> np.ndarray:
    """np.unique by sorting in place (`values` itself, uint64, unless `copy`): numpy >= 2.3's
    np.unique hashes, 3-5x slower on the millions of uint64 IDs a unit holds, and needs more
    memory."""
    values = np.array(values, dtype=U64, copy=copy or None)
    values.sort()
    if values.size < 2:
        return values
    keep = np.empty(values.size, dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def components(
    a: np.ndarray,
    b: np.ndarray,
    extra: np.ndarray,
    nodes: np.ndarray | None = None,
    dedupe: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the edges (a, b) over their nodes and `extra` (or `nodes`, sorted
    and holding them all): the sorted nodes and each one's root, its component's smallest node.
    `dedupe`: the edges repeat (above level 1, children's roots joined by every edge between
    them: 10^7 edges, 10^5 nodes): each pair once before the graph is built."""
    if nodes is None:  # each end's distinct IDs first: one copy of an end at a time
        nodes = sorted_unique(np.concatenate([sorted_unique(x) for x in (a, b, extra)]), copy=False)
    if nodes.size == 0 or a.size == 0:
        return nodes, nodes.copy()
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows, cols = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
    if dedupe and nodes.size < 1 << 31:  # a pair as one int64: row * nodes + col
        rows *= nodes.size
        rows += cols
        del cols
        pairs = sorted_unique(rows.view(U64), copy=False).view(np.int64)
        del rows
        rows, cols = np.divmod(pairs, nodes.size)
    graph = coo_matrix((np.ones(rows.size, dtype=np.int8), (rows, cols)), shape=(nodes.size,) * 2)
    del rows, cols
    _, component = connected_components(graph, directed=False)
    # nodes are sorted: a component's first node is its smallest
    first = np.full(component.max() + 1, nodes.size, dtype=np.int64)
    np.minimum.at(first, component, np.arange(nodes.size))
    return nodes, nodes[first[component]]


def unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if a.size == 0:
        return a, b
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    keep = np.ones(a.size, dtype=bool)
    keep[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[keep], b[keep]


@dataclass(frozen=True)
class Hierarchy:
    """Units of blocks, level by level, and where a fragment ID belongs at each level."""

    grid: BlockGrid
    fanout: int

    def __post_init__(self) -> None:
        if self.fanout < 2:
            raise VoxblockError(f"the solve's fan-out must be at least 2; got {self.fanout}")

    def unit_counts(self, level: int) -> tuple[int, ...]:
        span = self.fanout**level
        return tuple(-(-c // span) for c in self.grid.counts)

    def num_units(self, level: int) -> int:
        return int(np.prod(self.unit_counts(level)))

    @property
    def levels(self) -> int:
        """The top level: the first whose one unit covers the grid (at least 1)."""
        level = 1
        while self.num_units(level) > 1:
            level += 1
        return level

    @property
    def num_blocks(self) -> int:
        return int(np.prod(self.grid.counts))

    def block_of(self, ids: np.ndarray) -> np.ndarray:
        return ((np.asarray(ids, dtype=U64) - U64(1)) // U64(self.grid.id_range)).astype(np.int64)

    def unit_of(self, level: int, ids: np.ndarray) -> np.ndarray:
        """The unit of level `level` that owns each fragment ID. In chunks: the positions along
        each axis are 7 int64 arrays as long as `ids` (4 GB for the 6*10^7 crossing edges a
        level-2 unit of 10^9 fragments takes in), the result one."""
        ids = np.asarray(ids, dtype=U64)
        flat = ids.ravel()
        units = np.empty(flat.size, np.int64)
        span, counts = self.fanout**level, self.unit_counts(level)
        for start in range(0, flat.size, CHUNK):
            blocks = self.block_of(flat[start : start + CHUNK])
            if level:
                position = np.unravel_index(blocks, self.grid.counts)
                blocks = np.ravel_multi_index(tuple(p // span for p in position), counts)
            units[start : start + CHUNK] = blocks
        return units.reshape(ids.shape)

    def children(self, level: int, unit: int) -> list[int]:
        """The units of level - 1 (blocks for level 1) inside a unit of `level`, ascending."""
        position = np.unravel_index(unit, self.unit_counts(level))
        below = self.unit_counts(level - 1)
        ranges = [
            range(int(p) * self.fanout, min((int(p) + 1) * self.fanout, c)) for p, c in zip(position, below)
        ]
        return [int(np.ravel_multi_index(child, below)) for child in itertools.product(*ranges)]

    def parent(self, level: int, unit: int) -> int:
        position = np.unravel_index(unit, self.unit_counts(level))
        return int(
            np.ravel_multi_index(tuple(p // self.fanout for p in position), self.unit_counts(level + 1))
        )

    def first_id(self, block: np.ndarray | int) -> np.ndarray:
        return np.asarray(block, dtype=U64) * U64(self.grid.id_range) + U64(1)


def _load(store: Store, kind: str, level: int, unit: int) -> list[np.ndarray]:
    payload = store.get(kind, key(level, unit))
    if payload is None:
        raise VoxblockError(
            f"the solve's {kind} record of unit {unit} at level {level} is missing: "
            "the level below is not complete (rerun segment_blockwise)"
        )
    return decode(payload)


def _by_owner(owners: np.ndarray) -> Iterable[tuple[int, np.ndarray]]:
    """(owner, positions) for each distinct owner, one at a time."""
    if owners.size == 0:
        return
    if owners.max() < 1 << 31:
        owners = owners.astype(np.int32)  # half the bytes of unit_of's, sorted below
    order = np.argsort(owners, kind="stable")
    sorted_owners = owners[order]
    starts = np.flatnonzero(np.r_[True, sorted_owners[1:] != sorted_owners[:-1]])
    ends = np.r_[starts[1:], sorted_owners.size]
    for start, end in zip(starts, ends):
        yield int(sorted_owners[start]), order[start:end]


def up(
    hierarchy: Hierarchy,
    level: int,
    unit: int,
    store: Store,
    block_record: Callable[[int], tuple[np.ndarray, int, np.ndarray]] | None = None,
) -> None:
    """Up one level for one unit (see the module's docstring). At level 1 `block_record(block)`
    gives a block's merge pairs (M x 2), how many edges it recorded, and its fragment IDs."""
    children = hierarchy.children(level, unit)
    if level == 1:
        assert block_record is not None
        pairs, fragments, num_fragments, num_edges = [], [], [], []
        for block in children:
            merges, edges, ids = block_record(block)
            pairs.append(np.asarray(merges, dtype=U64).reshape(-1, 2))
            fragments.append(np.sort(np.asarray(ids, dtype=U64)))
            num_fragments.append(len(ids))
            num_edges.append(edges)
        merges = np.concatenate(pairs) if pairs else np.zeros((0, 2), U64)
        a, b = merges[:, 0].copy(), merges[:, 1].copy()
        frags = np.concatenate(fragments) if fragments else np.zeros(0, U64)  # sorted: blocks ascend
    else:
        outs = [_load(store, "out", level - 1, child) for child in children]
        a = np.concatenate([o[0] for o in outs]) if outs else np.zeros(0, U64)
        b = np.concatenate([o[1] for o in outs]) if outs else np.zeros(0, U64)
        del outs
        # the far ends, through the trees of the units below that own them, one at a time
        for owner, where in _by_owner(hierarchy.unit_of(level - 1, b)):
            keys, values = _load(store, "tree", level - 1, owner)
            b[where] = lookup(keys, values, b[where])
    keep = (a > 0) & (b > 0) & (a != b)
    if not keep.all():
        a, b = a[keep], b[keep]
    del keep
    inside_a = hierarchy.unit_of(level, a) == unit
    inside_b = hierarchy.unit_of(level, b) == unit
    if not (inside_a | inside_b).all():
        raise VoxblockError(
            f"unit {unit} of level {level} holds an edge between fragments outside it: a block "
            "recorded an edge none of whose fragments is its own"
        )
    swap = ~inside_a
    a[swap], b[swap] = b[swap], a[swap]
    internal = inside_a & inside_b
    if level == 1:
        # the unit's nodes: its blocks' fragments and the ends of its merges that lie in it (a
        # block's label seen only in its context is a node too, as in segment_lut); an end in
        # another unit is a fragment its own block lists (a neighbour's, read where it wrote it)
        ends = np.concatenate([a, b[internal]])
        if frags.size:
            ends = ends[frags[np.searchsorted(frags, ends).clip(0, frags.size - 1)] != ends]
        if ends.size:
            frags = sorted_unique(np.concatenate([frags, ends]), copy=False)
        blocks = np.array(children, dtype=np.int64)
        per_block = np.searchsorted(frags, hierarchy.first_id(blocks + 1)) - np.searchsorted(
            frags, hierarchy.first_id(blocks)
        )
        store.put("frag", key(1, unit), encode(frags, per_block, num_edges))
    crossing = ~internal
    near, far = a[crossing], b[crossing]
    a, b = a[internal], b[internal]  # the edges inside; the whole arrays go
    del inside_a, inside_b, swap, internal, crossing
    nodes, roots = components(a, b, near, frags if level == 1 else None, dedupe=level > 1)
    del a, b
    moved = nodes != roots
    keys, values = nodes[moved], roots[moved]
    store.put("tree", key(level, unit), encode(keys, values))
    out_a, out_b = unique_pairs(lookup(keys, values, near), far)
    if level == hierarchy.levels and out_a.size:
        raise VoxblockError("the top unit of the solve has edges leaving it: the block grid is inconsistent")
    store.put("out", key(level, unit), encode(out_a, out_b))


def down(hierarchy: Hierarchy, level: int, unit: int, store: Store) -> None:
    """Down one level for one unit: node -> final root; at level 1 also its roots and counts."""
    keys, values = _load(store, "tree", level, unit)
    if level < hierarchy.levels:
        above_keys, above_values = _load(store, "down", level + 1, hierarchy.parent(level, unit))
        mine = hierarchy.unit_of(level, above_keys) == unit
        final_keys = np.concatenate([keys, above_keys[mine]])
        final_values = np.concatenate([lookup(above_keys, above_values, values), above_values[mine]])
        order = np.argsort(final_keys, kind="stable")
        final_keys, final_values = final_keys[order], final_values[order]
    else:
        final_keys, final_values = keys, values
    store.put("down", key(level, unit), encode(final_keys, final_values))
    if level == 1:
        fragments, num_fragments, num_edges = _load(store, "frag", 1, unit)
        roots = fragments[lookup(final_keys, final_values, fragments) == fragments]
        store.put("roots", key(1, unit), encode(roots))
        blocks = np.array(hierarchy.children(1, unit), dtype=np.int64)
        per_block = np.searchsorted(roots, hierarchy.first_id(blocks + 1)) - np.searchsorted(
            roots, hierarchy.first_id(blocks)
        )
        store.put("count", key(1, unit), encode(blocks, num_fragments, num_edges, per_block))


def offsets(hierarchy: Hierarchy, store: Store) -> np.ndarray:
    """3 x (blocks + 1): prefix sums over blocks of fragments, edges and segments (final roots)."""
    counts = np.zeros((3, hierarchy.num_blocks + 1), dtype=U64)
    for unit in range(hierarchy.num_units(1)):
        blocks, fragments, edges, roots = _load(store, "count", 1, unit)
        where = blocks.astype(np.int64) + 1
        counts[0, where], counts[1, where], counts[2, where] = fragments, edges, roots
    return np.cumsum(counts, axis=1, dtype=U64, out=counts)  # in place: 24 bytes a block, not 48


def labels(hierarchy: Hierarchy, unit: int, store: Store, prefix: np.ndarray) -> None:
    """Segment IDs for every fragment of a level-1 unit; one `lut` record per block."""
    fragments, num_fragments, _ = _load(store, "frag", 1, unit)
    final_keys, final_values = _load(store, "down", 1, unit)
    (roots,) = _load(store, "roots", 1, unit)
    finals = lookup(final_keys, final_values, fragments)
    segments = np.zeros(fragments.size, dtype=U64)
    for owner, where in _by_owner(hierarchy.unit_of(1, finals)):
        ranked = roots if owner == unit else _load(store, "roots", 1, owner)[0]
        wanted = finals[where]
        blocks = hierarchy.block_of(wanted)
        rank = np.searchsorted(ranked, wanted) - np.searchsorted(ranked, hierarchy.first_id(blocks))
        segments[where] = prefix[2, blocks] + rank.astype(U64) + U64(1)
    bounds = np.r_[0, np.cumsum(num_fragments.astype(np.int64))]
    for i, block in enumerate(hierarchy.children(1, unit)):
        start, end = bounds[i], bounds[i + 1]
        store.put("lut", block, encode(fragments[start:end], segments[start:end]))


def block_lut(store: Store, block: int) -> tuple[np.ndarray, np.ndarray]:
    """One block's table: its fragments (sorted) and their segments."""
    payload = store.get("lut", block)
    if payload is None:
        raise VoxblockError(
            f"block {block} has no segment table: the solve is not complete (rerun segment_blockwise)"
        )
    fragments, segments = decode(payload)
    return fragments, segments


def solve_in_memory(
    hierarchy: Hierarchy,
    blocks: dict[int, tuple[np.ndarray, np.ndarray]],
    store: Store | None = None,
) -> tuple[Store, np.ndarray]:
    """Every step in this process over blocks given as {block: (merge pairs, fragments)}: the
    store with every record, and the prefix sums. For tests and the simulated solve."""
    store = MemoryStore() if store is None else store
    empty = (np.zeros((0, 2), U64), np.zeros(0, U64))

    def record(block: int) -> tuple[np.ndarray, int, np.ndarray]:
        merges, fragments = blocks.get(block, empty)
        return merges, len(merges), fragments

    top = hierarchy.levels
    for level in range(1, top + 1):
        for unit in range(hierarchy.num_units(level)):
            up(hierarchy, level, unit, store, record)
    for level in range(top, 0, -1):
        for unit in range(hierarchy.num_units(level)):
            down(hierarchy, level, unit, store)
    prefix = offsets(hierarchy, store)
    for unit in range(hierarchy.num_units(1)):
        labels(hierarchy, unit, store, prefix)
    return store, prefix
