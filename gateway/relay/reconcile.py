"""Reconciliation: the gateway's token totals per vLLM replica against vLLM's own counters.

Why: the gateway accounts from the usage it reads in responses (gateway/usage/tap.py), while vLLM
counts every token it processes (`vllm:prompt_tokens_total`, `vllm:generation_tokens_total`).
Comparing the two over the same window shows usage the gateway missed or estimated badly, traffic
that bypasses it, or an accounting bug — something no one else checks (LiteLLM does no cost
tracking at all on `/vllm` pass-through).

How, without any Redis work on the request path:
- each worker tallies per replica, in memory, as each request ends (`Tally.add`, from
  Exchange.finish through Replicas.tally): prompt and generation tokens, requests that carried
  usage, and those whose usage was estimated (a stream without `include_usage`);
- its poller (gateway/relay/loadpoller.py) adds the tallies to the replica's open-window hash
  (HINCRBY) in the round trip it makes every interval anyway (the lease, the shared figures);
- the worker holding the instance's poller lease reads vLLM's counters with the load figures and
  hands them to WINDOW_SCRIPT, per replica, in its publish round trip. The script keeps the newest
  reading (Redis' clock), marks the window void when a counter went down (vLLM restarted) or
  readings stopped for a while, and once the window has lasted RECONCILE_WINDOW closes it: it
  stores both deltas in the replica's last-window hash, starts the next window at this reading,
  and tells its caller alone that it closed one. That caller counts the window
  (vgw_reconcile_windows_total) and logs a drift above RECONCILE_DRIFT_THRESHOLD: once per window
  across every worker and instance.

What drifts legitimately (the figures are for noticing trouble, not for billing):
- other clients of the same vLLM (direct calls, another gateway fleet): vLLM counts more;
- requests straddling a window edge: vLLM counts tokens as it processes them, the gateway when a
  request ends, and tallies reach Redis up to one poll interval later, while vLLM's counters are
  as last read. Consecutive windows even this out; long streams in short windows show it most;
- requests that failed mid-way or whose caller hung up: vLLM counted what it processed, the
  gateway what it saw (then estimated);
- estimated usage (streams without `include_usage`): events counted, not tokens — hence the
  estimated share beside the drift; vLLM's `--enable-force-include-usage` makes usage exact;
- a worker that dies loses its tallies of its last interval.
Kinds with fewer than RECONCILE_MIN_TOKENS tokens in a window are shown but never logged: one
straddling request in a quiet window is not news.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from gateway.core.redisconn import REDIS_ERRORS

log = logging.getLogger("gateway")

KINDS = ("prompt", "generation")
OUTCOMES = ("ok", "drift", "void")
GATEWAY_FIELDS = ("gw_prompt", "gw_generation", "gw_requests", "gw_estimated")
LIFETIME_WINDOWS = 10      # both hashes expire this many windows (at least an hour) after the last write
MIN_LIFETIME = 3600.0

# Take a reading of vLLM's counters; start, void or close the replica's window.
# KEYS[1] the open window, KEYS[2] the last closed window. ARGV[1] seconds since the reading was
# taken, ARGV[2]/[3] vLLM's prompt/generation totals, ARGV[4] window seconds, ARGV[5] the longest
# gap between two readings of a valid window, ARGV[6] lifetime in ms, ARGV[7] the instance.
# -> {1 when this call closed a window else 0, the last closed window as HGETALL gives it}
WINDOW_SCRIPT = """
local t = redis.call('TIME')
local read_at = tonumber(t[1]) + tonumber(t[2]) / 1000000 - tonumber(ARGV[1])
local prompt, generation = tonumber(ARGV[2]), tonumber(ARGV[3])
local open = redis.call('HMGET', KEYS[1], 'start', 'vllm_at', 'vllm_prompt', 'vllm_generation',
                        'base_prompt', 'base_generation', 'void')
