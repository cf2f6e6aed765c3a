"""Session-wide figures of the fault-injection and bad-input tests.

`fault_tally` collects what tests/test_faults.py injected; tests marked
`bad_input` are counted as they pass. The figures are printed at the end
of the run and, with VOXBLOCK_FAULTS_REPORT=path.json, written for the
README's reliability section (tools/readme_section.py).

`postgres_server` (a PostgreSQL server started by ci/postgres.sh) and `postgres_url` (a fresh
database on it per test) serve the tests of graph databases on PostgreSQL.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
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


# -- PostgreSQL -------------------------------------------------------------------------------------

POSTGRES_SH = Path(__file__).resolve().parents[1] / "ci" / "postgres.sh"


def _postgres_unavailable(reason: str) -> None:
    """Skip with the reason; under CI=true fail: CI must not pass by skipping PostgreSQL."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and PostgreSQL is not available: {reason}")
    pytest.skip(f"PostgreSQL is not available: {reason}")


def _server_url(stdout: str) -> str | None:
    lines = [line for line in stdout.splitlines() if line.startswith("postgresql://")]
    return lines[-1] if lines else None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A running PostgreSQL server (ci/postgres.sh), stopped at the end if this session started it.

    Yields the server's URL without a database, `postgresql://voxblock:voxblock@127.0.0.1:5432`:
    its role may create databases. Tests use `postgres_url`, a fresh database of their own.
    """
    import subprocess

    try:
        import psycopg2  # noqa: F401
    except ImportError as error:
        _postgres_unavailable(f"{error} (install voxblock[postgresql])")
    status = subprocess.run([str(POSTGRES_SH), "status"], capture_output=True, text=True, timeout=60)
    was_up = status.returncode == 0
    url = _server_url(status.stdout) if was_up else None
    if not was_up:
        try:
            started = subprocess.run([str(POSTGRES_SH), "start"], capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as error:
            _postgres_unavailable(f"ci/postgres.sh start: {error}")
        if started.returncode != 0:
            _postgres_unavailable(
                f"ci/postgres.sh start exited {started.returncode}: {started.stderr.strip()[-500:]}"
            )
        url = _server_url(started.stdout)
    if url is None:
        _postgres_unavailable(f"ci/postgres.sh printed no server URL: {status.stdout}")
    yield url
    if not was_up:
        subprocess.run([str(POSTGRES_SH), "stop"], capture_output=True, timeout=120)


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database of this test's own, dropped afterwards (whoever is still connected).

    `postgresql://voxblock:voxblock@127.0.0.1:5432/voxblock_test_<12 hex digits>`; a plain lowercase
    name, as funlib's PgSQLGraphDatabase needs (it writes the name into SQL unquoted).
    """
    import uuid

    import psycopg2

    name = f"voxblock_test_{uuid.uuid4().hex[:12]}"
    connection = psycopg2.connect(f"{postgres_server}/postgres", connect_timeout=10)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
        yield f"{postgres_server}/{name}"
        with connection.cursor() as cursor:
            # FORCE (PostgreSQL 13+) ends connections a test left open, a killed worker's among them
            force = " WITH (FORCE)" if connection.server_version >= 130000 else ""
            cursor.execute(f"DROP DATABASE IF EXISTS {name}{force}")
    finally:
        connection.close()
