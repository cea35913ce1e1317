"""Fixtures for the in-process API tests (fake engine)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from backends.base import InProcessBackend, ModelSpec
from backends.fake import FakeEngine


@pytest.fixture(scope="module")
def shared_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One fake-engine app for a whole module: a table of bad requests runs against
    the same server, so damage from one would show in the next."""
    from server.app import create_app
    from server.settings import Settings

    def factory(spec: ModelSpec) -> InProcessBackend:
        spec.backend = "fake"
        return InProcessBackend(FakeEngine, spec)

    root = tmp_path_factory.mktemp("shared")
    with TestClient(create_app(Settings(models=root / "models"), factory), base_url="http://localhost") as client:
        client.store_root = root  # type: ignore[attr-defined]
        yield client
