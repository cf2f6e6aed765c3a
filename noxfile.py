"""Sessions: `nox -s lint tests` is what CI runs; `nox -s bench` measures speed."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PACKAGES = ["./packages/core", "./packages/workers", "./packages/testing"]
# the graph database tests run on a real PostgreSQL server (ci/postgres.sh starts it); the viewer
# tests drive a real headless Chromium (ci/chromium.sh)
TEST_PACKAGES = ["./packages/core[postgresql,view]", *PACKAGES[1:]]
# The exact CPU build of torch: an open range could pull a multi-GB CUDA build.
TORCH = "torch==2.13.0"
# the readers and writers of tests/test_formats.py: N5 (tensorstore), OME-NGFF (ome-zarr-py)
FORMATS = ["tensorstore>=0.1.60", "ome-zarr>=0.12"]
# what the benchmark harnesses measure and draw with (tests/test_scale_harness.py runs one)
MEASURE = ["psutil>=5.9", "matplotlib>=3.8"]


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite: real daisy server, real worker processes, real zarr."""
    session.install(TORCH)
    session.install(*TEST_PACKAGES, "pytest>=8", "pytest-timeout>=2", "hypothesis>=6.100", *FORMATS, *MEASURE)
    session.run("pytest", "-p", "no:cacheprovider", "--timeout=600", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and format check over every package, the tests and benchmarks."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "packages", "tests", "tools", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "packages", "tests", "tools", "benchmarks", "noxfile.py")


BENCH_MODES = ("--quick", "--full")


@nox.session
def bench(session: nox.Session) -> None:
    """Speed side by side: `nox -s bench` (256^3) or `nox -s bench -- --full` (512^3, for the README).

    Runs volara first in its own virtualenv (`bench_volara`; skip with
    `-- --no-volara`), then benchmarks/run.py. Not part of the default sessions.
    """
    args = [a for a in session.posargs if a != "--no-volara"]
    if not any(a in BENCH_MODES for a in args):
        args.insert(0, "--quick")
    if "--no-volara" not in session.posargs:
        import sys

        mode = next(a for a in args if a in BENCH_MODES)
        session.run(sys.executable, "-m", "nox", "-s", "bench_volara", "--", mode, external=True)
    session.install(TORCH)
    session.install(*PACKAGES, *MEASURE)
    session.run("python", "benchmarks/run.py", *args)
    if "--full" in args and not any(a.startswith("--only") for a in args):
        # the README's table comes from the full run that measured it
        session.run("python", "tools/readme_section.py", "performance", "benchmarks/results/README-table.md")


@nox.session
def bench_volara(session: nox.Session) -> None:
    """volara 1.0.5 on the benchmark's volumes, in its own virtualenv (it pins daisy<2).

    Writes benchmarks/results/volara-{quick,full}.json for `nox -s bench`.
    """
    session.install("volara==1.0.5", "psutil>=5.9")
    session.run("python", "benchmarks/volara_bench.py", *(session.posargs or ["--quick"]))


@nox.session
def scale(session: nox.Session) -> None:
    """Scale from 10^3 to 10^6 blocks: `nox -s scale` (full, for the README) or `-- --quick`.

    benchmarks/scale.py: no-op blocks against bare daisy 2, the segment solve against fragments
    and a sharded output; a table, a plot and a paper extrapolation to a 10^15-voxel volume in
    benchmarks/results/scale-MODE.*. The full run writes the README's "scale" section.
    """
    args = list(session.posargs)
    if not any(a in BENCH_MODES for a in args):
        args.insert(0, "--full")
    session.install(*PACKAGES, *MEASURE)
    session.run("python", "benchmarks/scale.py", *args)
    if "--full" in args and not any(a.startswith(("--blocks", "--fragments", "--output-size")) for a in args):
        session.run("python", "tools/readme_section.py", "scale", "benchmarks/results/scale-full.json")


@nox.session
def faults(session: nox.Session) -> None:
    """Fault injection at full size, plus every bad-input test; writes the README's figures.

    The CI test run injects the same kinds of fault at a smaller size.
    """
    session.install(TORCH)
    session.install(*TEST_PACKAGES, "pytest>=8", "pytest-timeout>=2", "hypothesis>=6.100", *FORMATS)
    report = "tests/results/faults.json"
    session.run(
        "pytest",
        "-p",
        "no:cacheprovider",
        "--timeout=900",
        "-m",
        "faults or bad_input",
        "tests",
        *session.posargs,
        env={"VOXBLOCK_FAULTS": "full", "VOXBLOCK_FAULTS_REPORT": report},
    )
    session.run("python", "tools/readme_section.py", "reliability", report)
