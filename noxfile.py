"""Nox sessions: ``nox`` runs lint, typecheck and tests; drills, bench, examples and fbs on demand."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

# The CPU build of torch lies on local disk on our machines; asking for it first keeps installs fast
# and stops pip from pulling a multi-GB CUDA build to satisfy the project's range.
TORCH = "torch==2.13.0"


def install_project(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[dev]")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint rules (with the ASYNC rules) and formatting."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the flcluster package."""
    install_project(session)
    session.run("mypy")


@nox.session
def tests(session: nox.Session) -> None:
    """Unit, property and integration tests (real processes on loopback); not the benchmarks."""
    install_project(session)
    session.run("pytest", "--ignore=tests/benchmarks", *session.posargs)


@nox.session
def drills(session: nox.Session) -> None:
    """Kill-and-restart drills (recovery/README.md); ``nox -s drills -- --short`` runs the short set."""
    install_project(session)
    session.run("python", "-m", "recovery.drills", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: each prints its figures next to a baseline measured in the same run."""
    install_project(session)
    session.run("pytest", "tests/benchmarks", "-s", "-p", "no:cacheprovider", *session.posargs)


@nox.session
def fbs(session: nox.Session) -> None:
    """Regenerate flcluster/wire/fbs from spec/*.fbs with flatc (Debian's flatbuffers-compiler)."""
    session.run("python", "tools/generate_fbs.py", *session.posargs, external=True)
