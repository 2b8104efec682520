"""The spend log (one entry per /vllm request), its indexes, usage counters and end-user usage.

Filtered queries must not walk the whole log (2.1 s at 200k entries), so each entry is written
to the global stream and to small indexes beside it, in the accounting batch's pipeline:
- the key's stream `log:{token}` (capped at LogLimits.key_entries, expires key_ttl after its
  last write) and the end user's list `eu-log:<end user>` (newest first, a smaller cap,
  end_user_ttl): a filter by key, alias or end user reads only that index. End users get a list,
  not a stream: callers choose end-user ids, and a stream holding one entry takes 4.7 KB
  (its first node is preallocated), a list 650 B;
- request ids: a request id hashes to one of a fixed number of lists (`req:#<n>`), each keeping
  its newest entries, so lookups cover about the last `request_ids` requests (by default as
  many as the global stream keeps) and the memory is bounded by count, not by traffic x lifetime: a key per request id
  with a one-day lifetime cost ~600 B per request per day (5 GB/day at 100 requests/s).
  Callers choose X-Request-Id, so several requests may share one: all of them are found.
  Entries read from a list have no stream id ("id" is null);
- usage counters per hour and per day (gateway/usage/usagecounters.py), which a usage report
  reads without touching the log.
Every one of them is a single key written by single-key commands (EVAL with its one key for
the counters, never EVALSHA), so the batch works on a Redis Cluster pipeline.

Memory stays bounded however callers behave: an entry is at most ENTRY_MAX_BYTES and stores
nothing derivable; the global stream keeps SPEND_LOG_MAX_ENTRIES; per-key streams and the
request-id lists are capped; end-user lists (callers choose end-user ids) are capped and expire
after their last write, so at worst they hold (requests in that lifetime) x (entry size); a bucket
counts at most `bucket_models` models and `bucket_end_users` end users, the rest under one
"other" field. End-user usage is kept per (key, end user) in a hash that expires
END_USER_STATS_TTL after its last request, with an index per end user of the keys (or
"master") that used it, so one tenant's traffic never shows in another's totals.

Money: an entry's `spend` is stored as a JSON number printed from the request's exact
nano-dollars (0.013, never 0.013000000000000001); end-user stats add nano-dollars with HINCRBY
(`spend_nanos`) beside the float `spend` the previous version added, which is read with it until
the hash expires (gateway/usage/money.py).

Accounting (gateway/usage/accounting.py) queues a batch's writes on its pipeline through
`queue_batch`; the views read through `query`, `end_user_totals` and `counters.report`.
"""
from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass

from gateway.core.timefmt import iso
from gateway.usage.money import as_json, stored_nanos, to_nanos
from gateway.usage.usagecounters import MASTER_BUCKET, UsageCounters, clip

ENTRY_MAX_BYTES = 1024
# Caller-chosen free text in a spend-log entry: clipped to this many characters.
CLIP = {"route": 200, "error": 200}
# Fields a reader can rebuild, so the log does not store them (see _log_entry).
DERIVED = ("total_tokens", "end_time", "caller")
DAY = 86400
# Below this cap a stream is trimmed exactly: approximate trimming only drops whole nodes of
# 100 entries, so a cap of 20 would hold ~100.
EXACT_TRIM_BELOW = 1000
WALK_BATCH = 500
# Request-id lists: one per REQUEST_IDS_PER_LIST requests of capacity, each keeping 1.5x that
# (hashing is uneven), so at least the last `request_ids` requests are almost always found.
REQUEST_IDS_PER_LIST = 64
REQUEST_LIST_KEEP = 96
REQUEST_LIST_TTL = 30 * DAY  # only so that lists of a gateway no longer running go away
STREAM, LIST = "stream", "list"


