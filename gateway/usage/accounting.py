"""After each /vllm request: per-key and per-end-user counters, budgets, the spend log.

Entries are written after the response went out. On a gevent worker a background greenlet
writes them in batches, one pipelined round trip per batch, at most FLUSH_INTERVAL after the
request ended (budgets and token windows therefore lag by that much). Elsewhere (tests, the
Flask dev server) each entry is written at once. If Redis is down, entries stay queued (up to
PENDING_MAX) and go out with the next successful batch, so a short outage loses nothing; the
queue is also flushed when the worker exits.

A parallel-request lease is the exception: it is released at once, in the request's own
greenlet, so a client's next request never finds its previous slot still taken; a release (or
refund) Redis refused is queued by the limiter and written with the next batch here.

Memory: a spend-log entry stores only what cannot be derived (no total_tokens, end_time or
caller, no null fields), caller-chosen strings are clipped, and one entry is at most
ENTRY_MAX_BYTES; the stream is capped at SPEND_LOG_MAX_ENTRIES, so it stays below
entries × ENTRY_MAX_BYTES. End-user usage is kept per (key, end user) in a hash that expires
END_USER_STATS_TTL after its last request, with an index per end user of the keys (or "master")
that used it, so one tenant's traffic never shows in another's totals and nothing lives forever.
"""
from __future__ import annotations

import atexit
import collections
import json
import logging
import time

from gateway.core.durations import parse_duration
from gateway.core.redisconn import REDIS_ERRORS, incidents
from gateway.core.timefmt import iso
from gateway.core.runtime import gevent_patched
from gateway.usage.prices import cost

log = logging.getLogger("gateway")

# Reset a key's budget-period spend when the period changed, then add; atomic per key.
# ARGV: period, prompt tokens, completion tokens, spend, requests (a batch's sum for one key).
_CHARGE_KEY = """
if redis.call('HGET', KEYS[1], 'budget_period') ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'budget_period', ARGV[1], 'budget_spend', 0)
end
redis.call('HINCRBY', KEYS[1], 'requests', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'prompt_tokens', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'completion_tokens', ARGV[3])
redis.call('HINCRBYFLOAT', KEYS[1], 'spend', ARGV[4])
redis.call('HINCRBYFLOAT', KEYS[1], 'budget_spend', ARGV[4])
return 1
"""
PENDING_MAX = 10_000
FLUSH_INTERVAL = 0.05
BATCH_MAX = 500
MASTER_BUCKET = "master"  # end-user stats of master-key requests (they have no token)
ENTRY_MAX_BYTES = 1024
# Caller-chosen free text in a spend-log entry: clipped to this many characters.
CLIP = {"route": 200, "error": 200}
# Fields a reader can rebuild, so the log does not store them (see _log_entry).
DERIVED = ("total_tokens", "end_time", "caller")


