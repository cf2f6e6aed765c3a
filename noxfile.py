"""Sessions: `nox -s lint tests` is what CI runs; `nox -s bench` measures speed."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PACKAGES = ["./packages/core", "./packages/workers", "./packages/testing"]
# The exact CPU build of torch: an open range could pull a multi-GB CUDA build.
TORCH = "torch==2.13.0"


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite: real daisy server, real worker processes, real zarr."""
    session.install(TORCH)
    session.install(*PACKAGES, "pytest>=8", "pytest-timeout>=2", "hypothesis>=6.100")
    session.run("pytest", "-p", "no:cacheprovider", "--timeout=600", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and format check over every package, the tests and benchmarks."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "packages", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "packages", "tests", "noxfile.py")
