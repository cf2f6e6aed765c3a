"""The region graph kernel: blockwise partials, merged, equal the whole volume's graph, exactly.

The reference below is written as plainly as possible: every voxel pair of every
offset at once over the whole volume, no blocks, no ownership rule.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voxblock.agglomerate.rag import PARTIAL_FIELDS, merge_partials, rag_context, rag_partials, sum_partials
from voxblock.errors import VoxblockError


def reference_rag(fragments: np.ndarray, affinities: np.ndarray, offsets: list[tuple[int, ...]]):
    """Nodes {id: (size, mean index)} and edges {(u, v): (mean affinity, count)} of the whole volume."""
    nodes = {}
    for fragment in np.unique(fragments):
        if fragment != 0:
            where = np.argwhere(fragments == fragment)
            nodes[int(fragment)] = (len(where), where.mean(axis=0))
    u_all, v_all, aff_all = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)], [np.zeros(0)]
    for channel, offset in enumerate(offsets):
        # p ranges over the voxels whose partner p + offset is inside the volume
        first = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(offset, fragments.shape))
        if any(s.stop <= s.start for s in first):
            continue  # the offset reaches across the whole volume: no pair
        second = tuple(slice(s.start + o, s.stop + o) for s, o in zip(first, offset))
        a, b = fragments[first].ravel(), fragments[second].ravel()
        aff = affinities[channel][first].ravel()
        keep = (a != 0) & (b != 0) & (a != b)
        u_all.append(np.minimum(a, b)[keep])
        v_all.append(np.maximum(a, b)[keep])
        aff_all.append(aff[keep].astype(np.float64))
    u, v, aff = np.concatenate(u_all), np.concatenate(v_all), np.concatenate(aff_all)
    edges = {}
    for pair in {(int(x), int(y)) for x, y in zip(u, v)}:
        mine = (u == pair[0]) & (v == pair[1])
        edges[pair] = (aff[mine].mean(), int(mine.sum()))
    return nodes, edges


def blockwise_partials(fragments, affinities, offsets, block_shape, before, after):
    """rag_partials over a grid of blocks (border blocks shrunk), the volume padded with 0 fragments and
    NaN affinities: a pair leaving the volume is no edge, and an affinity read past it would show."""
    pad = list(zip(before, after))
    padded = np.pad(fragments, pad)
    padded_affs = np.pad(affinities.astype(np.float64), [(0, 0), *pad], constant_values=np.nan)
    partials = []
    grid = [range(0, n, b) for n, b in zip(fragments.shape, block_shape)]
    for begin in itertools.product(*grid):
        end = [min(x + b, n) for x, b, n in zip(begin, block_shape, fragments.shape)]
        # read ROI in padded coordinates: [begin, end + before + after)
        read = tuple(slice(x, e + bf + af) for x, e, bf, af in zip(begin, end, before, after))
        write = tuple(slice(bf, bf + e - x) for x, e, bf in zip(begin, end, before))
        partials.append(rag_partials(padded[read], padded_affs[(slice(None), *read)], offsets, write, begin))
    return partials


@st.composite
def volumes(draw):
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.lists(st.integers(1, 9 if ndim == 3 else 14), min_size=ndim, max_size=ndim)))
    offsets = draw(
        st.lists(
            st.tuples(*[st.integers(-3, 3)] * ndim), min_size=1, max_size=5, unique=True
        )  # negative, long-range (0, 0, 3) and even (0, 0, 0), which pairs a voxel with itself: no edge
    )
    block_shape = tuple(draw(st.integers(1, n)) for n in shape)
    need_before = [max(0, *(-o[a] for o in offsets)) for a in range(ndim)]
    need_after = [max(0, *(o[a] for o in offsets)) for a in range(ndim)]
    before = [n + draw(st.integers(0, 2)) for n in need_before]
    after = [n + draw(st.integers(0, 2)) for n in need_after]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    labels = draw(st.integers(1, 6))
    big = draw(st.booleans())  # ids past 2**32: no packing of two ids in one key
    table = np.r_[0, rng.choice(2**40 if big else 1000, size=labels, replace=False) + 1].astype(np.uint64)
    fragments = table[rng.integers(0, labels + 1, size=shape)]
    fragments = fragments.astype(draw(st.sampled_from([np.uint64] if big else [np.uint32, np.uint64])))
    affinities = rng.random((len(offsets), *shape), dtype=np.float32)
    return fragments, affinities, offsets, block_shape, before, after


def assert_graph_equal(nodes, edges, ref_nodes, ref_edges, voxel_size, offset):
    assert nodes["id"].tolist() == sorted(ref_nodes)
    assert nodes["size"].tolist() == [ref_nodes[i][0] for i in sorted(ref_nodes)]
    expected = [np.asarray(offset) + np.asarray(voxel_size) * ref_nodes[i][1] for i in sorted(ref_nodes)]
    np.testing.assert_allclose(nodes["position"], np.reshape(expected, nodes["position"].shape), rtol=1e-12)
    pairs = sorted(ref_edges)
    assert list(zip(edges["u"].tolist(), edges["v"].tolist())) == pairs
    assert edges["count"].tolist() == [ref_edges[p][1] for p in pairs]
    np.testing.assert_allclose(edges["affinity"], [ref_edges[p][0] for p in pairs], rtol=1e-12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(volume=volumes(), data=st.data())
def test_merged_block_partials_are_the_whole_volume_graph(volume, data):
    fragments, affinities, offsets, block_shape, before, after = volume
    partials = blockwise_partials(fragments, affinities, offsets, block_shape, before, after)
    ref_nodes, ref_edges = reference_rag(fragments, affinities, offsets)
    voxel_size = data.draw(st.lists(st.integers(1, 8), min_size=fragments.ndim, max_size=fragments.ndim))
    offset = data.draw(st.lists(st.integers(-100, 100), min_size=fragments.ndim, max_size=fragments.ndim))

    nodes, edges = merge_partials(partials, voxel_size, offset)
    assert_graph_equal(nodes, edges, ref_nodes, ref_edges, voxel_size, offset)
    # every pair counted exactly once, every voxel once
    assert int(edges["count"].sum()) == sum(count for _, count in ref_edges.values())
    assert int(nodes["size"].sum()) == int((fragments != 0).sum())

    # any order, any grouping (per worker, then all) gives the same integers
    order = data.draw(st.permutations(range(len(partials))))
    cut = data.draw(st.integers(0, len(partials)))
    shuffled = [partials[i] for i in order]
    regrouped = [sum_partials(shuffled[:cut], fragments.ndim), sum_partials(shuffled[cut:], fragments.ndim)]
    nodes_again, edges_again = merge_partials(regrouped, voxel_size, offset)
    for field in ("id", "size"):
        np.testing.assert_array_equal(nodes_again[field], nodes[field])
    for field in ("u", "v", "count"):
        np.testing.assert_array_equal(edges_again[field], edges[field])
    np.testing.assert_allclose(edges_again["affinity"], edges["affinity"], rtol=1e-12)


def test_the_partials_format_and_dtypes():
    fragments = np.array([[1, 1, 2], [0, 3, 2]], np.uint32)
    affinities = np.arange(2 * 6, dtype=np.float32).reshape(2, 2, 3) / 10
    partials = rag_partials(
        np.pad(fragments, 1),
        np.pad(affinities, [(0, 0), (1, 1), (1, 1)]),
        [(0, 1), (1, 0)],
        (slice(1, 3), slice(1, 4)),
        (5, 7),
    )
    assert set(partials) == set(PARTIAL_FIELDS)
    dtypes = {"ids": "uint64", "sizes": "int64", "index_sums": "int64", "u": "uint64", "v": "uint64"}
    assert {k: str(partials[k].dtype) for k in dtypes} == dtypes
    assert partials["affinity_sum"].dtype == np.float64 and partials["count"].dtype == np.int64
    assert partials["ids"].tolist() == [1, 2, 3]
    assert partials["sizes"].tolist() == [2, 2, 1]
    # global indices: the write ROI's first voxel is (5, 7)
    assert partials["index_sums"].tolist() == [[10, 7 + 8], [5 + 6, 9 + 9], [6, 8]]


def test_an_affinity_belongs_to_its_first_voxel_whichever_way_the_offset_points(tmp_path):
    fragments = np.array([[1, 2]], np.uint64)
    forward = np.array([[[0.25, np.nan]]])  # channel (0, 1) at (0, 0): the pair (1, 2)
    backward = np.array([[[np.nan, 0.75]]])  # channel (0, -1) at (0, 1): the pair (2, 1)
    padded = np.pad(fragments, 1)
    for affs, offsets, expected in ((forward, [(0, 1)], 0.25), (backward, [(0, -1)], 0.75)):
        partials = rag_partials(
            padded, np.pad(affs, [(0, 0), (1, 1), (1, 1)]), offsets, (slice(1, 2), slice(1, 3)), (0, 0)
        )
        np.savez(tmp_path / "block.npz", **partials)  # the format stores as it is
        _, edges = merge_partials([np.load(tmp_path / "block.npz")])
        assert (edges["u"].tolist(), edges["v"].tolist(), edges["count"].tolist()) == ([1], [2], [1])
        assert edges["affinity"].tolist() == [expected]


def test_a_context_smaller_than_the_offsets_reach_is_refused():
    fragments = np.ones((6, 6), np.uint64)
    offsets = [(0, 3), (-2, 0)]
    assert rag_context(offsets) == (2, 3)
    affinities = np.zeros((2, 6, 6), np.float32)
    rag_partials(fragments, affinities, offsets, (slice(2, 6), slice(0, 3)), (0, 0))  # exactly enough
    with pytest.raises(VoxblockError, match="axis 1"):  # (0, 3) from x = 3 reaches past the read ROI
        rag_partials(fragments, affinities, offsets, (slice(2, 6), slice(0, 4)), (0, 0))
    with pytest.raises(VoxblockError, match="axis 0"):  # (-2, 0) from y = 1 reaches before it
        rag_partials(fragments, affinities, offsets, (slice(1, 6), slice(0, 3)), (0, 0))
    with pytest.raises(VoxblockError, match="do not match"):
        rag_partials(fragments, affinities[:1], offsets, (slice(2, 6), slice(0, 3)), (0, 0))


def test_no_partials_merge_to_an_empty_graph():
    nodes, edges = merge_partials([], voxel_size=(4, 4, 4))
    assert nodes["position"].shape == (0, 3) and edges["u"].size == 0
