"""vLLM's own load figures, read once per gateway instance and shared with every worker and
instance through Redis.

Every worker runs one `LoadPoller` (a greenlet on gevent workers, started on first use), which
every ROUTING_POLL_INTERVAL:

1. in one pipelined round trip, tries to take or keep the instance's poller lease
   (`<prefix>poller:<instance id>`, a script: SET NX PX 3 x interval, extended only by its
   holder) and reads every replica's shared figures (`<prefix>load:<replica digest>`, a hash);
2. if it holds the lease, reads every replica's /metrics side by side (vllmload.read_load,
   ROUTING_POLL_TIMEOUT) and publishes each replica's figures in a second round trip;
3. wakes the admission queue (gateway/relay/admission.py): figures may have cleared.

Token reconciliation (gateway/relay/reconcile.py) rides on the same rounds: each worker's
tallies are added to Redis in step 1's round trip, and the lease holder hands vLLM's token
counters to the window script in step 2's. With reconciliation alone (one replica, or routing
off) the poller has no `board`: it publishes no load figures and runs at RECONCILE_POLL_INTERVAL.

So one worker per instance polls (the master of gunicorn must not do I/O: gevent patches at
worker boot), and another takes over within 3 intervals when it stops. Each instance polls
(several instances: several readers); the newest reading wins: the publish script stamps the
reading with Redis' own clock (TIME, minus how long ago the reading was taken) and writes only
when that is newer than what the hash holds. Ages are therefore measured on one clock, Redis',
whatever the gateway hosts' clocks say. A hash lives a few seconds after its last write
(FIGURES_TTL_FACTOR x ROUTING_STALE_AFTER), so a gateway fleet that stops polling leaves
nothing behind.

Figures older than ROUTING_STALE_AFTER are not used. Redis unreachable: nothing is refreshed,
the figures go stale and routing fails open (least in flight); one log line per incident
(redisconn.incidents). A replica whose /metrics cannot be read is not published (its figures
go stale); one log line when that starts and one when it ends.

Without gevent (tests, a dev server) nothing runs in the background: `tick()` does one round.
"""
from __future__ import annotations

import atexit
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass

from gateway.core.redisconn import REDIS_ERRORS, incidents
from gateway.core.runtime import gevent_patched
from gateway.relay.vllmload import LoadUnreadable, read_reading

log = logging.getLogger("gateway")

LEASE_INTERVALS = 3          # the poller lease lasts this many intervals
FIGURES_TTL_FACTOR = 3       # a figures hash expires this many ROUTING_STALE_AFTER after its last write
RATE_WINDOW = 1.0            # preemptions per second are measured over at least this long

# Take the lease when free, extend it when held by ARGV[1]; the reply carries Redis' clock.
# KEYS[1] lease; ARGV[1] this worker's id, ARGV[2] lease in ms. -> {held 0/1, seconds, microseconds}
_LEASE = """
local holder = redis.call('GET', KEYS[1])
local t = redis.call('TIME')
local held = 0
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  held = 1
elseif not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  held = 1
end
return {held, t[1], t[2]}
"""

# Write a replica's figures unless the hash holds a newer reading (another instance's).
# KEYS[1] the hash; ARGV[1] seconds since the reading was taken; ARGV[2] lifetime in ms;
# ARGV[3..] field, value pairs. -> {written 0/1, seconds, microseconds, read_at}
_PUBLISH = """
local t = redis.call('TIME')
local read_at = tonumber(t[1]) + tonumber(t[2]) / 1000000 - tonumber(ARGV[1])
local stamp = string.format('%.6f', read_at)
local previous = tonumber(redis.call('HGET', KEYS[1], 'read_at') or '0') or 0
if previous >= read_at then
  return {0, t[1], t[2], stamp}
end
redis.call('HSET', KEYS[1], 'read_at', stamp, unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, t[1], t[2], stamp}
"""

# Published fields -> vllmload figures they come from (None: computed by the poller).
_FROM_READING = {"waiting": "requests_waiting", "running": "requests_running", "kv": "kv_cache_usage",
                 "preemptions_total": "preemptions_total", "prefix_hits_total": "prefix_cache_hits_total",
                 "prefix_queries_total": "prefix_cache_queries_total"}
NUMBERS = (*_FROM_READING, "preemption_rate", "decode_rate")
DECODE_SMOOTHING = 0.3       # weight of the newest window in the decode rate's moving average


def default_instance_id() -> str:
    """This gateway instance: the host and the gunicorn master's pid (the parent of a worker)."""
    return f"{socket.gethostname()}:{os.getppid()}"


