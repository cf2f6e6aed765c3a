"""Batching (`batch=k`): the scheduler hands out one block per k^d blocks, and each is run as
the blocks the unbatched run would have handed out inside it, so the output is the same."""

from __future__ import annotations

import daisy.v2 as daisy
from funlib.geometry import Roi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voxblock import Blocking
from voxblock.geometry import Batching, check_batch
from voxblock_testing.strategies import blockings


def scheduler_blocks(blocking: Blocking) -> list[tuple[int, tuple, tuple]]:
    """(id, read ROI, write ROI) of every block daisy's scheduler hands out for `blocking`."""
    task = daisy.Task(
        "t",
        blocking.total_roi,
        blocking.read_roi,
        blocking.write_roi,
        process_function=lambda block: None,
        fit=blocking.fit,
        read_write_conflict=False,
    )
    scheduler = daisy.Scheduler(task)
    handed = []
    while (block := scheduler.acquire_block("t")) is not None:
        handed.append((int(block.block_id[1]), _key(block.read_roi), _key(block.write_roi)))
        block.status = daisy.BlockStatus.SUCCESS
        scheduler.release_block(block)
    return handed


def _key(roi) -> tuple:
    return tuple(int(v) for v in roi.offset), tuple(int(v) for v in roi.shape)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=blockings(max_blocks=7), k=st.integers(1, 3), data=st.data())
def test_batches_expand_to_exactly_the_unbatched_blocks(case, k, data):
    blocking = case.blocking
    batch = check_batch(
        data.draw(st.one_of(st.just(k), st.tuples(*[st.integers(1, 3)] * blocking.total_roi.dims))),
        blocking.total_roi.dims,
    )
    batching = Batching(blocking, batch)
    scheduled = batching.scheduled
    batches = scheduler_blocks(scheduled)
    assert len(batches) == batching.num_batches
    expanded = []
    for _, _, (offset, shape) in batches:
        inside = batching.blocks_in(Roi(offset, shape))
        assert inside, f"batch {offset}/{shape} holds no block"
        expanded += [(b.block_id, _key(b.read_roi), _key(b.write_roi)) for b in inside]
    unbatched = scheduler_blocks(blocking)
    assert len(expanded) == len(set(expanded)) == blocking.num_blocks
    assert sorted(expanded) == sorted(unbatched)
