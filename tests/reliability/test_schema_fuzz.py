"""schemathesis against kiln's own OpenAPI schema, in-process on the fake engine:
every operation, a bounded number of generated requests (25 each in the reduced run,
200 in the full one), valid and invalid ones; the one check is that none gets a 5xx.

Every other generated body that names a model is sent naming the bundled one, so
requests get past the model lookup into options, templates and the engine. Nothing leaves the
process: pulls find the network "offline" and any socket connection to anything but
loopback is refused.
"""

from __future__ import annotations

import atexit
import ipaddress
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The store and Hypothesis's cache (./.hypothesis by default) go in a temporary
# directory: nothing is written into the checkout.
ROOT = Path(tempfile.mkdtemp(prefix="kiln-fuzz-"))
atexit.register(shutil.rmtree, ROOT, ignore_errors=True)
hypothesis = pytest.importorskip("hypothesis")
hypothesis.configuration.set_hypothesis_home_dir(str(ROOT / "hypothesis"))
schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402

from reliability_support import MODEL, Sizes, env_full, fake_factory, write_report  # noqa: E402

COUNTS: dict[str, dict[str, int]] = {}
OFFLINE = "not reachable from the reliability suite (offline on purpose)"


def _loopback_only(real_connect: Any) -> Any:
    def connect(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            try:
                ok = ipaddress.ip_address(host.split("%")[0]).is_loopback
            except ValueError:
                ok = host == "localhost"
            if not ok:
                raise ConnectionRefusedError(f"the reliability suite talks to loopback only, not {host}")
        return real_connect(self, address)

    return connect


def _app() -> Any:
    """The app under test, on the fake engine, with a store in a temporary directory
    (built at import: schemathesis makes one test per operation at collection)."""
    from server.app import create_app
    from server.settings import Settings

    # schemathesis's ASGI transport sends Host: testserver, a name the DNS-rebinding
    # guard refuses; allowed here so the fuzzing reaches the handlers.
    return create_app(Settings(models=ROOT / "models", allowed_hosts=["testserver"]), fake_factory())


SIZES = Sizes.pick(env_full())
schema = schemathesis.openapi.from_asgi("/openapi.json", _app())
# The reduced run (CI) replays the same examples every time; the full run explores.
# No example database: nothing is written into the checkout.
schema.config.generation.update(max_examples=SIZES.fuzz_examples, deterministic=not SIZES.full, database="none",
                                modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])


@pytest.fixture(autouse=True, scope="module")
def _offline() -> Iterator[None]:
    from server import models

    def offline(host: str) -> None:
        raise models.PullError(f"pull: {host}: {OFFLINE}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "_check_public", offline)
        mp.setattr(socket.socket, "connect", _loopback_only(socket.socket.connect))
        yield


@schema.parametrize()
def test_no_server_errors(case: Any) -> None:
    key = f"{case.method} {case.path}"
    c = COUNTS.setdefault(key, {})
    if isinstance(case.body, dict) and "model" in case.body and sum(c.values()) % 2:
        case.body = {**case.body, "model": MODEL}  # past the model lookup, into the handlers
    response = case.call()
    bucket = f"{response.status_code // 100}xx"
    if case.path == "/api/pull" and response.status_code == 500 and OFFLINE in response.text:
        # A pull whose registry cannot be reached answers 500, as Ollama's does: the
        # one 5xx by design, and here the suite itself cut the network.
        bucket = "5xx-upstream"
    c[bucket] = c.get(bucket, 0) + 1
    if bucket != "5xx-upstream":
        case.validate_response(response, checks=[not_a_server_error])


def test_fuzz_figures() -> None:
    """Reports how many requests each operation got and what they were answered
    (runs after the fuzzing, in file order)."""
    if not COUNTS:
        pytest.skip("no fuzzing ran in this session")
    total = {b: sum(c.get(b, 0) for c in COUNTS.values()) for b in ("2xx", "4xx", "5xx", "5xx-upstream")}
    write_report("tests/reliability/test_schema_fuzz.py", SIZES.full, operations=len(COUNTS),
                 max_examples=SIZES.fuzz_examples, requests=sum(sum(c.values()) for c in COUNTS.values()),
                 answers=total, per_operation=COUNTS)
    assert total["5xx"] == 0
