"""The admission queue (gateway/relay/admission.py): bounded, fair across keys, with a deadline.
Driven with threads here (the gateway's greenlets behave alike)."""
import threading
import time

import pytest

from gateway.core.errors import GatewayError
from gateway.core.metrics import Metrics
from gateway.relay.admission import Admission


class Room:
    def __init__(self, free=False):
        self.free = free

    def __call__(self):
        return self.free


@pytest.fixture
def metrics(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    return Metrics()


def sample(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels or None)


class Caller(threading.Thread):
    """One request waiting at the gate; records when it was let out (or what it got)."""

    def __init__(self, admission, key, released: list):
        super().__init__(daemon=True)
        self.admission, self.key, self.released = admission, key, released
        self.error = None

    def run(self):
        try:
            self.admission.enter(self.key)
            self.released.append(self.key)
        except GatewayError as exc:
            self.error = exc


def queue_up(admission, key, released) -> Caller:
    """Start a caller and wait until it is in the queue (so arrival order is the test's)."""
    before = admission.length
    caller = Caller(admission, key, released)
    caller.start()
    deadline = time.monotonic() + 5
    while admission.length == before and time.monotonic() < deadline:
        time.sleep(0.001)
    assert admission.length == before + 1
    return caller


def let_out_one_by_one(admission, released, count):
    """What the gateway does: each request let out is sent, and its send pumps the next."""
    for n in range(count):
        admission.pump()
        deadline = time.monotonic() + 5
        while len(released) < n + 1 and time.monotonic() < deadline:
            time.sleep(0.001)


def test_with_room_and_nobody_waiting_a_request_goes_at_once(metrics):
    admission = Admission(Room(True), max_waiting=4, timeout=5, metrics=metrics)
    assert admission.enter("k") == 0.0
    assert admission.length == 0 and sample(metrics, "vgw_admission_queue_length") == 0


def test_one_key_flooding_cannot_starve_the_others(metrics):
    room = Room(False)
    admission = Admission(room, max_waiting=20, timeout=10, metrics=metrics)
    released: list = []
    callers = [queue_up(admission, "flood", released) for _ in range(6)]
    callers += [queue_up(admission, "b", released), queue_up(admission, "c", released)]
    callers.append(queue_up(admission, "b", released))
    assert sample(metrics, "vgw_admission_queue_length") == 9
    room.free = True
    let_out_one_by_one(admission, released, 9)
    for caller in callers:
        caller.join(5)
    # one request per key per turn, keys in the order they first queued
    assert released == ["flood", "b", "c", "flood", "b", "flood", "flood", "flood", "flood"]
    assert admission.length == 0 and sample(metrics, "vgw_admission_queue_length") == 0
    assert sample(metrics, "vgw_admission_wait_seconds_count") == 9


def test_a_new_arrival_does_not_overtake_the_queue():
    room = Room(False)
    admission = Admission(room, max_waiting=10, timeout=10)
    released: list = []
    first = queue_up(admission, "first", released)
    room.free = True  # room now, but "first" waits already: "late" queues behind it
    late = Caller(admission, "late", released)
    late.start()
    first.join(5)
    let_out_one_by_one(admission, released, 2)
    late.join(5)
    assert released == ["first", "late"] and not first.is_alive() and not late.is_alive()


def test_a_full_queue_answers_503_with_retry_after_at_once(metrics):
    admission = Admission(Room(False), max_waiting=2, timeout=10, metrics=metrics)
    released: list = []
    waiting = [queue_up(admission, "k", released) for _ in range(2)]
    started = time.monotonic()
    with pytest.raises(GatewayError) as refused:
        admission.enter("other")
    assert time.monotonic() - started < 0.5
    assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "2"
    assert "queue is full" in refused.value.message
    assert sample(metrics, "vgw_admission_shed_total", reason="queue_full") == 1
    assert admission.length == 2
    admission.has_room = Room(True)
    let_out_one_by_one(admission, released, 2)
    for caller in waiting:
        caller.join(5)
    assert released == ["k", "k"]


def test_zero_places_refuses_at_once_when_saturated():
    admission = Admission(Room(False), max_waiting=0, timeout=10)
    with pytest.raises(GatewayError) as refused:
        admission.enter("k")
    assert refused.value.status == 503


def test_the_deadline_answers_503_with_retry_after_and_leaves_the_queue(metrics):
    admission = Admission(Room(False), max_waiting=4, timeout=0.2, metrics=metrics)
    started = time.monotonic()
    with pytest.raises(GatewayError) as refused:
        admission.enter("k")
    waited = time.monotonic() - started
    assert 0.2 <= waited < 2
    assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "2"
    assert "saturated for 0.2s" in refused.value.message
    assert admission.length == 0 and not admission.queues
    assert sample(metrics, "vgw_admission_shed_total", reason="timeout") == 1
    assert sample(metrics, "vgw_admission_queue_length") == 0
    assert sample(metrics, "vgw_admission_shed_total", reason="client_gone") == 0  # created at 0


def test_a_waiter_that_times_out_does_not_block_the_next_key():
    room = Room(False)
    admission = Admission(room, max_waiting=4, timeout=0.3)
    released: list = []
    gone = queue_up(admission, "a", released)
    gone.join(5)  # timed out
    assert isinstance(gone.error, GatewayError) and admission.length == 0
    admission.timeout = 10
    stays = queue_up(admission, "b", released)
    room.free = True
    admission.pump()
    stays.join(5)
    assert released == ["b"]
