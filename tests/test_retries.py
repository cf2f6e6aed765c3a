"""Failed blocks are retried up to max_retries, whether the worker raises, is
SIGKILLed mid-block, or hangs past the timeout; a block that keeps failing
is named in the report and every other block is still written."""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
from funlib.geometry import Roi

import voxblock
from voxblock_testing.properties import check_retries, run_task
from voxblock_testing.volumes import random_raw, read_array
from voxblock_testing.workers import Flaky, attempts


@pytest.mark.parametrize("fail_times, max_retries", [(2, 2), (1, 0)])
def test_a_block_failing_k_times_succeeds_iff_k_le_max_retries(fail_times, max_retries, tmp_path):
    report = check_retries(tmp_path, fail_times, max_retries)
    assert report["succeeded"] == (fail_times <= max_retries)


def test_permanent_failure_is_reported_with_roi_attempts_and_error(tmp_path, capsys):
    # through run_blockwise, which returns False and prints the failed blocks
    run = functools.partial(voxblock.run_blockwise, progress=False)
    report = check_retries(tmp_path, fail_times=5, max_retries=1, shape=(48, 32), block=(16, 16), run=run)
    (failed,) = report["failed_blocks"]
    assert failed["write_roi"] == {"offset": [16, 16], "shape": [16, 16]}
    assert failed["attempts"] == 2
    assert failed["error"].startswith("FlakyFailure: flaky failure 2 of 5")
    assert report["processed"] == 5 and report["total_blocks"] == 6
    # the same block in the failure records of the run directory
    records = (tmp_path / "run" / "failures" / f"{failed['block_id']}.jsonl").read_text().splitlines()
    assert len(records) == 2
    printed = capsys.readouterr().out
    assert "flaky: FAILED - 5 blocks processed, 0 already done, 1 failed" in printed
    assert re.search(
        r"block \d+ write ROI offset=\(16, 16\) shape=\(16, 16\): 2 attempt\(s\), "
        r"last error: FlakyFailure: flaky failure 2 of 5",
        printed,
    ), printed


def test_every_block_failing_once_is_retried_and_output_equals_a_clean_run(tmp_path):
    source = random_raw(str(tmp_path / "v.zarr/raw"), (32, 48), seed=3, chunk_shape=(16, 16))
    total, block = Roi((0, 0), (32, 48)), Roi((0, 0), (16, 16))
    clean_output, output = str(tmp_path / "v.zarr/clean"), str(tmp_path / "v.zarr/out")
    clean = run_task(
        Flaky(input=source, output=clean_output, attempts_dir=str(tmp_path / "a0"), fail_times=0),
        total, block, block, num_workers=2,
    )  # fmt: skip
    flaky = run_task(
        Flaky(input=source, output=output, attempts_dir=str(tmp_path / "a1"), fail_times=1, fail_at=None),
        total, block, block, num_workers=2, max_retries=1,
    )  # fmt: skip
    assert clean.succeeded and flaky.succeeded
    assert flaky.tasks[0].processed == 6 and flaky.tasks[0].failed_blocks == []
    assert sorted(attempts(tmp_path / "a1").values()) == [2] * 6
    np.testing.assert_array_equal(read_array(output), read_array(clean_output))
    np.testing.assert_array_equal(read_array(output), read_array(source))


def test_sigkill_mid_block_is_retried(tmp_path):
    report = check_retries(tmp_path, fail_times=1, max_retries=1, mode="kill")
    assert report["failed_blocks"] == [] and report["processed"] == 4
    assert "exited with code -9" in report["last_worker_error"]


def test_sigkill_on_every_attempt_fails_the_block_only(tmp_path):
    report = check_retries(tmp_path, fail_times=2, max_retries=1, mode="kill")
    (failed,) = report["failed_blocks"]
    assert failed["attempts"] == 2
    assert "-9" in failed["error"] or "died" in failed["error"]


def test_hang_past_timeout_kills_the_worker_and_retries(tmp_path):
    report = check_retries(tmp_path, fail_times=1, max_retries=1, mode="hang", timeout=2)
    assert report["timeouts"] == 1 and report["failed_blocks"] == []
    assert 2 <= report["seconds"] < 60