local start, last_at = tonumber(open[1]), tonumber(open[2])
local closed = 0
if not last_at or read_at > last_at then
  local void = open[7]
  if void == '' then void = false end
  if start and not void then
    if prompt < (tonumber(open[3]) or 0) or generation < (tonumber(open[4]) or 0) then
      void = 'vllm_restarted'
    elseif last_at and read_at - last_at > tonumber(ARGV[5]) then
      void = 'no_readings'
    end
  end
  local stamp = string.format('%.6f', read_at)
  if start and read_at - start >= tonumber(ARGV[4]) then
    local gw = redis.call('HMGET', KEYS[1], 'gw_prompt', 'gw_generation', 'gw_requests', 'gw_estimated')
    redis.call('DEL', KEYS[2])
    redis.call('HSET', KEYS[2], 'start', open[1], 'end', stamp,
               'gateway_prompt', gw[1] or '0', 'gateway_generation', gw[2] or '0',
               'requests', gw[3] or '0', 'estimated', gw[4] or '0',
               'vllm_prompt', string.format('%.0f', prompt - (tonumber(open[5]) or 0)),
               'vllm_generation', string.format('%.0f', generation - (tonumber(open[6]) or 0)),
               'void', void or '', 'by', ARGV[7])
    redis.call('PEXPIRE', KEYS[2], ARGV[6])
    closed = 1
  end
  if not start or closed == 1 then
    redis.call('HSET', KEYS[1], 'start', stamp, 'base_prompt', ARGV[2], 'base_generation', ARGV[3],
               'gw_prompt', 0, 'gw_generation', 0, 'gw_requests', 0, 'gw_estimated', 0, 'void', '')
  elseif void then
    redis.call('HSET', KEYS[1], 'void', void)
  end
  redis.call('HSET', KEYS[1], 'vllm_at', stamp, 'vllm_prompt', ARGV[2], 'vllm_generation', ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return {closed, redis.call('HGETALL', KEYS[2])}
"""


class Tally:
    """This worker's counts per replica since its last flush: [prompt, generation, requests,
    estimated]. In memory only; the lock is uncontended (gevent) and keeps threads honest."""

    def __init__(self):
        self._counts: dict[str, list] = {}
        self._lock = threading.Lock()

    def add(self, replica: str, prompt: int, generation: int, estimated: bool) -> None:
        if not (prompt or generation or estimated):
            return  # no usage at all (models, health, an error answer): not a request to reconcile
        with self._lock:
            counts = self._counts.get(replica)
            if counts is None:
                counts = self._counts[replica] = [0, 0, 0, 0]
            counts[0] += prompt
            counts[1] += generation
            counts[2] += 1
            counts[3] += 1 if estimated else 0

    def take(self) -> dict:
        with self._lock:
            counts, self._counts = self._counts, {}
        return counts

    def give_back(self, counts: dict) -> None:
        """Counts a failed flush did not deliver (Redis refused the round trip) go to the next one."""
        with self._lock:
            for replica, values in counts.items():
                held = self._counts.setdefault(replica, [0, 0, 0, 0])
                for index, value in enumerate(values):
                    held[index] += value


def _int(value) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 0


@dataclass(frozen=True)
class Window:
    """One closed window of one replica; times are epoch seconds on Redis' clock."""

    start: float
    end: float
    gateway_prompt: int
    gateway_generation: int
    requests: int
    estimated: int
    vllm_prompt: int
    vllm_generation: int
    void: str | None      # why the window proves nothing ("vllm_restarted", "no_readings"), else None
    closed_by: str        # the instance that closed it

    @classmethod
    def from_hash(cls, found: dict) -> "Window | None":
        if not found or "end" not in found:
            return None
        try:
            start, end = float(found["start"]), float(found["end"])
        except (KeyError, TypeError, ValueError):
            return None
        return cls(start, end, _int(found.get("gateway_prompt")), _int(found.get("gateway_generation")),
                   _int(found.get("requests")), _int(found.get("estimated")), _int(found.get("vllm_prompt")),
                   _int(found.get("vllm_generation")), found.get("void") or None, found.get("by", ""))

    def totals(self, kind: str) -> tuple[int, int]:
        """(gateway, vLLM) tokens of a kind over the window."""
        if kind == "prompt":
            return self.gateway_prompt, self.vllm_prompt
        return self.gateway_generation, self.vllm_generation

    def drift(self, kind: str) -> float | None:
        """(gateway − vLLM) / vLLM: negative when the gateway counted less. None when void, or when
        vLLM counted nothing but the gateway did (no ratio exists)."""
        if self.void:
            return None
        gateway, vllm = self.totals(kind)
        if vllm <= 0:
            return 0.0 if gateway == 0 else None
        return (gateway - vllm) / vllm

    @property
    def estimated_ratio(self) -> float | None:
        return self.estimated / self.requests if self.requests else None

    def drifting(self, threshold: float, min_tokens: int) -> list[str]:
        """The kinds whose drift exceeds the threshold, among those with enough tokens to judge."""
        if self.void:
            return []
        out = []
        for kind in KINDS:
            if max(self.totals(kind)) < max(min_tokens, 1):
                continue
            drift = self.drift(kind)
            if drift is None or abs(drift) > threshold:
                out.append(kind)
        return out

    def as_json(self, now: float | None = None) -> dict:
        def ratio(value):
            return None if value is None else round(value, 6)

        shown = {
            "start": self.start, "end": self.end, "seconds": round(self.end - self.start, 3),
            "gateway": {"prompt_tokens": self.gateway_prompt, "generation_tokens": self.gateway_generation,
                        "requests": self.requests, "estimated_requests": self.estimated},
            "vllm": {"prompt_tokens": self.vllm_prompt, "generation_tokens": self.vllm_generation},
            "drift": {kind: ratio(self.drift(kind)) for kind in KINDS},
            "usage_estimated_ratio": ratio(self.estimated_ratio),
            "void": self.void, "closed_by": self.closed_by,
        }
        if now is not None:
            shown["age_s"] = round(max(now - self.end, 0.0), 3)
        return shown


def _pairs(flat) -> dict:
    flat = list(flat or [])
    return dict(zip(flat[::2], flat[1::2]))