@dataclass(frozen=True)
class Figures:
    """One replica's figures as last published; numbers are None when vLLM does not report them."""

    waiting: float | None
    running: float | None
    kv: float | None
    preemptions_total: float | None
    preemption_rate: float | None
    prefix_hits_total: float | None
    prefix_queries_total: float | None
    read_at: float        # when vLLM was read, on Redis' clock (epoch seconds)
    by: str               # the instance that read it
    read_mono: float      # the same moment on this process' monotonic clock
    # Generated tokens per second per running request (the replica's speed; choice.speed_weights).
    decode_rate: float | None = None

    def age(self, now: float | None = None) -> float:
        return max((time.monotonic() if now is None else now) - self.read_mono, 0.0)

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        """vLLM's prefix-cache hits / queries (tokens) since it started."""
        if not self.prefix_queries_total or self.prefix_hits_total is None:
            return None
        return self.prefix_hits_total / self.prefix_queries_total


def _number(text):
    if text in (None, ""):
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _text(value) -> str:
    """A figure as stored in the hash: "" when unknown (or not a finite number)."""
    if value is None or not math.isfinite(value):
        return ""
    return repr(float(value))


def _server_time(seconds, microseconds) -> float:
    return int(seconds) + int(microseconds) / 1e6


class LoadBoard:
    """This worker's copy of every replica's shared figures."""

    def __init__(self, names, replica_names, stale_after: float):
        self.names = names
        self.keys = {name: names.replica_load(name) for name in replica_names}
        self.stale_after = stale_after
        self.figures: dict[str, Figures] = {}
        self.refreshed = None  # monotonic time of the last successful refresh

    def fresh(self, name: str, now: float | None = None) -> Figures | None:
        """The replica's figures when younger than ROUTING_STALE_AFTER, else None."""
        figures = self.figures.get(name)
        if figures is None or figures.age(now) > self.stale_after:
            return None
        return figures

    def queue_read(self, pipe) -> None:
        for key in self.keys.values():
            pipe.hgetall(key)

    def apply(self, hashes: list, server_now: float, mono: float) -> None:
        """The hashes read by queue_read, with Redis' clock and ours at the time of the read."""
        for name, found in zip(self.keys, hashes):
            figures = self.parse(found, server_now, mono)
            if figures is not None:
                self.keep(name, figures)
        self.refreshed = mono

    @staticmethod
    def parse(found: dict, server_now: float, mono: float) -> Figures | None:
        read_at = _number((found or {}).get("read_at"))
        if read_at is None:
            return None
        values = {name: _number(found.get(name)) for name in NUMBERS}
        return Figures(**values, read_at=read_at, by=found.get("by", ""),
                       read_mono=mono - max(server_now - read_at, 0.0))

    def keep(self, name: str, figures: Figures) -> None:
        """Hold `figures` unless those held were read later."""
        held = self.figures.get(name)
        if held is None or figures.read_at > held.read_at:
            self.figures[name] = figures


