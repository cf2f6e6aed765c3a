"""The hierarchical solve (voxblock.segment.hierarchy) against the whole-graph one (segment_lut).

Random block grids (1-3 axes), fan-outs and edge sets: the per-block tables, concatenated,
must be segment_lut's table exactly: the same partition and the same IDs (consecutive from 1
in the order of each segment's smallest fragment), whatever the number of levels.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxblock.errors import VoxblockError
from voxblock.segment import hierarchy
from voxblock.segment.ids import BlockGrid
from voxblock.segment.solve import segment_lut


@st.composite
def block_graphs(draw):
    ndim = draw(st.integers(1, 3))
    counts = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    id_range = draw(st.integers(1, 6))
    fanout = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    density = draw(st.sampled_from([0.0, 0.3, 1.0, 3.0]))
    local = draw(st.booleans())
    rng = np.random.default_rng(seed)
    grid = BlockGrid((0,) * ndim, (1,) * ndim, counts, id_range)
    num_blocks = int(np.prod(counts))
    listed = {}
    for block in range(num_blocks):
        size = int(rng.integers(0, id_range + 1))
        listed[block] = np.sort(rng.choice(id_range, size, replace=False)).astype(np.uint64) + np.uint64(
            block * id_range + 1
        )
    everything = np.concatenate(list(listed.values()))
    blocks = {}
    for block in range(num_blocks):
        count = int(rng.poisson(density * max(1, listed[block].size)))
        if everything.size == 0:
            count = 0
        # one end is the block's own label (listed, or seen only in its context: not listed),
        # the other a listed fragment: anywhere, or (pass 1's locality) in a neighbouring block
        own = rng.integers(block * id_range + 1, (block + 1) * id_range + 1, count).astype(np.uint64)
        if local and count:
            position = np.array(np.unravel_index(block, counts))
            steps = rng.integers(-1, 2, (count, ndim))
            near = np.clip(position + steps, 0, np.array(counts) - 1)
            others = np.ravel_multi_index(tuple(near.T), counts)
            far = np.array(
                [rng.choice(listed[o]) if listed[o].size else rng.choice(everything) for o in others],
                dtype=np.uint64,
            )
        else:
            far = rng.choice(everything, count) if count else np.zeros(0, np.uint64)
        pairs = np.stack([own, far.astype(np.uint64)], axis=1)
        flip = rng.random(count) < 0.5
        pairs[flip] = pairs[flip][:, ::-1]
        blocks[block] = (pairs, listed[block])
    return grid, fanout, blocks


@settings(max_examples=300, deadline=None)
@given(block_graphs())
def test_hierarchical_solve_is_segment_lut(case):
    grid, fanout, blocks = case
    h = hierarchy.Hierarchy(grid, fanout)
    store, prefix = hierarchy.solve_in_memory(h, blocks)
    tables = [np.stack(hierarchy.block_lut(store, block)) for block in range(h.num_blocks)]
    got = np.concatenate(tables, axis=1)
    fragments = np.concatenate([ids for _, ids in blocks.values()])
    merges = np.concatenate([pairs for pairs, _ in blocks.values()])
    expected = segment_lut(fragments, merges)
    np.testing.assert_array_equal(got, expected)
    assert int(prefix[0, -1]) == expected.shape[1]
    assert int(prefix[2, -1]) == (int(expected[1].max()) if expected.size else 0)


def test_levels_and_units_follow_the_fanout():
    h = hierarchy.Hierarchy(BlockGrid((0, 0, 0), (1, 1, 1), (9, 4, 1), 10), 2)
    assert [h.unit_counts(level) for level in range(5)] == [
        (9, 4, 1),
        (5, 2, 1),
        (3, 1, 1),
        (2, 1, 1),
        (1, 1, 1),
    ]
    assert h.levels == 4
    assert sorted(h.children(1, 0)) == h.children(1, 0) == [0, 1, 4, 5]
    ids = np.array([1, 10, 11, 51], np.uint64)  # blocks 0, 0, 1, 5
    assert h.unit_of(0, ids).tolist() == [0, 0, 1, 5]
    assert h.unit_of(1, ids).tolist() == [0, 0, 0, 0]
    assert h.parent(1, 3) == 0 and h.parent(1, 9) == 2  # (1, 1, 0) -> (0, 0, 0); (4, 1, 0) -> (2, 0, 0)


def test_an_edge_outside_its_unit_is_refused():
    grid = BlockGrid((0,), (1,), (4,), 2)
    h = hierarchy.Hierarchy(grid, 2)
    store = hierarchy.MemoryStore()

    def record(block):  # block 0 records an edge between blocks 2 and 3
        pairs = np.array([[5, 7]], np.uint64) if block == 0 else np.zeros((0, 2), np.uint64)
        return pairs, len(pairs), np.zeros(0, np.uint64)

    with pytest.raises(VoxblockError, match="outside it"):
        hierarchy.up(h, 1, 0, store, record)


def test_a_missing_record_is_an_error_not_a_guess():
    h = hierarchy.Hierarchy(BlockGrid((0,), (1,), (4,), 2), 2)
    with pytest.raises(VoxblockError, match="is missing"):
        hierarchy.up(h, 2, 0, hierarchy.MemoryStore())
    with pytest.raises(VoxblockError, match="no segment table"):
        hierarchy.block_lut(hierarchy.MemoryStore(), 3)


def test_a_sampled_simulation_solves_its_sampled_units_as_the_whole_one(tmp_path):
    """benchmarks/solve_scale.py --sample (the 10^9-fragment run): the other level-1 units'
    records made on the fly, only the sampled units' written, give the sampled units the same
    final roots as the run with every block's record in packs."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import solve_scale

    from voxblock.packfile import newest_keys
    from voxblock.segment.storage import EDGES

    grid = {"origin": [0, 0, 0], "stride": [1, 1, 1], "counts": [6, 6, 6], "id_range": 20}
    h = hierarchy.Hierarchy(BlockGrid.from_dict(grid), 2)
    sample, keep = solve_scale.sample_units(h, 2)
    assert len(sample) == 2 and set(sample) <= set(keep) and 0 in keep
    plan = [("up", level) for level in range(1, h.levels + 1)]
    plan += [("down", level) for level in range(h.levels, 0, -1)]
    whole, sampled = tmp_path / "whole", tmp_path / "sampled"
    solve_scale.generate(grid, whole / "edges", 3.0)
    for step, level in plan:
        solve_scale.run_step(step, level, whole, grid, 2, {"edges_per_fragment": 3.0})
        solve_scale.run_step(
            step, level, sampled, grid, 2, {"edges_per_fragment": 3.0, "sample": sample, "keep": keep}
        )
    assert newest_keys(sampled / "edges", EDGES).tolist() == sorted(
        b for u in sample for b in h.children(1, u)
    )
    full, part = (hierarchy.PackStore(str(d / "tables")) for d in (whole, sampled))
    for unit in sample:
        for kind in ("down", "roots"):
            assert part.get(kind, hierarchy.key(1, unit)) == full.get(kind, hierarchy.key(1, unit))
    assert part.get("down", hierarchy.key(1, next(u for u in range(h.num_units(1)) if u not in keep))) is None
