"""Budget alerts end to end: the gate, the outbox in the real Redis and deliverers POSTing to a
real webhook receiver on 127.0.0.1 — one signed call per threshold crossing, retried after a
failure, never twice in one period, taken over after a dead deliverer's lease."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gateway.alerts.once import AlertNames, OnceGate
from gateway.alerts.thresholds import NANO_USD, Budget, parse_thresholds
from gateway.alerts.webhook import DeliveryPolicy, Deliverer, Outbox, verify_signature
from tests.conftest import wait_until

USD = NANO_USD
SECRET = "whsec-e2e-0123456789abcdef"
URL_TOKEN = "url-token-never-logged"
THRESHOLDS = parse_thresholds("50%,80%,100%")
# Short timeouts so a lease (which must exceed twice connect + read) is 1.5 s.
POLICY = DeliveryPolicy(max_attempts=4, backoff_base=0.05, backoff_cap=0.2, connect_timeout=0.2, read_timeout=0.5,
                        lease=1.5, poll_interval=0.02)


class Receiver:
    """A webhook receiver in a thread: answers each call with the next scripted status (200 once
    the script runs out) and records (headers, raw body) of every call."""

    def __init__(self, statuses=()):
        self.calls: list[tuple[dict, bytes]] = []
        self.statuses = list(statuses)
        self.cond = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = False  # server_close() then joins every handler thread
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/budget?token={URL_TOKEN}"

    def _handler(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.cond:
                    receiver.calls.append((dict(self.headers), body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.cond.notify_all()
                self.send_response(status)
                if status in (301, 302, 307):
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        return Handler

    def wait_calls(self, n: int, timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.calls) >= n, timeout)

    def events(self) -> list[dict]:
        return [json.loads(body) for _, body in self.calls]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def receiver():
    made = []

    def make(statuses=()):
        made.append(Receiver(statuses))
        return made[-1]

    yield make
    for one in made:
        one.close()


@pytest.fixture
def alerts(real_redis_prefix):
    """(gate, outbox, make_deliverer) on the real Redis under a unique prefix (removed after)."""
    client, prefix = real_redis_prefix
    names = AlertNames(prefix)
    outbox = Outbox(client, names, max_pending=1000)
    gate = OnceGate(outbox, names, THRESHOLDS)
    made = []

    def deliverer(url, policy=POLICY, **kwargs):
        made.append(Deliverer(outbox, url, SECRET, policy, **kwargs))
        return made[-1]

    yield gate, outbox, deliverer
    for one in made:
        one.stop(timeout=5)
        assert one._thread is None or not one._thread.is_alive()
        one.session.close()


def signed(headers: dict, body: bytes) -> bool:
    return verify_signature(SECRET.encode(), body, headers.get("X-Gateway-Timestamp"),
                            headers.get("X-Gateway-Signature"))


def key(n: int = 0, max_budget: int = 10 * USD) -> Budget:
    return Budget("key", f"{n:064x}", max_budget=max_budget, alias=f"alias-{n}")


def deliver_until(deliverer, outcome: str, timeout: float = 5.0) -> bool:
    """Run the deliverer's rounds until one ends with `outcome` (a retry becomes due after its backoff)."""
    return wait_until(lambda: deliverer.deliver_once() == outcome, timeout)


def test_one_signed_call_per_threshold_crossing(alerts, receiver):
    gate, outbox, make = alerts
    hook = receiver()
    deliverer = make(hook.url)
    assert gate.fire(key(), "7", 0, 6 * USD, now=time.time()) == ["50%"]
    assert deliverer.deliver_once() == "delivered"
    assert gate.fire(key(), "7", 6 * USD, 9 * USD, now=time.time()) == ["80%"]
    assert deliverer.deliver_once() == "delivered"
    # The same crossing again (a retried batch, another worker): nothing is queued or sent.
    assert gate.fire(key(), "7", 0, 9 * USD, now=time.time()) == []
    assert deliverer.deliver_once() is None
    # A new budget period: its thresholds fire again.
    assert gate.fire(key(), "8", 0, 6 * USD, now=time.time()) == ["50%"]
    assert deliverer.deliver_once() == "delivered"

    assert len(hook.calls) == 3 and outbox.pending() == 0
    assert all(signed(headers, body) for headers, body in hook.calls)
    events = hook.events()
    assert [(e["threshold"], e["budget_period"]) for e in events] == [("50%", "7"), ("80%", "7"), ("50%", "8")]
    assert len({e["event_id"] for e in events}) == 3
    assert all(headers["X-Gateway-Event-Id"] == e["event_id"] for (headers, _), e in zip(hook.calls, events))
    assert events[1]["spend"] == 9.0 and events[1]["max_budget"] == 10.0 and events[1]["token"] == key().id