def budget_period(key: dict, now: float) -> str:
    """Which budget period `now` falls in: 'all' without budget_duration."""
    duration = key.get("budget_duration")
    if not duration:
        return "all"
    seconds = parse_duration(duration)
    return str(int((now - key.get("created_epoch", 0)) // seconds))


def budget_reset_at(key: dict, now: float) -> str | None:
    duration = key.get("budget_duration")
    if not duration:
        return None
    seconds = parse_duration(duration)
    start = key.get("created_epoch", 0)
    return iso(start + (int((now - start) // seconds) + 1) * seconds)


def current_budget_spend(key: dict, budget: tuple, now: float) -> float:
    """Spend in the current budget period, from what authentication read."""
    period, spent = budget
    if period != budget_period(key, now) or spent is None:
        return 0.0
    return float(spent)


class Accounting:
    def __init__(self, client, names, prices: dict, spend_log_max: int, limiter=None, background=None,
                 end_user_ttl: float = 30 * 86400):
        self.redis = client
        self.names = names
        self.prices = prices
        self.spend_log_max = spend_log_max
        self.end_user_ttl = int(end_user_ttl)
        self.limiter = limiter
        if limiter is not None:
            limiter.on_deferred = self._wake_up
        self._charge_key = client.register_script(_CHARGE_KEY)
        self.pending: collections.deque = collections.deque(maxlen=PENDING_MAX)
        self.background = gevent_patched() if background is None else background
        self._wake = None

    def cost(self, model, prompt_tokens, completion_tokens) -> float:
        return cost(self.prices, model, prompt_tokens, completion_tokens)

    def record(self, entry: dict, key: dict | None, slot=None) -> None:
        """Queue one finished request; never raises (the response is already gone)."""
        if slot is not None:
            self.limiter.release(slot)  # never raises: a failed release is queued for flush()
        self.pending.append((entry, key))
        self._wake_up()

    def _wake_up(self) -> None:
        """Write what is queued: now (no gevent) or soon, from the background flusher."""
        if not self.background:
            self.flush()
            return
        if self._wake is None:
            self._start_flusher()
        self._wake.set()

    def _start_flusher(self) -> None:
        import gevent
        from gevent.event import Event

        self._wake = Event()
        gevent.spawn(self._flush_loop)
        atexit.register(self.flush)

    def _flush_loop(self) -> None:
        import gevent

        while True:
            if not self.pending and not self._deferred_undos():
                self._wake.wait()
                self._wake.clear()
            if len(self.pending) < BATCH_MAX:
                gevent.sleep(FLUSH_INTERVAL)  # let a batch gather
            if not self.flush():
                gevent.sleep(1.0)  # Redis is down: retry on our own, traffic or not

    def flush(self) -> bool:
        """Write everything queued in one pipeline; on a Redis outage keep it queued."""
        # Take the entries out first: another greenlet may queue more while this one waits on I/O.
        batch = []
        while self.pending:
            batch.append(self.pending.popleft())
        if not batch and not self._deferred_undos():
            return True
        undos = []
        try:
            pipe = self.redis.pipeline(transaction=False)
            if self.limiter is not None:
                undos = self.limiter.take_deferred(pipe)
            charges, end_users = {}, {}
            for entry, key in batch:
                try:
                    self._queue(pipe, entry, key, charges, end_users)
                except Exception:  # one malformed entry must not cost the whole batch
                    log.exception("accounting skipped request %s", entry.get("request_id"))
            # One script call per key and budget period in a batch, not one per request.
            for (token, period), (requests, prompt, completion, spend) in charges.items():
                self._charge_key(keys=[self.names.key_spend(token)],
                                 args=[period, prompt, completion, repr(spend), requests], client=pipe)
            self._queue_end_users(pipe, end_users)
            pipe.execute()
        except REDIS_ERRORS as exc:
            self.pending.extendleft(reversed(batch))
            if undos:
                self.limiter.put_back(undos)
            incidents.report(exc, f"Accounting is queued ({len(self.pending)} requests) and written "
                                  "once it answers.")
            return False
        except Exception:  # a bug (WRONGTYPE, a script error): retrying would fail forever
            log.exception("accounting failed for a batch of %d requests", len(batch))
        incidents.answered()
        return True

    def _deferred_undos(self) -> bool:
        return self.limiter is not None and bool(self.limiter.deferred)

    def _queue(self, pipe, entry: dict, key: dict | None, charges: dict, end_users: dict) -> None:
        token = entry.get("token")
        prompt, completion = entry["prompt_tokens"], entry["completion_tokens"]
        if token and key is not None:
            total = charges.setdefault((token, budget_period(key, entry["start_time"])), [0, 0, 0, 0.0])
            total[0] += 1
            total[1] += prompt
            total[2] += completion
            total[3] += entry["spend"]
            if self.limiter is not None and key.get("tpm_limit") is not None:
                self.limiter.charge_tokens_into(pipe, token, prompt + completion, entry["end_time"])
        end_user = entry.get("end_user")
        if end_user:
            total = end_users.setdefault((token or MASTER_BUCKET, end_user), [0, 0, 0, 0.0, 0.0])
            total[0] += 1
            total[1] += prompt
            total[2] += completion
            total[3] += entry["spend"]
            total[4] = max(total[4], entry["end_time"])
        # One JSON field per entry: packing 20 separate fields cost ~5% of a worker (py-spy).
        pipe.xadd(self.names.spend_log, {"e": stored_entry(entry)}, maxlen=self.spend_log_max, approximate=True)

    def _queue_end_users(self, pipe, end_users: dict) -> None:
        """Per (key, end user) totals of a batch; both the hash and the index live
        END_USER_STATS_TTL after the last request."""
        for (bucket, end_user), (requests, prompt, completion, spend, last) in end_users.items():
            name = self.names.end_user_stats(bucket, end_user)
            pipe.hincrby(name, "requests", requests)
            pipe.hincrby(name, "prompt_tokens", prompt)
            pipe.hincrby(name, "completion_tokens", completion)
            pipe.hincrbyfloat(name, "spend", spend)
            pipe.hset(name, "last_seen", iso(last))
            pipe.expire(name, self.end_user_ttl)
            index = self.names.end_user_keys(end_user)
            pipe.zadd(index, {bucket: last})
            pipe.expire(index, self.end_user_ttl)

    # -- reading --------------------------------------------------------------------------
    def key_totals(self, token: str, key: dict) -> dict:
        raw = self.redis.hgetall(self.names.key_spend(token))
        now = time.time()
        prompt, completion = int(raw.get("prompt_tokens", 0)), int(raw.get("completion_tokens", 0))
        return {
            "spend": current_budget_spend(key, (raw.get("budget_period"), raw.get("budget_spend")), now),
            "total_spend": float(raw.get("spend", 0)),
            "requests": int(raw.get("requests", 0)),
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "budget_reset_at": budget_reset_at(key, now),
        }

    def end_user_totals(self, end_user: str) -> dict | None:
        """An end user's usage per key ("master" for the master key) and summed over them."""
        index = self.names.end_user_keys(end_user)
        self.redis.zremrangebyscore(index, "-inf", time.time() - self.end_user_ttl)
        buckets = self.redis.zrange(index, 0, -1)
        pipe = self.redis.pipeline(transaction=False)
        for bucket in buckets:
            pipe.hgetall(self.names.end_user_stats(bucket, end_user))
        per_key = {bucket: _usage(raw) for bucket, raw in zip(buckets, pipe.execute() if buckets else []) if raw}
        if not per_key:
            return None
        summed = {name: sum(u[name] for u in per_key.values())
                  for name in ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "spend")}
        return {"end_user_id": end_user, **summed,
                "last_seen": max(u["last_seen"] or "" for u in per_key.values()) or None, "keys": per_key}

    def spend_logs(self, *, token=None, key_alias=None, end_user=None, request_id=None,
                   start: float | None = None, end: float | None = None, page=1, size=50) -> dict:
        """Newest first; filters applied while walking the stream backwards in batches."""
        upper = "+" if end is None else str(int(end * 1000))
        lower = "-" if start is None else str(int(start * 1000))
        skip, wanted, found, more = (page - 1) * size, size, [], False
        while True:
            batch = self.redis.xrevrange(self.names.spend_log, upper, lower, count=500)
            for entry_id, raw in batch:
                fields = json.loads(raw["e"])
                if ((token and fields.get("token") != token) or (key_alias and fields.get("key_alias") != key_alias)
                        or (end_user and fields.get("end_user") != end_user)
                        or (request_id and fields.get("request_id") != request_id)):
                    continue
                if skip:
                    skip -= 1
                elif len(found) < wanted:
                    found.append(_log_entry(entry_id, fields))
                else:
                    more = True
                    break
            if more or len(batch) < 500:
                break
            upper = "(" + batch[-1][0]
        return {"logs": found, "page": page, "size": size, "has_more": more}


def _usage(raw: dict) -> dict:
    prompt, completion = int(raw.get("prompt_tokens", 0)), int(raw.get("completion_tokens", 0))
    return {"requests": int(raw.get("requests", 0)), "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "spend": float(raw.get("spend", 0)),
            "last_seen": raw.get("last_seen")}


def _clip(value, limit: int):
    return value[:limit] + "…" if isinstance(value, str) and len(value) > limit else value


def stored_entry(entry: dict) -> str:
    """The spend-log JSON of one request: no derivable or null fields, caller-chosen text clipped,
    at most ENTRY_MAX_BYTES (the longest strings are cut further if it is still larger)."""
    kept = {name: _clip(value, CLIP.get(name, 256)) for name, value in entry.items()
            if value is not None and name not in DERIVED}
    if entry.get("caller") not in (None, _caller(kept)):
        kept["caller"] = _clip(entry["caller"], 64)
    for name in ("start_time", "spend"):
        if isinstance(kept.get(name), float):
            kept[name] = round(kept[name], 6) if name == "start_time" else float(f"{kept[name]:.10g}")
    text = json.dumps(kept, separators=(",", ":"), ensure_ascii=False)
    while len(text.encode()) > ENTRY_MAX_BYTES:
        longest = max((n for n, v in kept.items() if isinstance(v, str)), key=lambda n: len(kept[n]))
        kept[longest] = _clip(kept[longest], len(kept[longest]) // 2)
        text = json.dumps(kept, separators=(",", ":"), ensure_ascii=False)
    return text


def _caller(fields: dict) -> str:
    """The access log's caller label, rebuilt from the entry (as keys.auth.Identity.label)."""
    token = fields.get("token")
    if not token:
        return "master"
    return f"key:{fields['key_alias']}" if fields.get("key_alias") else f"key:{token[:12]}"


def _log_entry(entry_id: str, fields: dict) -> dict:
    out = {name: None for name in ("token", "key_alias", "end_user", "model", "upstream_status", "ttfb_ms",
                                   "error")}
    out.update({"id": entry_id, **fields})
    out.setdefault("caller", _caller(fields))
    prompt, completion = out.get("prompt_tokens") or 0, out.get("completion_tokens") or 0
    out["total_tokens"] = prompt + completion
    if out.get("start_time") is not None and out.get("duration_ms") is not None:
        out["end_time"] = round(out["start_time"] + out["duration_ms"] / 1000, 6)
    for name in ("start_time", "end_time"):
        if out.get(name) is not None:
            out[name + "_iso"] = iso(out[name], "milliseconds")
    return out