class Reconciler:
    """One worker's side of reconciliation: its tally, the flush, and (when it holds the poller
    lease) the readings handed to the window script."""

    def __init__(self, names, replica_names, *, window: float, threshold: float, min_tokens: int,
                 interval: float, timeout: float = 0.5, metrics=None, instance_id: str = ""):
        self.tally = Tally()
        self.keys = {name: (names.reconcile_window(name), names.reconcile_last(name)) for name in replica_names}
        self.window = window
        self.threshold = threshold
        self.min_tokens = min_tokens
        # Readings further apart than this void the window: nobody was reading (the fleet was
        # down, /metrics unreadable), so a restart may have gone unseen.
        self.gap = max(window / 2, 3 * interval + 3 * timeout)
        self.lifetime_ms = int(max(LIFETIME_WINDOWS * window, MIN_LIFETIME) * 1000)
        self.metrics = metrics
        self.instance_id = instance_id
        self.last: dict[str, Window] = {}  # as this worker last saw them (when it polls)

    def add(self, replica: str, usage) -> None:
        """The request hook (Exchange.finish): memory only."""
        self.tally.add(replica, usage.prompt_tokens, usage.completion_tokens, usage.estimated)

    # -- every worker, every poller round ------------------------------------------------------
    def queue_flush(self, pipe) -> tuple[dict, int]:
        """Queue this worker's tallies (HINCRBY) on the round's pipeline: (what was taken, how
        many commands were queued). On failure the caller gives the counts back."""
        counts = self.tally.take()
        queued = 0
        for replica, values in counts.items():
            keys = self.keys.get(replica)
            if keys is None:
                continue
            for field, value in zip(GATEWAY_FIELDS, values):
                if value:
                    pipe.hincrby(keys[0], field, value)
                    queued += 1
        return counts, queued

    # -- the lease holder, per reading ---------------------------------------------------------
    def queue_reading(self, pipe, replica: str, reading: dict, age: float) -> bool:
        """Queue the window script for a reading; False when vLLM reports no token counters."""
        prompt, generation = reading.get("prompt_tokens_total"), reading.get("generation_tokens_total")
        if prompt is None or generation is None or replica not in self.keys:
            return False
        pipe.execute_command("EVAL", WINDOW_SCRIPT, 2, *self.keys[replica], repr(max(age, 0.0)),
                             f"{prompt:.0f}", f"{generation:.0f}", repr(float(self.window)), repr(float(self.gap)),
                             self.lifetime_ms, self.instance_id)
        return True

    def apply(self, replica: str, reply) -> Window | None:
        """The script's answer: keep and show the last window; judge it when this call closed it.
        Returns the window this call closed (None: none closed, or another caller closed it)."""
        closed, found = int(reply[0]), _pairs(reply[1])
        window = Window.from_hash(found)
        if window is not None:
            self.last[replica] = window
        if self.metrics is not None:
            self.metrics.show_reconcile(replica, window)
        if not closed or window is None:
            return None
        self._judge(replica, window)
        return window

    def _judge(self, replica: str, window: Window) -> None:
        drifting = window.drifting(self.threshold, self.min_tokens)
        outcome = "void" if window.void else ("drift" if drifting else "ok")
        if self.metrics is not None:
            self.metrics.reconcile_window(replica, outcome)
        if window.void:
            log.info("token reconciliation: replica %s, window of %.0f s void (%s)", replica,
                     window.end - window.start, window.void)
        elif drifting:
            log.warning(drift_message(replica, window, self.threshold))

    # -- /replicas -----------------------------------------------------------------------------
    def read_last(self, redis) -> tuple[dict, float | None]:
        """({replica: Window or None}, Redis' clock); ({}, None) on a Redis error (the page then
        shows the windows as unavailable). TIME goes on its own: a cluster pipeline routes by key."""
        pipe = redis.pipeline(transaction=False)
        for _, last in self.keys.values():
            pipe.hgetall(last)
        try:
            found = pipe.execute()
            seconds, microseconds = redis.time()
        except REDIS_ERRORS:
            return {}, None
        now = int(seconds) + int(microseconds) / 1e6
        return {name: Window.from_hash(hashes) for name, hashes in zip(self.keys, found)}, now


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:+.2f}%"


def drift_message(replica: str, window: Window, threshold: float) -> str:
    share = window.estimated_ratio
    return (f"token reconciliation: replica {replica} drifts beyond {threshold * 100:g}% over a window of "
            f"{window.end - window.start:.0f} s: gateway {window.gateway_prompt} prompt / "
            f"{window.gateway_generation} generation tokens, vLLM {window.vllm_prompt} / {window.vllm_generation} "
            f"(drift {_percent(window.drift('prompt'))} / {_percent(window.drift('generation'))}); "
            f"{window.estimated} of {window.requests} requests' usage estimated"
            f"{'' if share is None else f' ({share * 100:.0f}%)'}. Usual causes: other clients of this vLLM, "
            "streams without include_usage, requests that failed mid-way")