@dataclass(frozen=True)
class LogLimits:
    """Caps and lifetimes of the indexes and counters (0 entries or 0 seconds: not kept)."""

    key_entries: int = 10_000        # per-key stream cap (~5 MB for a busy key)
    key_ttl: int = 30 * DAY          # a key's stream lives this long after its last entry
    end_user_entries: int = 1_000    # per-end-user list cap
    end_user_ttl: int = 7 * DAY      # an end user's list lives this long after its last entry
    # Recent requests findable by request id; None: as many as the global stream keeps
    # (SPEND_LOG_MAX_ENTRIES). 0: request-id lookups walk the global stream. Changing it
    # re-hashes the ids: lookups of requests logged before the change find nothing.
    request_ids: int | None = None
    hour_buckets_ttl: int = 8 * DAY
    day_buckets_ttl: int = 400 * DAY
    bucket_models: int = 200         # distinct models one bucket counts separately
    bucket_end_users: int = 1_000    # distinct end users one bucket counts separately


class SpendLog:
    def __init__(self, client, names, max_entries: int, end_user_ttl: float = 30 * DAY,
                 limits: LogLimits | None = None):
        self.redis = client
        self.names = names
        self.max_entries = max_entries
        self.end_user_ttl = int(end_user_ttl)
        self.limits = limits or LogLimits()
        self.request_ids = max_entries if self.limits.request_ids is None else self.limits.request_ids
        self.counters = UsageCounters(client, names, self.limits)

    # -- writing ----------------------------------------------------------------------------
    def queue_batch(self, pipe, entries: list[dict]) -> None:
        """Queue on `pipe` a batch's log entries, their indexes, usage counters and end users' totals.
        Single-key commands only: `pipe` may be a (non-transactional) Redis Cluster pipeline."""
        end_users, buckets, expiring = {}, {}, {}
        for entry in entries:
            end_user = entry.get("end_user")
            if end_user:
                total = end_users.setdefault((entry.get("token") or MASTER_BUCKET, end_user), [0, 0, 0, 0, 0.0])
                total[0] += 1
                total[1] += entry["prompt_tokens"]
                total[2] += entry["completion_tokens"]
                total[3] += to_nanos(entry["spend"])
                total[4] = max(total[4], entry["end_time"])
            # One JSON field per entry: packing 20 separate fields cost ~5% of a worker (py-spy).
            stored = {"e": stored_entry(entry)}
            pipe.xadd(self.names.spend_log, stored, maxlen=self.max_entries, approximate=True)
            self._queue_indexes(pipe, entry, stored, expiring)
            self.counters.count(buckets, entry)
        for name, (seconds, keep) in expiring.items():  # once per index a batch wrote, not per entry
            if keep:
                pipe.ltrim(name, 0, keep - 1)
            pipe.expire(name, seconds)
        self._queue_end_users(pipe, end_users)
        self.counters.queue(pipe, buckets)

    def _queue_indexes(self, pipe, entry: dict, stored: dict, expiring: dict) -> None:
        """The entry's copies in its key's and end user's streams and under its request id."""
        limits, token = self.limits, entry.get("token")
        end_user, request_id = entry.get("end_user"), entry.get("request_id")
        if token and limits.key_entries:
            name = self.names.key_log(token)
            _capped_xadd(pipe, name, stored, limits.key_entries)
            expiring[name] = (limits.key_ttl, None)
        if end_user and limits.end_user_entries:
            name = self.names.end_user_log(clip(end_user, 256))
            pipe.lpush(name, stored["e"])
            expiring[name] = (limits.end_user_ttl, limits.end_user_entries)
        if request_id and self.request_ids:
            name = self._request_list(clip(request_id, 256))
            pipe.lpush(name, stored["e"])
            expiring[name] = (REQUEST_LIST_TTL, REQUEST_LIST_KEEP)

    def _queue_end_users(self, pipe, end_users: dict) -> None:
        """Per (key, end user) totals of a batch; both the hash and the index live
        END_USER_STATS_TTL after the last request."""
        for (bucket, end_user), (requests, prompt, completion, spend, last) in end_users.items():
            name = self.names.end_user_stats(bucket, end_user)
            pipe.hincrby(name, "requests", requests)
            pipe.hincrby(name, "prompt_tokens", prompt)
            pipe.hincrby(name, "completion_tokens", completion)
            pipe.hincrby(name, "spend_nanos", spend)
            pipe.hset(name, "last_seen", iso(last))
            pipe.expire(name, self.end_user_ttl)
            index = self.names.end_user_keys(end_user)
            pipe.zadd(index, {bucket: last})
            pipe.expire(index, self.end_user_ttl)

    # -- reading the log -------------------------------------------------------------------
    def query(self, *, token=None, key_alias=None, end_user=None, request_id=None,
              start: float | None = None, end: float | None = None, page=1, size=50) -> dict:
        """Newest first. A filtered query reads the most selective index (request id, then the
        shorter of the key's and end user's streams) and checks the other filters on what it
        reads; without filters (or with a time range only) it walks the global stream."""
        alias_token = self.redis.get(self.names.alias(key_alias)) if key_alias else None
        wanted = _Filter(token, key_alias, alias_token, end_user, request_id)
        skip, found, more = (page - 1) * size, [], False
        for entry_id, fields in self._candidates(wanted, start, end, skip + size + 1):
            if not wanted.matches(fields):
                continue
            if skip:
                skip -= 1
            elif len(found) < size:
                found.append(_log_entry(entry_id, fields))
            else:
                more = True
                break
        return {"logs": found, "page": page, "size": size, "has_more": more}

    def _candidates(self, wanted: "_Filter", start, end, needed: int):
        """(id, fields) newest first from the smallest source that holds every match. A request
        id whose list expired is still found through the key's or end user's index if given."""
        indexes = wanted.indexes(self.names, self.limits)
        if wanted.request_id and self.request_ids:
            found = list(self._walk_list(self._request_list(wanted.request_id), start, end, REQUEST_LIST_KEEP))
            found = [(i, fields) for i, fields in found if fields.get("request_id") == wanted.request_id]
            if found or not indexes:
                return iter(found)
        if indexes:
            kind, name = self._shortest(indexes)
            return self._walk(name, start, end, needed) if kind == STREAM else self._walk_list(name, start, end, needed)
        if wanted.key_alias and not wanted.token:
            return iter(())  # an alias no key holds: nothing indexed under it (query by key=<token>)
        return self._walk(self.names.spend_log, start, end, needed)

    def _request_list(self, request_id: str) -> str:
        """The list a request id hashes to (crc32: the same in every process and gateway)."""
        lists = max(1, -(-self.request_ids // REQUEST_IDS_PER_LIST))
        return self.names.request_list(zlib.crc32(request_id.encode()) % lists)

    def _shortest(self, indexes: list[tuple[str, str]]) -> tuple[str, str]:
        if len(indexes) == 1:
            return indexes[0]
        pipe = self.redis.pipeline(transaction=False)
        for kind, name in indexes:
            pipe.xlen(name) if kind == STREAM else pipe.llen(name)
        return min(zip(pipe.execute(), indexes))[1]

    def _walk(self, stream: str, start, end, needed: int):
        """A stream's entries newest first between `start` and `end` (its ids' times), in batches."""
        upper = "+" if end is None else str(int(end * 1000))
        lower = "-" if start is None else str(int(start * 1000))
        count = min(WALK_BATCH, max(needed, 10))
        while True:
            batch = self.redis.xrevrange(stream, upper, lower, count=count)
            for entry_id, raw in batch:
                yield entry_id, json.loads(raw["e"])
            if len(batch) < count:
                return
            upper, count = "(" + batch[-1][0], WALK_BATCH

    def _walk_list(self, name: str, start, end, needed: int):
        """A list index's entries (newest first) whose end time is between `start` and `end`.
        They carry no stream id: "id" is null."""
        first, count = 0, min(WALK_BATCH, max(needed, 10))
        while True:
            batch = self.redis.lrange(name, first, first + count - 1)
            for raw in batch:
                fields = json.loads(raw)
                finished = (fields.get("start_time") or 0) + (fields.get("duration_ms") or 0) / 1000
                if (start is None or finished >= start) and (end is None or finished <= end):
                    yield None, fields
            if len(batch) < count:
                return
            first, count = first + count, WALK_BATCH

    # -- end users ---------------------------------------------------------------------------
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
        for usage in (summed, *per_key.values()):  # summed exactly in nano-dollars, shown in dollars
            usage["spend"] = as_json(usage["spend"])
        return {"end_user_id": end_user, **summed,
                "last_seen": max(u["last_seen"] or "" for u in per_key.values()) or None, "keys": per_key}


class _Filter:
    """The filters of one query, checked on each entry read."""

    def __init__(self, token, key_alias, alias_token, end_user, request_id):
        self.token, self.key_alias, self.alias_token = token, key_alias, alias_token
        self.end_user, self.request_id = end_user, request_id

    def matches(self, fields: dict) -> bool:
        if self.token and fields.get("token") != self.token:
            return False
        # An alias filter matches the key holding the alias now and entries logged under it.
        if self.key_alias and fields.get("key_alias") != self.key_alias \
                and (self.alias_token is None or fields.get("token") != self.alias_token):
            return False
        if self.end_user and fields.get("end_user") != self.end_user:
            return False
        return not self.request_id or fields.get("request_id") == self.request_id

    def indexes(self, names, limits: LogLimits) -> list[tuple[str, str]]:
        """(STREAM or LIST, name) of the indexes holding every entry this filter can match (any one will do)."""
        found = []
        if limits.key_entries:
            found += [(STREAM, names.key_log(t)) for t in {self.token, self.alias_token} if t]
        if self.end_user and limits.end_user_entries:
            found.append((LIST, names.end_user_log(self.end_user)))
        return found


def _capped_xadd(pipe, name: str, stored: dict, cap: int) -> None:
    pipe.xadd(name, stored, maxlen=cap, approximate=cap >= EXACT_TRIM_BELOW)


def _usage(raw: dict) -> dict:
    """One (key, end user) stats hash; spend in nano-dollars."""
    prompt, completion = int(raw.get("prompt_tokens", 0)), int(raw.get("completion_tokens", 0))
    return {"requests": int(raw.get("requests", 0)), "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "spend": stored_nanos(raw.get("spend_nanos"), raw.get("spend")),
            "last_seen": raw.get("last_seen")}


def stored_entry(entry: dict) -> str:
    """The spend-log JSON of one request: no derivable or null fields, caller-chosen text clipped,
    at most ENTRY_MAX_BYTES (the longest strings are cut further if it is still larger)."""
    kept = {name: clip(value, CLIP.get(name, 256)) for name, value in entry.items()
            if value is not None and name not in DERIVED}
    if entry.get("caller") not in (None, _caller(kept)):
        kept["caller"] = clip(entry["caller"], 64)
    if isinstance(kept.get("start_time"), float):
        kept["start_time"] = round(kept["start_time"], 6)
    if isinstance(kept.get("spend"), (int, float)) and not isinstance(kept["spend"], bool):
        kept["spend"] = as_json(to_nanos(kept["spend"]))  # prints as the exact amount charged
    text = json.dumps(kept, separators=(",", ":"), ensure_ascii=False)
    while len(text.encode()) > ENTRY_MAX_BYTES:
        longest = max((n for n, v in kept.items() if isinstance(v, str)), key=lambda n: len(kept[n]))
        kept[longest] = clip(kept[longest], len(kept[longest]) // 2)
        text = json.dumps(kept, separators=(",", ":"), ensure_ascii=False)
    return text


def _caller(fields: dict) -> str:
    """The access log's caller label, rebuilt from the entry (as keys.auth.Identity.label)."""
    token = fields.get("token")
    if not token:
        return "master"
    return f"key:{fields['key_alias']}" if fields.get("key_alias") else f"key:{token[:12]}"


def _log_entry(entry_id: str | None, fields: dict) -> dict:
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
