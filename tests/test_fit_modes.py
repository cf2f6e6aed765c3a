"""The fit modes through the real scheduler: daisy's server hands real worker
processes exactly the blocks `voxblock.Blocking` says, each once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from funlib.geometry import Roi
from funlib.persistence import open_ds, prepare_ds
from hypothesis import HealthCheck, given, settings

import voxblock
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


@pytest.mark.bad_input
def test_a_default_valid_fit_that_leaves_part_unwritten_is_refused(tmp_path, monkeypatch):
    """dacapo's worker files say fit='valid': on a volume whole blocks do not tile, a run ended
    "done" with a third of it never written."""
    from click.testing import CliRunner

    from voxblock.cli import main
    from voxblock_testing.volumes import random_raw

    monkeypatch.chdir(tmp_path)
    raw = random_raw(str(tmp_path / "v.zarr" / "raw"), (24, 40, 40), seed=1, chunk_shape=(8, 8, 8))
    worker = Path(__file__).parent / "data" / "dacapo_style_worker.py"
    out = str(tmp_path / "v.zarr" / "out")
    prepare_ds(
        out, shape=(24, 40, 40), offset=(0, 0, 0), voxel_size=(1, 1, 1), chunk_shape=(8, 8, 8), dtype=np.uint8
    )
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    args = ["run", str(worker), "--input", raw, "--block-size", "16", "--workers", "2", "--no-progress"]
    args += ["-o", f"input_path={raw}", "-o", f"output_path={out}"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code != 0
    assert "would not be written" in refused.output and "--fit shrink" in refused.output, refused.output
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    done = CliRunner().invoke(main, [*args, "--fit", "shrink"])
    assert done.exit_code == 0, done.output
    np.testing.assert_array_equal(
        open_ds(out).to_ndarray(Roi((0, 0, 0), (24, 40, 40))), open_ds(raw)[:] > 0.5
    )


def test_an_explicit_valid_fit_warns_what_it_leaves_unwritten():
    with pytest.warns(UserWarning, match="would not be written"):
        voxblock.BlockwiseTask(
            "threshold",
            Roi((0, 0, 0), (24, 40, 40)),
            Roi((0, 0, 0), (16, 16, 16)),
            Roi((0, 0, 0), (16, 16, 16)),
            fit="valid",
            input="unused.zarr/raw",
            output="unused.zarr/out",
        )


@pytest.mark.bad_input
def test_a_worker_files_existing_output_whose_chunks_blocks_share_is_refused(tmp_path, monkeypatch):
    """A worker file writes its outputs itself: two workers writing one chunk lost voxels."""
    from click.testing import CliRunner

    from voxblock.cli import main
    from voxblock_testing.volumes import random_raw

    monkeypatch.chdir(tmp_path)
    raw = random_raw(str(tmp_path / "v.zarr" / "raw"), (32, 32, 32), seed=1, chunk_shape=(8, 8, 8))
    worker = Path(__file__).parent / "data" / "dacapo_style_worker.py"
    out = str(tmp_path / "v.zarr" / "out")
    # prepare_ds's default chunks: one chunk for the whole array
    prepare_ds(out, shape=(32, 32, 32), offset=(0, 0, 0), voxel_size=(1, 1, 1), dtype=np.uint8)
    before = {str(p): p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    args = ["run", str(worker), "--input", raw, "--block-size", "16", "--workers", "2", "--no-progress"]
    refused = CliRunner().invoke(main, [*args, "-o", f"input_path={raw}", "-o", f"output_path={out}"])
    assert refused.exit_code != 0
    assert "two blocks would rewrite the same chunk" in refused.output, refused.output
    assert {str(p): p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before
