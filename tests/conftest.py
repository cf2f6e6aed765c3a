"""Session-wide figures of the fault-injection and bad-input tests.

`fault_tally` collects what tests/test_faults.py injected; tests marked
`bad_input` are counted as they pass. The figures are printed at the end
of the run and, with VOXBLOCK_FAULTS_REPORT=path.json, written for the
README's reliability section (tools/readme_section.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest


@dataclass
class Figures:
    runs: int = 0
    faults_injected: int = 0
    runs_survived: int = 0
    blocks_lost: int = 0


@dataclass
class FaultTally:
    categories: dict[str, Figures] = field(default_factory=dict)
    bad_inputs_tried: int = 0
    bad_inputs_refused: int = 0

    def add(self, category: str, injected: int, survived: bool, lost: int) -> None:
        figures = self.categories.setdefault(category, Figures())
        figures.runs += 1
        figures.faults_injected += injected
        figures.runs_survived += int(bool(survived))
        figures.blocks_lost += lost

    def table(self) -> str:
        lines = [
            "| fault | runs | faults injected | runs that ended correctly | blocks lost |",
            "|---|---|---|---|---|",
        ]
        for name, f in self.categories.items():
            lines.append(f"| {name} | {f.runs} | {f.faults_injected} | {f.runs_survived} | {f.blocks_lost} |")
        total = Figures(
            sum(f.runs for f in self.categories.values()),
            sum(f.faults_injected for f in self.categories.values()),
            sum(f.runs_survived for f in self.categories.values()),
            sum(f.blocks_lost for f in self.categories.values()),
        )
        lines.append(
            f"| **all** | {total.runs} | {total.faults_injected} | {total.runs_survived} "
            f"| {total.blocks_lost} |"
        )
        lines.append("")
        lines.append(
            f"Bad inputs tried: {self.bad_inputs_tried}, refused with a clear error before any block "
            f"ran and with existing data unchanged: {self.bad_inputs_refused}."
        )
        return "\n".join(lines)


TALLY = pytest.StashKey[FaultTally]()


def _tally(config: pytest.Config) -> FaultTally:
    if TALLY not in config.stash:
        config.stash[TALLY] = FaultTally()
    return config.stash[TALLY]


@pytest.fixture(scope="session")
def fault_tally(request: pytest.FixtureRequest) -> FaultTally:
    return _tally(request.config)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and item.get_closest_marker("bad_input") is not None:
        # a test that loops over several cases says how many in its user_properties
        cases = int(dict(item.user_properties).get("bad_inputs", 1))
        tally = _tally(item.config)
        tally.bad_inputs_tried += cases
        tally.bad_inputs_refused += cases if report.passed else 0


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    tally = config.stash.get(TALLY, None)
    if tally is None or not (tally.categories or tally.bad_inputs_tried):
        return
    terminalreporter.section("voxblock reliability figures")
    terminalreporter.write_line(tally.table())
    target = os.environ.get("VOXBLOCK_FAULTS_REPORT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(
            json.dumps(
                {
                    "categories": {k: asdict(v) for k, v in tally.categories.items()},
                    "bad_inputs_tried": tally.bad_inputs_tried,
                    "bad_inputs_refused": tally.bad_inputs_refused,
                    "table": tally.table(),
                },
                indent=2,
            )
        )