def test_a_failed_attempt_is_retried_and_succeeds_once(alerts, receiver):
    gate, outbox, make = alerts
    hook = receiver(statuses=[500])
    counted = []
    deliverer = make(hook.url, count=lambda outcome, n=1: counted.append(outcome))
    gate.fire(key(), "1", 0, 10 * USD, now=time.time())          # 50%, 80% and 100% at once
    outcomes = [deliverer.deliver_once() for _ in range(3)]
    assert outcomes == ["retried", "delivered", "delivered"]
    assert deliver_until(deliverer, "delivered")                 # the 500'd one, after its backoff
    assert deliverer.deliver_once() is None and outbox.pending() == 0
    assert counted.count("delivered") == 3 and counted.count("retried") == 1
    (first_headers, first_body), retry = hook.calls[0], hook.calls[-1]
    assert retry[1] == first_body                                 # the same bytes on every attempt
    assert retry[0]["X-Gateway-Event-Id"] == first_headers["X-Gateway-Event-Id"]
    assert all(signed(headers, body) for headers, body in hook.calls)
    assert sorted(e["threshold"] for e in hook.events()[1:]) == ["100%", "50%", "80%"]
    assert [e["event"] for e in hook.events() if e["threshold"] == "100%"] == ["budget_crossed"]


def test_a_redirect_is_not_followed_but_retried(alerts, receiver):
    gate, outbox, make = alerts
    hook = receiver(statuses=[302])
    deliverer = make(hook.url)
    gate.fire(key(), "1", 0, 5 * USD, now=time.time())
    assert deliverer.deliver_once() == "retried"
    assert len(hook.calls) == 1                                  # /elsewhere was never asked
    assert deliver_until(deliverer, "delivered")
    assert [h.get("X-Gateway-Event-Id") for h, _ in hook.calls][0] == hook.events()[1]["event_id"]


def test_two_deliverers_never_deliver_one_event_twice(alerts, receiver):
    gate, outbox, make = alerts
    hook = receiver()
    workers = [make(hook.url, background=True) for _ in range(2)]
    for worker in workers:
        worker.start()
    for n in range(20):
        assert gate.fire(key(n), "1", 0, 5 * USD, now=time.time()) == ["50%"]
    assert hook.wait_calls(20)
    assert wait_until(lambda: outbox.pending() == 0)
    for worker in workers:
        worker.stop(timeout=5)
    ids = [e["event_id"] for e in hook.events()]
    assert len(ids) == 20 and len(set(ids)) == 20


def test_a_dead_deliverers_event_is_delivered_by_another_after_its_lease(alerts, receiver):
    gate, outbox, make = alerts
    hook = receiver()
    gate.fire(key(), "1", 0, 5 * USD, now=time.time())
    dead = outbox.claim(POLICY.lease)             # claimed, then the worker died before its POST
    assert dead is not None
    survivor = make(hook.url)
    assert survivor.deliver_once() is None         # the lease still runs: not taken twice
    began = time.monotonic()
    assert deliver_until(survivor, "delivered", timeout=POLICY.lease + 5)
    assert time.monotonic() - began >= POLICY.lease * 0.8   # Redis' clock against ours
    assert len(hook.calls) == 1 and hook.events()[0]["event_id"] == dead.event_id
    assert outbox.pending() == 0


def test_an_event_that_keeps_failing_is_dropped_with_one_line(alerts, receiver, caplog):
    gate, outbox, make = alerts
    hook = receiver(statuses=[500] * 10)
    counted = []
    deliverer = make(hook.url, DeliveryPolicy(max_attempts=2, backoff_base=0.05, backoff_cap=0.1, connect_timeout=0.2,
                                              read_timeout=0.5, lease=1.5),
                     count=lambda outcome, n=1: counted.append(outcome))
    gate.fire(key(), "1", 0, 5 * USD, now=time.time())
    with caplog.at_level(logging.DEBUG):
        assert deliverer.deliver_once() == "retried"
        assert deliver_until(deliverer, "dropped")
    assert len(hook.calls) == 2 and outbox.pending() == 0 and counted == ["retried", "dropped"]
    dropped = [r.getMessage() for r in caplog.records if r.name == "gateway" and "dropped" in r.getMessage()]
    assert len(dropped) == 1 and "HTTP 500" in dropped[0]
    assert URL_TOKEN not in caplog.text and SECRET not in caplog.text and "/hooks/budget" not in caplog.text


def test_an_unreachable_receiver_is_named_by_error_class_only(alerts, caplog):
    gate, outbox, make = alerts
    with socket.socket() as probe:                 # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    deliverer = make(f"http://127.0.0.1:{port}/hook?token={URL_TOKEN}",
                     DeliveryPolicy(max_attempts=1, connect_timeout=0.2, read_timeout=0.5, lease=1.5))
    gate.fire(key(), "1", 0, 5 * USD, now=time.time())
    with caplog.at_level(logging.DEBUG):
        assert deliverer.deliver_once() == "dropped"
    assert "ConnectionError" in caplog.text
    assert URL_TOKEN not in caplog.text
    assert URL_TOKEN not in repr(deliverer) and SECRET not in repr(deliverer)