class LoadPoller:
    """The per-worker loop: lease, refresh, and (lease holder only) poll and publish. `board`
    None: no load figures (reconciliation only); `reconciler` None: no reconciliation."""

    def __init__(self, board: LoadBoard | None, replicas, redis, names, *, interval: float, timeout: float,
                 instance_id: str | None = None, worker_id: str | None = None, background: bool | None = None,
                 on_refresh=None, read=read_reading, reconciler=None):
        self.board = board
        self.reconciler = reconciler
        self.replicas = list(replicas)   # Replica objects (name, upstream)
        self.redis = redis
        self.interval = interval
        self.timeout = timeout
        self.instance_id = instance_id or default_instance_id()
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.lease_key = names.poller_lease(self.instance_id)
        self.lease_ms = max(int(interval * LEASE_INTERVALS * 1000), 1)
        self.figures_ttl_ms = (max(int(board.stale_after * FIGURES_TTL_FACTOR * 1000), 1000)
                               if board is not None else None)
        self.background = gevent_patched() if background is None else background
        self.on_refresh = on_refresh    # called after every round (the admission queue's pump)
        self.read = read
        self.holder = False             # this worker polls for the instance
        self.polls = 0                  # rounds this worker polled (tests, /replicas)
        self._readers: dict[str, threading.Thread] = {}
        self._readings: dict[str, tuple] = {}      # name -> (reading or LoadUnreadable, read_mono)
        self._unreadable: dict[str, str] = {}      # name -> why, while its /metrics cannot be read
        self._baseline: dict[str, tuple] = {}      # name -> (preemptions_total, mono) for the rate
        self._rates: dict[str, float | None] = {}
        self._decode: dict[str, list] = {}          # name -> [generation_total, mono, running sum, samples]
        self._decode_rates: dict[str, float] = {}
        self._started = False
        self._lock = threading.Lock()

    # -- the loop ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background loop once (gevent workers only; a no-op elsewhere)."""
        if self._started or not self.background or self.redis is None:
            return
        with self._lock:
            if self._started:
                return
            self._started = True
        # Under gevent's monkey-patching this thread is a greenlet.
        threading.Thread(target=self._loop, name="vllm-load-poller", daemon=True).start()
        if self.reconciler is not None:
            atexit.register(self.flush_tally)  # a graceful restart would lose up to an interval's counts

    def flush_tally(self) -> None:
        """Hand this worker's reconciliation tally to Redis now (at exit); best effort."""
        pipe = self.redis.pipeline(transaction=False)
        if self.reconciler.queue_flush(pipe)[1]:
            try:
                pipe.execute()
            except REDIS_ERRORS:
                pass  # the window drifts by these counts; nothing else can be done at exit

    def _loop(self) -> None:
        failing = None
        if self.board is None:
            # Reconciliation alone has nothing to do before requests ran (its window starts at the
            # first reading), so the first round waits an interval: a worker started for a few
            # requests does not read /metrics beside them.
            time.sleep(self.interval)
        while True:
            began = time.monotonic()
            try:
                self.tick()
                failing = None
            except Exception as exc:  # the loop must live on: routing then fails open, nothing worse
                if repr(exc) != failing:  # once per kind of failure, not every round
                    failing = repr(exc)
                    log.exception("vLLM load poller round failed (routing fails open meanwhile)")
            time.sleep(max(self.interval - (time.monotonic() - began), 0.01))

    def tick(self) -> bool:
        """One round; True when this worker holds the instance's lease (and polled)."""
        try:
            self._refresh()
            if self.holder:
                self._publish(self._poll())
        except REDIS_ERRORS as exc:
            self.holder = False
            incidents.report(exc, "vLLM's load figures are not shared meanwhile: routing falls back to each "
                                  "worker's least-in-flight choice." if self.board is not None else
                                  "token reconciliation pauses meanwhile (tallies are kept).")
        finally:
            if self.on_refresh is not None:
                self.on_refresh()
        return self.holder

    def _refresh(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.execute_command("EVAL", _LEASE, 1, self.lease_key, self.worker_id, self.lease_ms)
        if self.board is not None:
            self.board.queue_read(pipe)
        flushed = self.reconciler.queue_flush(pipe)[0] if self.reconciler is not None else None
        try:
            replies = pipe.execute()
        except REDIS_ERRORS:
            if flushed:
                self.reconciler.tally.give_back(flushed)  # delivered with the next round instead
            raise
        mono = time.monotonic()
        held, seconds, microseconds = replies[0]
        self.holder = bool(int(held))
        if self.board is not None:
            self.board.apply(replies[1:1 + len(self.board.keys)], _server_time(seconds, microseconds), mono)

    # -- polling (lease holder) ----------------------------------------------------------------
    def _poll(self) -> dict:
        """Read every replica's /metrics side by side, waiting one interval at most (a read may
        take up to ROUTING_POLL_TIMEOUT: a late one is published next round, with its true age,
        so a round stays within its interval and the lease is renewed in time); a read still
        running is not started again. Returns {name: (reading, read_mono)} of the reads that
        finished since the last publish."""
        self.polls += 1
        deadline = time.monotonic() + min(self.timeout, self.interval)
        started = []
        for replica in self.replicas:
            reader = self._readers.get(replica.name)
            if reader is not None and reader.is_alive():
                continue
            reader = threading.Thread(target=self._read_one, args=(replica,), daemon=True,
                                      name="vllm-load-read")
            self._readers[replica.name] = reader
            reader.start()
            started.append(reader)
        for reader in started:
            reader.join(max(deadline - time.monotonic(), 0.0))
        with self._lock:
            done, self._readings = self._readings, {}
        return done

    def _read_one(self, replica) -> None:
        try:
            reading = self.read(replica.upstream, self.timeout)
        except LoadUnreadable as exc:
            reading = exc
        except Exception as exc:  # noqa: BLE001 - whatever a read raises, the replica is unreadable
            reading = LoadUnreadable(f"/metrics could not be read ({type(exc).__name__})")
        with self._lock:
            self._readings[replica.name] = (reading, time.monotonic())

    def _publish(self, readings: dict) -> None:
        """One round trip: each readable replica's load figures (when routing uses them) and its
        token counters for the reconciliation window (when on)."""
        if not readings:
            return
        pipe = self.redis.pipeline(transaction=False)
        queued = []   # ("load", name, values) or ("window", name, None), in the pipeline's order
        now = time.monotonic()
        for name, (reading, read_mono) in readings.items():
            if isinstance(reading, LoadUnreadable):
                self._note_unreadable(name, str(reading))
                continue
            self._note_readable(name)
            age = max(now - read_mono, 0.0)
            if self.board is not None:
                values = self._values(name, reading, read_mono)
                args = [age, self.figures_ttl_ms]
                for field, value in values.items():
                    args += [field, _text(value)]
                args += ["by", self.instance_id]
                pipe.execute_command("EVAL", _PUBLISH, 1, self.board.keys[name], *args)
                queued.append(("load", name, values))
            if self.reconciler is not None and self.reconciler.queue_reading(pipe, name, reading, age):
                queued.append(("window", name, None))
        if not queued:
            return
        replies = pipe.execute()
        mono = time.monotonic()
        for (kind, name, values), reply in zip(queued, replies):
            if kind == "window":
                self.reconciler.apply(name, reply)
                continue
            written, seconds, microseconds, stamp = reply
            if int(written):
                found = {field: _text(value) for field, value in values.items()}
                found.update(read_at=stamp, by=self.instance_id)
                figures = self.board.parse(found, _server_time(seconds, microseconds), mono)
                self.board.keep(name, figures)

    def _values(self, name: str, reading: dict, read_mono: float) -> dict:
        values = {field: reading.get(source) for field, source in _FROM_READING.items()}
        values["preemption_rate"] = self._preemption_rate(name, values["preemptions_total"], read_mono)
        values["decode_rate"] = self._decode_rate(name, reading.get("generation_tokens_total"),
                                                  values["running"], read_mono)
        return values

    def _decode_rate(self, name: str, generated, running, read_mono: float):
        """Tokens generated per second per running request, over windows of RATE_WINDOW or more
        (the mean of `running` over the window's readings), smoothed across windows; windows with
        less than one request running on average say nothing about speed and are skipped.
        Until this worker has measured one, the rate last published is carried on."""
        if generated is None or running is None:
            return None
        window = self._decode.get(name)
        if window is None or generated < window[0]:  # first reading, or vLLM restarted
            self._decode[name] = [generated, read_mono, 0.0, 0]
            shared = self.board.figures.get(name) if self.board is not None else None
            return self._decode_rates.get(name, shared.decode_rate if shared is not None else None)
        window[2] += running
        window[3] += 1
        elapsed = read_mono - window[1]
        if elapsed >= RATE_WINDOW:
            mean_running = window[2] / window[3]
            if mean_running >= 1:
                rate = (generated - window[0]) / elapsed / mean_running
                previous = self._decode_rates.get(name)
                self._decode_rates[name] = rate if previous is None else \
                    previous + DECODE_SMOOTHING * (rate - previous)
            self._decode[name] = [generated, read_mono, 0.0, 0]
        return self._decode_rates.get(name)

    def _preemption_rate(self, name: str, total, read_mono: float):
        """Preemptions per second over the last RATE_WINDOW or more; until this worker has measured
        one, the rate last published (by any instance) is carried on."""
        if total is None:
            return None
        baseline = self._baseline.get(name)
        if baseline is None or total < baseline[0]:  # first reading, or vLLM restarted (counter reset)
            self._baseline[name] = (total, read_mono)
            shared = self.board.figures.get(name)
            return self._rates.get(name, shared.preemption_rate if shared is not None else None)
        elapsed = read_mono - baseline[1]
        if elapsed >= RATE_WINDOW:
            self._rates[name] = (total - baseline[0]) / elapsed
            self._baseline[name] = (total, read_mono)
        return self._rates.get(name, 0.0)

    def _note_unreadable(self, name: str, why: str) -> None:
        if self._unreadable.get(name) != why:
            log.warning("vLLM replica %s: its /metrics cannot be read (%s); %s", name, why,
                        "its load figures go stale and routing treats it as without figures"
                        if self.board is not None else "token reconciliation waits for the next reading")
        self._unreadable[name] = why

    def _note_readable(self, name: str) -> None:
        if self._unreadable.pop(name, None) is not None:
            log.warning("vLLM replica %s: its /metrics can be read again", name)

    def unreadable(self, name: str) -> str | None:
        """Why this worker (when it polls) could not read the replica's /metrics lately."""
        return self._unreadable.get(name)
