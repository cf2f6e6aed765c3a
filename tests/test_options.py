"""One typed set of task options: the same defaults and checks for BlockwiseTask, run_blockwise,
segment_blockwise and the CLI; a keyword that the worker takes too is refused, not guessed."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from funlib.geometry import Roi

import voxblock
import voxblock.compat
import voxblock.task
from voxblock import ArrayWorker, option
from voxblock.cli import _worker_command, main
from voxblock.errors import VoxblockError
from voxblock.options import NAMES, TaskOptions, cli_flag, markdown_table
from voxblock.task import BlockwiseTask
from voxblock_testing.volumes import random_raw, read_array

README = Path(__file__).parents[1] / "README.md"
SHAPE = (16, 16, 16)


@dataclass
class Patient(ArrayWorker):
    """Doubles the input; has options named like task options (`timeout`, `halo`). (`fit` is a
    Worker's class attribute, its default fit: no worker option can have that name.)"""

    timeout: float = option(1.0, help="seconds this worker waits for something")
    halo: str = option("none", help="a glow drawn around objects")

    def compute(self, data: np.ndarray, block: object) -> np.ndarray:
        return data * 2


@pytest.fixture
def raw(tmp_path: Path) -> str:
    return random_raw(str(tmp_path / "v.zarr" / "raw"), SHAPE, seed=1)


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker name "patient" is Patient, as if an entry point registered it."""
    monkeypatch.setattr(voxblock.task, "worker_class", lambda name: Patient)
    monkeypatch.setattr(voxblock.compat, "worker_class", lambda name: Patient)


def rois() -> tuple[Roi, Roi, Roi]:
    block = Roi((0, 0, 0), (8, 8, 8))
    return Roi((0, 0, 0), SHAPE), block, block


def test_every_task_option_has_a_default_a_help_and_is_in_the_readme_table():
    text = README.read_text()
    assert markdown_table() in text
    for f in dataclasses.fields(TaskOptions):
        assert f.default is not dataclasses.MISSING, f.name
        assert f.metadata["help"], f.name
        assert f"| `{f.name}` |" in text


def test_one_max_retries_default_everywhere():
    assert TaskOptions().max_retries == 2
    task = BlockwiseTask("scale", *rois(), input="a.zarr/x", output="a.zarr/y")
    assert task.max_retries == 2 and task.num_workers == 16
    command = _worker_command("scale", voxblock.workers.worker_class("scale"))
    flags = {p.name: p for p in command.params}
    assert flags["max_retries"].default == 2
    segment = {p.name: p for p in main.commands["segment"].params}
    assert segment["max_retries"].default == 2


def test_the_cli_declares_each_task_option_flag_once_from_the_dataclass():
    shared = {f.name: cli_flag(f) for f in dataclasses.fields(TaskOptions) if cli_flag(f)}
    assert shared["num_workers"] == "--workers" and shared["chunk_shape"] == "--chunk-size"
    for command in (
        _worker_command("scale", voxblock.workers.worker_class("scale")),
        main.commands["segment"],
    ):
        params = {p.name: p for p in command.params}
        for name, flag in shared.items():
            if name == "batch" and command.name == "segment":  # its passes cannot be batched
                assert name not in params
                continue
            assert flag in params[name].opts, (command.name, name)
        assert "--no-halo" in params["halo"].secondary_opts
        assert "--no-progress" in params["no_progress"].opts


@pytest.mark.parametrize(
    "values, message",
    [
        ({"num_workers": 0}, "num_workers must be an integer >= 1"),
        ({"max_retries": -1}, "max_retries must be an integer >= 0"),
        ({"timeout": 0}, "timeout must be a number of seconds > 0"),
        ({"fit": "loose"}, "fit must be one of valid, overhang, shrink"),
        ({"halo": "yes"}, "halo must be True, False or None"),
        ({"chunk_shape": (8, 0, 8)}, "chunk_shape must be positive integers"),
        ({"compute": "slurm"}, "compute must be a voxblock Compute"),
        ({"check_function": (print,)}, "check_function must be a function or a (pre, post) pair"),
        ({"max_worker_restarts": -1}, "max_worker_restarts must be >= 0"),
    ],
)
def test_task_options_are_checked_when_made(values, message):
    with pytest.raises(VoxblockError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TaskOptions(**values)


def test_an_unknown_task_option_lists_them():
    with pytest.raises(VoxblockError, match="its task options are: num_workers, max_retries"):
        TaskOptions.of({"num_worker": 2})


@pytest.mark.parametrize("name", ["timeout", "halo"])
def test_a_keyword_both_could_take_is_refused_with_how_to_say_whose(raw, tmp_path, name, registered):
    value = {"timeout": 5.0, "halo": False}[name]
    with pytest.raises(VoxblockError) as refused:
        BlockwiseTask("patient", *rois(), input=raw, output=f"{tmp_path}/v.zarr/out", **{name: value})
    assert f"{name} is both a task option and an option of worker" in str(refused.value)
    assert f"worker_options={{{name!r}: ...}}" in str(refused.value)
    assert "configured worker instance" in str(refused.value)


def test_worker_options_and_a_worker_instance_say_whose_a_keyword_is(raw, tmp_path, registered):
    out = f"{tmp_path}/v.zarr/out"
    task = BlockwiseTask(
        "patient",
        *rois(),
        timeout=30.0,
        halo=False,
        worker_options={"timeout": 2.0, "input": raw, "output": out},
    )
    assert task.timeout == 30.0 and task.halo is False
    assert task.worker.timeout == 2.0 and task.worker.halo == "none"
    configured = Patient(timeout=3.0, halo="soft", input=raw, output=out)
    task = BlockwiseTask(configured, *rois(), timeout=40.0, halo=True)
    assert task.timeout == 40.0 and task.worker.timeout == 3.0 and task.halo is True
    with pytest.raises(VoxblockError, match="given both as a keyword and in worker_options"):
        BlockwiseTask("patient", *rois(), input=raw, output=out, worker_options={"input": raw})


def test_by_position_num_workers_max_retries_and_timeout_are_the_task_s(raw, tmp_path, registered):
    out = f"{tmp_path}/v.zarr/out"
    task = BlockwiseTask("patient", *rois(), 3, 0, 7.0, None, input=raw, output=out)
    assert (task.num_workers, task.max_retries, task.timeout, task.worker.timeout) == (3, 0, 7.0, 1.0)
    with pytest.raises(TypeError, match="multiple values for argument 'num_workers'"):
        BlockwiseTask("patient", *rois(), 3, num_workers=4, input=raw, output=out)


def test_run_blockwise_runs_a_worker_whose_options_share_names_with_task_options(raw, tmp_path):
    out = f"{tmp_path}/v.zarr/out"
    worker = Patient(timeout=9.0, halo="soft", input=raw, output=out)
    assert voxblock.run_blockwise(worker, *rois(), num_workers=1, timeout=60, halo=False, progress=False)
    np.testing.assert_array_equal(read_array(out), read_array(raw) * 2)


def test_run_blockwise_and_blockwise_task_keep_dacapo_s_argument_order():
    for function in (voxblock.run_blockwise, BlockwiseTask.__init__):
        parameters = [p for p in inspect.signature(function).parameters if p != "self"]
        assert parameters[:5] == ["worker", "total_roi", "read_roi", "write_roi", "args"]
    assert set(NAMES) >= {"num_workers", "max_retries", "timeout"}


def test_segment_blockwise_refuses_what_it_sets_per_pass_and_unknown_options(raw, tmp_path):
    total, block, _ = rois()
    common = {"input": raw, "output": f"{tmp_path}/v.zarr/cells"}
    with pytest.raises(VoxblockError, match="segment_blockwise sets task_id itself"):
        voxblock.segment_blockwise("threshold-label", (1, 1, 1), total, block, block, task_id="x", **common)
    with pytest.raises(VoxblockError, match="segment_blockwise has no option threshold"):
        voxblock.segment_blockwise("threshold-label", (1, 1, 1), total, block, block, threshold=0.5, **common)
    with pytest.raises(VoxblockError, match="max_retries must be an integer >= 0"):
        voxblock.segment_blockwise("threshold-label", (1, 1, 1), total, block, block, 2, -1, **common)


def test_the_cli_gives_a_clashing_worker_option_a_worker_flag(monkeypatch):
    command = _worker_command("patient", Patient)
    params = {p.name: p for p in command.params}
    assert "--worker-timeout" in params["worker__timeout"].opts
    assert "--worker-halo" in params["worker__halo"].opts
    assert "--timeout" in params["timeout"].opts and "--halo" in params["halo"].opts
    result = CliRunner().invoke(command, ["--help"])
    assert "--worker-timeout" in result.output and "seconds this worker waits" in result.output


def test_the_cli_runs_a_worker_with_a_clashing_option(raw, tmp_path, registered):
    out = f"{tmp_path}/v.zarr/out"
    arguments = ["--input", raw, "--output", out, "--block-size", "8", "--workers", "1", "--no-progress"]
    result = CliRunner().invoke(
        _worker_command("patient", Patient), [*arguments, "--timeout", "60", "--worker-timeout", "2"]
    )
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_array(out), read_array(raw) * 2)
