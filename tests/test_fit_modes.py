"""The fit modes through the real scheduler: daisy's server hands real worker
processes exactly the blocks `voxblock.Blocking` says, each once."""

from __future__ import annotations

import pytest
from funlib.geometry import Roi
from hypothesis import HealthCheck, given, settings

from voxblock import Blocking
from voxblock_testing.properties import check_fit_mode
from voxblock_testing.strategies import BlockingCase, blockings
from voxblock_testing.workers import read_records


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=blockings(min_blocks=1, max_blocks=3))
def test_scheduler_hands_out_exactly_the_blocks(case: BlockingCase, tmp_path_factory):
    seen = check_fit_mode(case, tmp_path_factory.mktemp("fit"), num_workers=2)
    assert len(seen) == len(case.blocking.blocks()) >= 1


@pytest.mark.parametrize("fit", ["valid", "overhang", "shrink"])
def test_each_fit_mode_with_a_partial_last_block(fit, tmp_path):
    # 2-D, context 2 below / 1 above, a total ROI that leaves a partial block on both axes
    # target region [0:13, 2:11]: 4 x 3 write blocks of 4, of which 3 x 2 read inside
    blocking = Blocking(Roi((-2, 0), (16, 12)), Roi((0, 0), (7, 7)), Roi((2, 2), (4, 4)), fit)
    seen = check_fit_mode(blocking, tmp_path, num_workers=2)
    assert len(seen) == {"valid": 3 * 2, "overhang": 4 * 3, "shrink": 4 * 3}[fit]
    last = max(seen, key=lambda block: tuple(block[1].begin))
    assert (
        last
        == {
            "valid": (Roi((6, 4), (7, 7)), Roi((8, 6), (4, 4))),
            "overhang": (Roi((10, 8), (7, 7)), Roi((12, 10), (4, 4))),
            "shrink": (Roi((10, 8), (4, 4)), Roi((12, 10), (1, 1))),
        }[fit]
    )
    pids = {r["pid"] for r in read_records(tmp_path / "records")}
    assert 1 <= len(pids) <= 2
