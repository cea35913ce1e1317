"""U7 of the research note (scaleout.md §4.3): a network partition, not a dead process.

Replica A runs inside a network namespace of its own, reached over a veth pair
(10.231.7.1 on the host, 10.231.7.2 inside: addresses of this test's own namespace,
nothing else is sent to); replica B on loopback. Setting A's end of the link down
mid-load is a partition: A's process lives on, its streams just stop (no RST, no
FIN), and new connections to it get no answer at all. Needs root and iproute2; skipped
without them, failed instead under KILN_REQUIRE_REAL."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import free_port
from tests.upstream.conftest import Node, wait_for
from tests.upstream.test_routing import chat, sse_outcome, timed_chats

HOST, INSIDE = "10.231.7.1", "10.231.7.2"
STALL = 2.0
TIMEOUTS = {"probe_interval": 0.5, "connect_timeout": 1.0, "first_token_timeout": 2.0, "stall_timeout": STALL}


def ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace ``kiln-u7-<pid>`` joined to the host by a veth pair; removed after."""
    ns, host_if = f"kiln-u7-{os.getpid()}", f"ku7h{os.getpid() % 100000}"
    try:
        ip("netns", "add", ns)
    except (OSError, subprocess.CalledProcessError) as e:
        why = getattr(e, "stderr", b"") or str(e)
        if os.environ.get("KILN_REQUIRE_REAL"):
            pytest.fail(f"network namespaces are needed (root, iproute2): {why!r}")
        pytest.skip(f"network namespaces are not available here: {why!r}")
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", "ku7n", "netns", ns)
        ip("addr", "add", f"{HOST}/24", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("addr", "add", f"{INSIDE}/24", "dev", "ku7n", ns=ns)
        ip("link", "set", "ku7n", "up", ns=ns)
        ip("link", "set", "lo", "up", ns=ns)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)  # takes the veth pair along
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=10)


def test_partition_mid_load(netns, nodes, front) -> None:
    a = Node(free_port(), ["--models", "m1", "--tokens", "60", "--delay", "0.05"], host=INSIDE, netns=netns).start()
    try:
        b = nodes("--models", "m1", "--tokens", "60", "--delay", "0.05")
        kiln = front([{"name": "fleet", "api": "openai", "urls": [a.origin + "/v1", b.origin + "/v1"], **TIMEOUTS}])
        fleet = lambda: httpx.get(kiln.url + "/health").json()["upstreams"]["fleet"]  # noqa: E731
        wait_for(lambda: fleet()["up"] == 2, 5.0)

        # 8 streams of 3 s; once all 8 are streaming, A's end of the link goes down
        cut, started = [0.0], []

        def partition() -> None:
            wait_for(lambda: len(started) == 8, 10.0, step=0.02)
            time.sleep(0.3)
            cut[0] = time.monotonic()
            ip("link", "set", "ku7n", "down", ns=netns)

        t = threading.Thread(target=partition)
        t.start()
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(lambda i: sse_outcome(kiln.url, "m1", cut, started), range(8)))
        t.join()
        errors = [o for o in outcomes if o["outcome"] == "error"]
        sent_a = fleet()["replicas"][0]["requests"]
        worst = max((o["after_kill"] for o in errors), default=0.0)
        print(f"U7 partition: {len(errors)} streams ended with an error (A was sent {sent_a}), "
              f"{8 - len(errors)} complete; error at most {worst:.2f}s after the cut (stall timeout {STALL:g}s)")
        assert len(errors) == sent_a  # exactly A's streams, and each says it failed (sse_outcome checks)
        assert 1 <= sent_a <= 7 and all(o["tokens"] == 60 for o in outcomes if o["outcome"] == "complete")
        assert STALL - 0.5 <= worst <= STALL + 1.0  # the stall timeout, not a hang, not before
        assert fleet()["replicas"][0]["up"] is False  # a stalled replica is taken out

        # new requests while A is unreachable: all on B (it is out), none waits for A
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda i: chat(kiln.url, "m1", f"after {i}"), range(8)))
        took = time.monotonic() - t0
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
        assert fleet()["replicas"][0]["requests"] == sent_a and took < 3.0 + 1.0 + 1.0  # one generation + slack
        print(f"U7 after the cut: 8/8 on B in {took:.2f}s")

        # healed: A is probed back in (probe 0.5 s x 2 successes)
        ip("link", "set", "ku7n", "up", ns=netns)
        back = wait_for(lambda: fleet()["up"] == 2, 10.0, step=0.1)
        print(f"U7 healed: A up again {back:.2f}s after the link came back")
        with ThreadPoolExecutor(8) as pool:
            assert all(r.status_code == 200 for r in pool.map(lambda i: chat(kiln.url, "m1", f"h{i}"), range(8)))
        assert fleet()["replicas"][0]["requests"] > sent_a

        # cut again with nothing in flight: a request sent to A before the probes notice
        # waits the connect timeout (a new connection) or the first-token timeout (a kept-alive
        # one: the request is written, no answer comes), then is re-sent to B
        before = fleet()["replicas"][0]["requests"]
        ip("link", "set", "ku7n", "down", ns=netns)
        replies, lat = timed_chats(kiln.url, "m1", 4)
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
        tried_a = fleet()["replicas"][0]["requests"] - before
        print(f"U7 fresh cut: 4/4 ok, {tried_a} tried A first and were re-sent; max latency {max(lat):.2f}s "
              f"(first-token timeout 2 s + a 3 s generation)")
        assert max(lat) <= 2.0 + 3.0 + 1.5
    finally:
        a.kill()
