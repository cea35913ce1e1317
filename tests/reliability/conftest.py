"""Fixtures of the reliability suite (helpers: reliability_support.py).

Sizes: the default is the reduced run CI takes (a few minutes on two shared cores);
``--full`` (when pytest is pointed at this directory) or ``KILN_RELIABILITY_FULL=1``
selects the sizes of kiln issue 6: 1,000 requests at concurrency 16, a storm of 200
disconnecting clients, 200 schemathesis examples per operation.

Figures: every test hands its numbers to ``report(**figures)``, which prints them
(``-s`` shows them) and, when ``KILN_RELIABILITY_REPORT`` names a file, appends them
to it as one JSON line, so a note can quote the very run it describes.

Every server here listens on 127.0.0.1 and every client talks to 127.0.0.1 only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reliability_support import FULL_ENV, Sizes, env_full, start_server, stop_server, write_report

HERE = Path(__file__).resolve().parent


def pytest_addoption(parser: pytest.Parser) -> None:
    # pytest registers it only when it starts from this directory or a path inside
    # it; KILN_RELIABILITY_FULL=1 works from anywhere.
    parser.addoption("--full", action="store_true", default=False,
                     help="kiln reliability suite: the full sizes of issue 6 (or KILN_RELIABILITY_FULL=1)")


def is_full(config: pytest.Config) -> bool:
    return env_full() or bool(config.getoption("--full", default=False))


def pytest_configure(config: pytest.Config) -> None:
    # Modules that size their tests at import (schemathesis makes its tests at
    # collection) read the environment; --full sets it for them.
    if config.getoption("--full", default=False):
        os.environ[FULL_ENV] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The full run outlasts pyproject's 600 s per-test timeout; give it room (each
    test still bounds its own loops)."""
    if not is_full(config):
        return
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.timeout(3600))


@pytest.fixture(scope="session")
def sizes(pytestconfig: pytest.Config) -> Sizes:
    return Sizes.pick(is_full(pytestconfig))


@pytest.fixture
def report(request: pytest.FixtureRequest, sizes: Sizes) -> Callable[..., dict[str, Any]]:
    """``report(**figures)``: prints the test's figures and appends them as JSON."""

    def _report(**figures: Any) -> dict[str, Any]:
        return write_report(request.node.nodeid, sizes.full, **figures)

    return _report


@pytest.fixture
def real_server(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``real_server(env={...})`` starts a ``kiln serve`` on the bundled model on a
    free loopback port; every one started is stopped when the test ends."""
    started: list[Any] = []

    def make(env: dict[str, str] | None = None) -> Any:
        d = tmp_path / f"srv{len(started)}"
        d.mkdir()
        s = start_server(d, env=env)
        started.append(s)
        return s

    yield make
    for s in started:
        stop_server(s)
